"""OpenAI request parsing/validation and response bodies (chat, completions, SSE chunks, errors).

Parsing is explicit rather than a pydantic model so that every refusal names
the bad field in a clear message and maps to the project's error types; fields
this server does not use (temperature, top_p, stop, seed, user...) are passed
through to the engine untouched.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field

from deployments.errors import BadRequestError, BudgetAbandonedError, ClearError

#: Sampling fields passed through to the engine.
PASSTHROUGH = ("temperature", "top_p", "stop", "seed", "presence_penalty", "frequency_penalty", "user", "logit_bias")
SAMPLE_INDEX_FIELD = "clear_sample_index"


@dataclass(frozen=True)
class ParsedRequest:
    kind: str  # "chat" or "completion"
    model: str  # model id asked for
    prompt: str  # the text the predictor and the replay engine key on
    count_text: str  # all the prompt text, for the context-length check
    messages: tuple[dict, ...] | None  # chat messages as sent
    max_tokens: int | None  # client's cap, tokens (None: CLEAR decides alone)
    stream: bool
    include_usage: bool  # stream_options.include_usage
    sample_index: int | None  # replay: recorded sample to replay
    sampling: dict = field(default_factory=dict)


def _int_field(body: dict, name: str, lo: int, hi: int | None) -> int | None:
    v = body.get(name)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int):
        if isinstance(v, float) and v.is_integer():
            v = int(v)
        else:
            raise BadRequestError(f"'{name}' must be an integer, got {v!r}", param=name)
    if v < lo or (hi is not None and v > hi):
        bound = f"between {lo} and {hi}" if hi is not None else f">= {lo}"
        raise BadRequestError(f"'{name}' must be {bound}, got {v}", param=name)
    return v


def _content_text(content, where: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str):
                parts.append(part["text"])
            else:
                raise BadRequestError(f"{where}: only text content parts are supported", param="messages")
        return "".join(parts)
    if content is None:
        return ""
    raise BadRequestError(f"{where}: content must be a string or a list of text parts", param="messages")


def _common(body: dict, context_limit_tokens: int) -> dict:
    if not isinstance(body, dict):
        raise BadRequestError("the request body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise BadRequestError("'model' is required and must be a string", param="model")
    n = _int_field(body, "n", 1, 1)
    del n  # only n=1 is supported; _int_field refused anything else
    mt = _int_field(body, "max_tokens", 1, context_limit_tokens)
    mct = _int_field(body, "max_completion_tokens", 1, context_limit_tokens)
    max_tokens = mct if mct is not None else mt
    stream = body.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise BadRequestError(f"'stream' must be a boolean, got {stream!r}", param="stream")
    opts = body.get("stream_options") or {}
    if not isinstance(opts, dict):
        raise BadRequestError("'stream_options' must be an object", param="stream_options")
    sample = _int_field(body, SAMPLE_INDEX_FIELD, 0, None)
    sampling = {k: body[k] for k in PASSTHROUGH if body.get(k) is not None}
    return dict(
        model=model, max_tokens=max_tokens, stream=stream, include_usage=bool(opts.get("include_usage", False)),
        sample_index=sample, sampling=sampling,
    )


def parse_chat(body, context_limit_tokens: int) -> ParsedRequest:
    common = _common(body, context_limit_tokens)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadRequestError("'messages' is required and must be a non-empty list", param="messages")
    texts, user_text = [], None
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise BadRequestError(f"messages[{i}] must be an object with a 'role'", param="messages")
        text = _content_text(m.get("content"), f"messages[{i}]")
        texts.append(text)
        if m["role"] == "user":
            user_text = text
    if user_text is None or not user_text.strip():
        raise BadRequestError("'messages' must contain a non-empty user message", param="messages")
    return ParsedRequest(
        kind="chat", prompt=user_text, count_text="\n".join(texts), messages=tuple(messages), **common
    )


def parse_completion(body, context_limit_tokens: int) -> ParsedRequest:
    common = _common(body, context_limit_tokens)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if isinstance(prompt, list):
        raise BadRequestError("'prompt' must be one string (batched prompts are not supported)", param="prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise BadRequestError("'prompt' is required and must be a non-empty string", param="prompt")
    return ParsedRequest(kind="completion", prompt=prompt, count_text=prompt, messages=None, **common)


# -- responses -------------------------------------------------------------------


def error_body(exc: ClearError) -> dict:
    err = {"message": str(exc), "type": exc.error_type, "param": getattr(exc, "param", None), "code": exc.error_type}
    if isinstance(exc, BudgetAbandonedError):
        err["shadow_price"] = exc.shadow_price
        err["retry_after_s"] = exc.retry_after_s
        err["predicted_threshold_tokens"] = exc.threshold_tokens
    return {"error": err}


def retry_after_header(exc: BudgetAbandonedError) -> str:
    return str(max(1, math.ceil(exc.retry_after_s)))


def completion_body(req: ParsedRequest, rid: str, text: str, finish: str | None, prompt_tokens: int, completion_tokens: int, clear: dict) -> dict:
    created = int(time.time())
    if req.kind == "chat":
        choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish, "logprobs": None}
        obj = "chat.completion"
    else:
        choice = {"index": 0, "text": text, "finish_reason": finish, "logprobs": None}
        obj = "text_completion"
    return {
        "id": rid,
        "object": obj,
        "created": created,
        "model": req.model,
        "choices": [choice],
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens, "total_tokens": prompt_tokens + completion_tokens},
        "clear": clear,
    }


def sse_chunk(req: ParsedRequest, rid: str, created: int, text: str | None, finish: str | None, *, first: bool = False, clear: dict | None = None, usage: dict | None = None) -> str:
    if req.kind == "chat":
        obj = "chat.completion.chunk"
        if usage is not None and text is None and finish is None:
            choices = []
        else:
            delta = {"role": "assistant", "content": text or ""} if first else ({"content": text} if text else {})
            choices = [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]
    else:
        obj = "text_completion"
        choices = [] if (usage is not None and text is None and finish is None) else [
            {"index": 0, "text": text or "", "finish_reason": finish, "logprobs": None}
        ]
    data = {"id": rid, "object": obj, "created": created, "model": req.model, "choices": choices}
    if clear is not None:
        data["clear"] = clear
    if usage is not None:
        data["usage"] = usage
    return f"data: {json.dumps(data)}\n\n"


def sse_error(exc: ClearError) -> str:
    return f"data: {json.dumps(error_body(exc))}\n\n"


SSE_DONE = "data: [DONE]\n\n"
