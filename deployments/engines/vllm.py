"""vLLM engine: autoscaled vLLM replicas through Ray Serve LLM, capped by CLEAR.

``build_vllm_deployment`` turns :class:`~deployments.config.VLLMEngineConfig`
into a ``ray.serve.llm.LLMConfig`` (model id = the app's model name,
``autoscaling_config`` from the config) and an ``LLMServer`` deployment;
:class:`VLLMEngine` is the thin adapter the ingress talks to through the common
:class:`~deployments.engines.base.Engine` interface. It maps each
:class:`EngineRequest` to an OpenAI request whose ``max_tokens`` is the CLEAR
cap, asks for streaming with continuous usage statistics (so the tokens
generated are known at every chunk, also when the client disconnects), and
translates vLLM's SSE chunks back into :class:`EngineChunk`.

vLLM and ``ray.serve.llm`` are imported only when this engine is configured
(neither is needed, nor installed, for the CPU graph). The request mapping is
covered on CPU with a fake ``LLMServer`` handle (tests/unit/serving), and
``scripts/gpu_smoke_test.py`` exercises the real thing on a GPU machine.
"""

from __future__ import annotations

import json
from collections.abc import Callable

from deployments.config import VLLMEngineConfig
from deployments.engines.base import Engine, EngineChunk, EngineRequest
from deployments.errors import EngineError


def openai_body(req: EngineRequest, ignore_eos: bool = False) -> dict:
    """The OpenAI request body vLLM gets for one capped request."""
    body = {
        "model": req.model,
        "max_tokens": int(req.cap_tokens),  # the CLEAR cap, already <= the client's max_tokens
        "stream": True,
        "stream_options": {"include_usage": True, "continuous_usage_stats": True},
        **req.sampling,
    }
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
        if hasattr(it, "model_dump"):  # an ErrorResponse or a pydantic chunk
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
    def __init__(self, llm_handle, config: VLLMEngineConfig, model_name: str, request_factory: Callable | None = None):
        self.llm = llm_handle
        self.config = config
        self.model_name = model_name
        self.request_factory = request_factory or default_request_factory

    async def generate(self, request: EngineRequest):
        body = openai_body(request, self.config.ignore_eos)
        oai = self.request_factory(request.kind, body)
        method = self.llm.chat if request.kind == "chat" else self.llm.completions
        stream = method.options(stream=True).remote(oai)
        seen = 0  # completion tokens reported so far
        finish = None
        async for item in stream:
            for payload in _sse_payloads(item):
                if "error" in payload or payload.get("object") == "error":
                    err = payload.get("error", payload)
                    raise EngineError(f"vLLM error: {err.get('message', err)}")
                usage = payload.get("usage") or {}
                total = usage.get("completion_tokens")
                text = ""
                for choice in payload.get("choices") or []:
                    text += (choice.get("delta") or {}).get("content") or choice.get("text") or ""
                    finish = choice.get("finish_reason") or finish
                new = max(int(total) - seen, 0) if total is not None else (1 if text else 0)
                seen += new
                if text or new:
                    yield EngineChunk(text=text, tokens=new)
        yield EngineChunk(text="", tokens=0, finish_reason=finish or "stop", info={"engine": "vllm"})


def build_vllm_deployment(cfg: VLLMEngineConfig, model_name: str):
    """The Ray Serve LLM deployment (an ``LLMServer`` with autoscaling) for the configured model."""
    from ray.serve.llm import LLMConfig, build_llm_deployment

    extra = dict(cfg.llm_config)
    deployment_config = dict(extra.pop("deployment_config", {}))
    deployment_config.setdefault(
        "autoscaling_config",
        {"min_replicas": cfg.min_replicas, "max_replicas": cfg.max_replicas, "target_ongoing_requests": cfg.target_ongoing_requests},
    )
    llm_config = LLMConfig(
        model_loading_config={"model_id": model_name, "model_source": cfg.model_source},
        deployment_config=deployment_config,
        **extra,
    )
    return build_llm_deployment(llm_config)
