"""OpenAI request parsing/validation and response bodies (chat, completions, SSE chunks, errors).

Parsing is explicit rather than a pydantic model so that every refusal names
the bad field in a clear message and maps to the project's error types. Every
check here runs before any budget is reserved:

* the body: JSON (a declared non-JSON ``Content-Type`` is a 415), an object,
  nested at most :data:`MAX_JSON_DEPTH` deep, every string valid Unicode;
* fields: those the replay engine honours (:data:`CHAT_FIELDS`, :data:`COMPLETION_FIELDS`)
  with OpenAI's ranges, among them vLLM's ``ignore_eos`` (generate the whole cap) and
  ``min_tokens`` (at least this many); vLLM's sampling extensions, which change
  nothing a replay generates, pass (:data:`VLLM_SAMPLING`); what a replay cannot
  emulate (:data:`UNSUPPORTED`: tools, logprobs, response formats, ``n > 1``...)
  is refused with a 400 naming the field unless it carries its default value
  (``"logprobs": false``), and so is any field neither OpenAI nor vLLM knows
  ("Unrecognized request argument");
* chat roles: system, developer, user, assistant (tool messages need tools).

Sampling fields pass to the engine as given (they are in range).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field

from deployments.errors import BadRequestError, BudgetAbandonedError, ClearError, UnsupportedMediaTypeError

SAMPLE_INDEX_FIELD = "clear_sample_index"
#: Sampling fields passed through to the engine, each with its check.
PASSTHROUGH = ("temperature", "top_p", "stop", "seed", "presence_penalty", "frequency_penalty", "user", "logit_bias")
#: vLLM's extensions the replay engine honours: the whole cap (ignore_eos), at least this many tokens (min_tokens).
HONOURED = ("ignore_eos", "min_tokens")
#: vLLM's sampling and formatting extensions: they change what a model samples or how its prompt is templated,
#: never the recorded lengths a replay generates, so they pass (and are not checked beyond their JSON type).
VLLM_SAMPLING = frozenset({
    "top_k", "min_p", "repetition_penalty", "length_penalty", "stop_token_ids", "bad_words", "allowed_token_ids",
    "include_stop_str_in_output", "skip_special_tokens", "spaces_between_special_tokens", "chat_template_kwargs",
    "add_generation_prompt", "continue_final_message", "add_special_tokens", "documents", "mm_processor_kwargs",
    "include_reasoning", "repetition_detection", "return_token_ids", "cache_salt", "parallel_tool_calls",
})
_COMMON_FIELDS = frozenset({"model", "max_tokens", "n", "stream", "stream_options", *PASSTHROUGH, *HONOURED,
                            *VLLM_SAMPLING, SAMPLE_INDEX_FIELD})
CHAT_FIELDS = _COMMON_FIELDS | {"messages", "max_completion_tokens"}
COMPLETION_FIELDS = _COMMON_FIELDS | {"prompt"}
#: OpenAI and vLLM fields a replay cannot emulate -> the values that mean "not used" (accepted).
UNSUPPORTED: dict[str, tuple] = {
    "logprobs": (None, False, 0), "top_logprobs": (None, 0), "echo": (None, False), "best_of": (None, 1),
    "suffix": (None, ""), "tools": (None, []), "tool_choice": (None, "none"),
    "functions": (None, []), "function_call": (None, "none"), "response_format": (None, {"type": "text"}),
    "audio": (None,), "modalities": (None, ["text"]), "prediction": (None,), "reasoning_effort": (None,),
    "web_search_options": (None,), "store": (None, False), "metadata": (None, {}), "service_tier": (None, "auto", "default"),
    "structured_outputs": (None,), "prompt_logprobs": (None, 0), "use_beam_search": (None, False),
    "thinking_token_budget": (None, -1), "truncate_prompt_tokens": (None,), "logprob_token_ids": (None,),
}
CHAT_ROLES = ("system", "developer", "user", "assistant")
MESSAGE_FIELDS = frozenset({"role", "content", "name"})
MAX_JSON_DEPTH = 32
MAX_STOP_SEQUENCES = 4


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
    n: int = 1  # choices (the replay engine serves one)

    @property
    def min_tokens(self) -> int:
        return int(self.sampling.get("min_tokens") or 0)


def decode_body(raw: bytes, content_type: str | None) -> dict:
    """The JSON object of a request body, or the 4xx that says why not."""
    if content_type:
        media = content_type.split(";", 1)[0].strip().lower()
        if media != "application/json" and not media.endswith("+json"):
            raise UnsupportedMediaTypeError(f"Content-Type must be application/json, got {media!r}")
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BadRequestError(f"the request body is not valid JSON: {exc}") from None
    except RecursionError:
        raise BadRequestError(f"the request body is nested more than {MAX_JSON_DEPTH} levels deep") from None
    if not isinstance(body, dict):
        raise BadRequestError("the request body must be a JSON object")
    _check_json(body, 0, "body")
    return body


def _check_json(value, depth: int, where: str) -> None:
    """Nesting depth and valid Unicode (an unpaired surrogate cannot be tokenized or sent on)."""
    if depth > MAX_JSON_DEPTH:
        raise BadRequestError(f"the request body is nested more than {MAX_JSON_DEPTH} levels deep")
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise BadRequestError(f"{where} contains invalid Unicode (an unpaired surrogate)") from None
    elif isinstance(value, dict):
        for k, v in value.items():
            _check_json(k, depth + 1, where)
            _check_json(v, depth + 1, f"{where}.{k}" if depth == 0 else where)
    elif isinstance(value, list):
        for v in value:
            _check_json(v, depth + 1, where)


def _check_fields(body: dict, known: frozenset) -> None:
    for name, value in body.items():
        if name in known:
            continue
        if name in UNSUPPORTED:
            if value not in UNSUPPORTED[name]:
                raise BadRequestError(f"'{name}' is not supported by the replay engine (it replays recorded lengths); "
                                      "serve a vLLM engine for it, or remove it", param=name)
            continue
        raise BadRequestError(f"Unrecognized request argument supplied: {name}", param=name)


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


def _number_field(body: dict, name: str, lo: float, hi: float) -> None:
    v = body.get(name)
    if v is None:
        return
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not lo <= v <= hi:
        raise BadRequestError(f"'{name}' must be a number between {lo:g} and {hi:g}, got {v!r}", param=name)


def _check_sampling(body: dict) -> dict:
    """OpenAI's ranges for the sampling fields passed to the engine."""
    _number_field(body, "temperature", 0.0, 2.0)
    _number_field(body, "top_p", 0.0, 1.0)
    _number_field(body, "presence_penalty", -2.0, 2.0)
    _number_field(body, "frequency_penalty", -2.0, 2.0)
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or abs(seed) >= 2**63):
        raise BadRequestError(f"'seed' must be a 64-bit integer, got {seed!r}", param="seed")
    stop = body.get("stop")
    if stop is not None:
        stops = [stop] if isinstance(stop, str) else stop
        if not (isinstance(stops, list) and len(stops) <= MAX_STOP_SEQUENCES and all(isinstance(x, str) and x for x in stops)):
            raise BadRequestError(f"'stop' must be a non-empty string or a list of at most {MAX_STOP_SEQUENCES} "
                                  "non-empty strings", param="stop")
    user = body.get("user")
    if user is not None and not isinstance(user, str):
        raise BadRequestError("'user' must be a string", param="user")
    bias = body.get("logit_bias")
    if bias is not None:
        ok = isinstance(bias, dict) and all(
            isinstance(k, str) and k.isdigit() and not isinstance(v, bool) and isinstance(v, (int, float))
            and -100 <= v <= 100 for k, v in bias.items())
        if not ok:
            raise BadRequestError("'logit_bias' must map token ids to numbers between -100 and 100", param="logit_bias")
    if body.get("ignore_eos") is not None and not isinstance(body["ignore_eos"], bool):
        raise BadRequestError("'ignore_eos' must be a boolean", param="ignore_eos")
    _int_field(body, "min_tokens", 0, None)
    # vLLM's extensions go to the engine too: a vLLM engine applies them, the replay engine has no use for them.
    return {k: body[k] for k in (*PASSTHROUGH, *HONOURED, *sorted(VLLM_SAMPLING)) if body.get(k) is not None}


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
        return "\n".join(parts)  # as vLLM joins text parts for a string-content chat template
    if content is None:
        return ""
    raise BadRequestError(f"{where}: content must be a string or a list of text parts", param="messages")


def _common(body: dict, context_limit_tokens: int, known: frozenset) -> dict:
    _check_fields(body, known)
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise BadRequestError("'model' is required and must be a string", param="model")
    if body.get("n") not in (None, 1):
        raise BadRequestError("'n' must be 1 on the replay engine (one recorded sample per request); "
                              "serve a vLLM engine for more choices", param="n")
    mt = _int_field(body, "max_tokens", 1, context_limit_tokens)
    mct = _int_field(body, "max_completion_tokens", 1, context_limit_tokens)
    max_tokens = mct if mct is not None else mt
    stream = body.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise BadRequestError(f"'stream' must be a boolean, got {stream!r}", param="stream")
    opts = body.get("stream_options")
    if opts is not None and not stream:
        raise BadRequestError("'stream_options' is only allowed when 'stream' is true", param="stream_options")
    opts = opts or {}
    if (not isinstance(opts, dict) or set(opts) - {"include_usage", "continuous_usage_stats"}
            or not all(isinstance(v, bool) for v in opts.values())):
        raise BadRequestError("'stream_options' must be an object with booleans 'include_usage' and "
                              "'continuous_usage_stats'", param="stream_options")
    sample = _int_field(body, SAMPLE_INDEX_FIELD, 0, None)
    sampling = _check_sampling(body)
    if max_tokens is not None and sampling.get("min_tokens", 0) > max_tokens:
        raise BadRequestError(f"'min_tokens' ({sampling['min_tokens']}) must not exceed the request's own cap "
                              f"({max_tokens})", param="min_tokens")
    return dict(
        model=model, max_tokens=max_tokens, stream=stream, include_usage=bool(opts.get("include_usage", False)),
        sample_index=sample, sampling=sampling,
    )


def parse_chat(body, context_limit_tokens: int) -> ParsedRequest:
    if not isinstance(body, dict):
        raise BadRequestError("the request body must be a JSON object")
    common = _common(body, context_limit_tokens, CHAT_FIELDS)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadRequestError("'messages' is required and must be a non-empty list", param="messages")
    texts, user_text = [], None
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise BadRequestError(f"messages[{i}] must be an object with a 'role'", param="messages")
        if m["role"] not in CHAT_ROLES:
            raise BadRequestError(f"messages[{i}].role must be one of {', '.join(CHAT_ROLES)}, got {m['role']!r}",
                                  param="messages")
        extra = set(m) - MESSAGE_FIELDS
        if extra:
            raise BadRequestError(f"messages[{i}] has fields this server does not support: {', '.join(sorted(extra))}",
                                  param="messages")
        if m.get("name") is not None and not isinstance(m["name"], str):
            raise BadRequestError(f"messages[{i}].name must be a string", param="messages")
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
    if not isinstance(body, dict):
        raise BadRequestError("the request body must be a JSON object")
    common = _common(body, context_limit_tokens, COMPLETION_FIELDS)
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
        err["should_retry"] = exc.should_retry
        err["predicted_threshold_tokens"] = exc.threshold_tokens
    return {"error": err}


def retry_headers(exc: ClearError) -> dict | None:
    """``Retry-After`` and ``x-should-retry`` (honoured by the ``openai`` client) for errors that carry them."""
    retry_after = getattr(exc, "retry_after_s", None)
    if retry_after is None:
        return None
    return {"Retry-After": str(max(1, math.ceil(retry_after))),
            "x-should-retry": "true" if getattr(exc, "should_retry", False) else "false"}


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
