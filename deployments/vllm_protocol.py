"""A client's request for the vLLM engine, parsed with the models Ray Serve LLM itself uses (vLLM's protocol).

On the vLLM engine the request the client sent reaches vLLM whole: everything
vLLM accepts (tools, response formats, logprobs, ``n``, its sampling
extensions...) is checked here by vLLM's own request models
(``ray.serve.llm.openai_api_models``, vLLM's ``ChatCompletionRequest`` and
``CompletionRequest``) before any budget is reserved, and only the cap
changes on the way to the engine. Three things vLLM's models let through are
refused here, each with a 400 that names the field:

* a field neither OpenAI nor vLLM knows (vLLM keeps it and ignores it with a
  debug line; a typo such as ``max_token`` would silently do nothing);
* fields that are the operator's to set, not a client's (:data:`OPERATOR_FIELDS`:
  request ids, scheduling priority, KV-transfer parameters, a request's own
  chat template...);
* what vLLM's models check only when the engine builds the sampling parameters
  (``n >= 1``, ranges, ``min_tokens`` within the cap): :func:`parse_vllm` runs
  that check here (``to_sampling_params``), with the client's own cap.

OpenAI fields that vLLM does not declare are accepted at their "not used"
values (:data:`OPENAI_DEFAULTS`, e.g. ``store: false``, which the ``openai``
SDK may send) and refused otherwise.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

from deployments.errors import BadRequestError

SAMPLE_INDEX_FIELD = "clear_sample_index"
#: OpenAI request fields vLLM's models do not declare -> the values that mean "not used" (accepted).
OPENAI_DEFAULTS: dict[str, tuple] = {
    "store": (None, False), "metadata": (None, {}), "service_tier": (None, "auto", "default"), "best_of": (None, 1),
    "modalities": (None, ["text"]), "audio": (None,), "prediction": (None,), "web_search_options": (None,),
    "functions": (None, []), "function_call": (None, "none"), "verbosity": (None,), "prompt_cache_key": (None,),
    "prompt_cache_retention": (None,), "safety_identifier": (None,),
}
#: Fields of vLLM's models that the operator decides, never a client (refused when a client sets them).
OPERATOR_FIELDS = ("request_id", "priority", "kv_transfer_params", "ec_transfer_params", "vllm_xargs",
                   "chat_template", "session_id", "routed_experts_prompt_start")


@dataclass(frozen=True)
class VLLMRequest:
    """A validated request for the vLLM engine and what CLEAR reads of it."""

    kind: str  # "chat" or "completion"
    request: Any  # vLLM's ChatCompletionRequest or CompletionRequest, as the client sent it
    model: str  # the model id asked for
    prompt: str  # the text the predictor reads (the last user message, or the prompt)
    count_text: str  # all the prompt text, for the context-length check
    max_tokens: int | None  # the client's own cap (None: CLEAR decides alone)
    n: int  # choices asked for (one decision for the group)
    stream: bool
    include_usage: bool  # the client asked for the usage chunk at the end of a stream
    continuous_usage: bool  # the client asked for usage on every chunk
    sample_index: int | None  # replay on the real engine: the recorded sample to replay
    min_tokens: int = 0  # vLLM's min_tokens: each choice generates at least this many
    structured: bool = False  # the answer is held to a grammar: a JSON format, structured outputs, or a tool call
    thinking_token_budget: int | None = None  # the client's own thinking budget (reasoning engines)


def _models():
    from ray.serve.llm.openai_api_models import ChatCompletionRequest, CompletionRequest

    return {"chat": ChatCompletionRequest, "completion": CompletionRequest}


def _client_errors() -> tuple[type[BaseException], ...]:
    from pydantic import ValidationError
    from vllm.exceptions import VLLMClientError

    return ValidationError, VLLMClientError


def _bad_request(exc: BaseException) -> BadRequestError:
    """vLLM's or pydantic's refusal as the project's 400, naming the field."""
    from pydantic import ValidationError

    if isinstance(exc, ValidationError):
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err.get("loc", ()))
        param = str(err["loc"][0]) if err.get("loc") else None
        msg = str(err.get("msg", exc)).removeprefix("Value error, ")
        return BadRequestError(f"'{where}': {msg}" if where else msg, param=param)
    return BadRequestError(str(exc), param=getattr(exc, "parameter", None))


def _unknown_fields(model, path: str = "") -> list[str]:
    """Keys a client sent that the models (top level and nested) do not declare."""
    from pydantic import BaseModel

    found = [f"{path}{k}" for k in (model.model_extra or {})]
    for name in type(model).model_fields:
        value = model.__dict__.get(name)  # not getattr: a deprecated field (max_tokens) warns when read
        values = value if isinstance(value, list) else [value]
        for i, v in enumerate(values):
            if isinstance(v, BaseModel) and v.model_config.get("extra") == "allow":
                where = f"{path}{name}[{i}]." if isinstance(value, list) else f"{path}{name}."
                found += _unknown_fields(v, where)
    return found


def _text_of(content) -> str:
    """A message's text as vLLM joins text parts for a string-content chat template."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
    return ""


def client_cap(kind: str, body: dict) -> int | None:
    """The cap the client itself set, read from the body it sent: in chat ``max_completion_tokens`` wins over
    ``max_tokens`` (as vLLM reads them); a completion's model says 16 when the client said nothing."""
    keys = ("max_completion_tokens", "max_tokens") if kind == "chat" else ("max_tokens",)
    for key in keys:
        value = body.get(key)
        if value is not None:
            return value
    return None


def parse_vllm(kind: str, body: dict, context_limit_tokens: int) -> VLLMRequest:
    """Validate ``body`` (a decoded JSON object) as vLLM would, plus the refusals of the module docstring."""
    raw = copy.deepcopy(body)  # vLLM's validators edit the dict they are given
    sample_index = raw.pop(SAMPLE_INDEX_FIELD, None)
    for name, allowed in OPENAI_DEFAULTS.items():
        if name in raw:
            if raw[name] not in allowed:
                raise BadRequestError(f"'{name}' is not supported by this server; remove it", param=name)
            del raw[name]
    for name in OPERATOR_FIELDS:
        if name in raw:
            raise BadRequestError(f"'{name}' is set by the operator, not by a request; remove it", param=name)
    if kind == "completion" and "max_completion_tokens" in raw:
        raise BadRequestError("'max_completion_tokens' is a chat field; completions take 'max_tokens'",
                              param="max_completion_tokens")
    errors = _client_errors()
    try:
        req = _models()[kind].model_validate(raw)
    except errors as exc:
        raise _bad_request(exc) from None
    unknown = _unknown_fields(req)
    if unknown:
        raise BadRequestError(f"Unrecognized request argument supplied: {unknown[0]}", param=unknown[0].split(".")[0])
    if not isinstance(req.model, str) or not req.model:
        raise BadRequestError("'model' is required and must be a string", param="model")
    cap = client_cap(kind, body)
    if cap is not None and not (isinstance(cap, int) and not isinstance(cap, bool) and 1 <= cap):
        raise BadRequestError(f"the completion cap must be an integer >= 1, got {cap!r}", param="max_tokens")
    try:  # the checks vLLM runs when it builds the sampling parameters, at the client's own cap
        req.to_sampling_params(min(cap or context_limit_tokens, context_limit_tokens), {})
    except errors as exc:
        raise _bad_request(exc) from None
    if sample_index is not None and not (isinstance(sample_index, int) and not isinstance(sample_index, bool)
                                         and sample_index >= 0):
        raise BadRequestError(f"'{SAMPLE_INDEX_FIELD}' must be an integer >= 0", param=SAMPLE_INDEX_FIELD)
    if kind == "chat":
        texts = [_text_of(m.get("content")) for m in req.messages if isinstance(m, dict)]
        users = [_text_of(m.get("content")) for m in req.messages if isinstance(m, dict) and m.get("role") == "user"]
        prompt = users[-1] if users else (texts[-1] if texts else "")
        count_text = "\n".join(texts)
    else:
        prompts = req.prompt if isinstance(req.prompt, list) else [req.prompt]
        if len(prompts) != 1 or not isinstance(prompts[0], str):
            raise BadRequestError("'prompt' must be one string: send one request per prompt", param="prompt")
        prompt = count_text = prompts[0]
    opts = req.stream_options
    fmt = getattr(req, "response_format", None)
    tools_called = kind == "chat" and bool(req.tools) and req.tool_choice not in (None, "none")
    structured = (tools_called or req.structured_outputs is not None
                  or (fmt is not None and getattr(fmt, "type", "text") != "text"))
    budget = getattr(req, "thinking_token_budget", None)
    return VLLMRequest(
        kind=kind, request=req, model=req.model, prompt=prompt, count_text=count_text,
        max_tokens=None if cap is None else int(cap), n=int(req.n or 1), stream=bool(req.stream),
        include_usage=bool(opts and opts.include_usage), continuous_usage=bool(opts and opts.continuous_usage_stats),
        sample_index=sample_index, min_tokens=int(req.min_tokens or 0), structured=bool(structured),
        thinking_token_budget=None if budget is None or budget < 0 else int(budget),
    )
