"""vLLM's answers relayed to the client as vLLM wrote them, read on the way for the books.

On the vLLM engine the ingress forwards the client's own request with CLEAR's
cap (:mod:`deployments.vllm_protocol`) and relays what comes back: every field
vLLM sets (``tool_calls``, ``logprobs``, ``reasoning_content``, each choice's
``finish_reason``, usage details) reaches the client. What changes on the way:

* ``id`` is the ingress's request id (the one in the logs and the books);
* the ``clear`` object is added: to a whole answer; to a stream's first chunk,
  and to each chunk in which a choice finishes (with ``stopped_by`` for that
  choice);
* what CLEAR asked vLLM for on its own account is removed unless the client
  asked for it too: usage on every chunk (``continuous_usage_stats``, which
  tells the books what a client that leaves mid-stream received) and the final
  usage chunk (``include_usage``);
* under trace replay, a choice's finish reason is the trace's and the
  ``clear`` object says how the trace scores (``on_finish``);
* a streamed tool call its cap cut ends ``"length"``: vLLM streams
  ``"tool_calls"`` for any choice that streamed a call, cut or not, while its
  whole answer to the same request says ``"length"``.

On a reasoning engine usage reports the reasoning tokens
(``completion_tokens_details.reasoning_tokens``), counted here: vLLM counts only
a thought opened in the output, and a reasoning model's template opens it in
the prompt. A whole answer counts each choice's tokens before its end-of-thought
token (vLLM returns the token ids, kept from the client unless it asked for
them); a stream counts each choice's tokens up to its last reasoning delta.

The tokens generated come from vLLM's own usage, per choice (a stream's usage
on a chunk counts that chunk's choice so far), the final usage when it came.
A refusal vLLM answers with (an ``ErrorResponse``, or a ``data: {"error": ...}``
line once the engine runs) is raised as :class:`EngineRefusedError` carrying
vLLM's status and message.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field

from deployments.errors import EngineRefusedError


@dataclass
class Tally:
    """Completion tokens generated per choice, as vLLM reports them; the final usage when it came."""

    per_choice: dict[int, int] = field(default_factory=dict)
    final: int | None = None
    finish: dict[int, str] = field(default_factory=dict)  # choice index -> vLLM's finish reason
    reasoning: dict[int, int] = field(default_factory=dict)  # choice index -> its thought's tokens

    @property
    def tokens(self) -> int:
        return int(self.final) if self.final is not None else sum(self.per_choice.values())


def refusal_in(item) -> EngineRefusedError | None:
    """The refusal in the first thing Ray Serve LLM answers (before anything reached the client), if any: an
    ``ErrorResponse``, or an error line of a stream whose engine refused the request when it started."""
    for entry in item if isinstance(item, list) else [item]:
        refused = _refusal(entry)
        if refused is not None:
            return refused
        if isinstance(entry, str):
            for line in entry.splitlines():
                data = line[len("data:"):].strip() if line.startswith("data:") else ""
                if data.startswith("{") and '"error"' in data:
                    refused = _refusal(json.loads(data))
                    if refused is not None:
                        return refused
    return None


def _refusal(item) -> EngineRefusedError | None:
    """vLLM's ErrorResponse (an object or a dict) as the error to answer with; None if ``item`` is not one."""
    if hasattr(item, "model_dump"):
        item = item.model_dump()
    if isinstance(item, dict) and isinstance(item.get("error"), dict):
        return EngineRefusedError.of(item["error"])
    if isinstance(item, dict) and item.get("object") == "error":
        return EngineRefusedError.of(item)
    return None


#: ``on_finish(vLLM's finish reason, tokens generated) -> (finish reason to report, fields for the clear object)``.
OnFinish = Callable[[str | None, int], tuple[str | None, dict]]


def whole_answer(response, rid: str, clear: dict, stopped_by: Callable[[str | None], str],
                 on_finish: OnFinish | None = None, thought_end_id: int | None = None,
                 keep_token_ids: bool = True) -> tuple[dict, Tally]:
    """A non-streaming answer: vLLM's response with the request id and the ``clear`` object, and its tally.

    ``thought_end_id``: a reasoning engine's end-of-thought token (each choice's ``token_ids`` count its
    thought); ``keep_token_ids``: the client asked for the token ids (else they are removed)."""
    refused = _refusal(response)
    if refused is not None:
        raise refused
    body = response.model_dump() if hasattr(response, "model_dump") else dict(response)
    tally = Tally(final=int((body.get("usage") or {}).get("completion_tokens") or 0))
    if thought_end_id is not None:
        for choice in body.get("choices") or []:
            ids = choice.get("token_ids") or []
            tally.reasoning[int(choice.get("index", 0))] = ids.index(thought_end_id) if thought_end_id in ids else len(ids)
        _report_reasoning(body.get("usage"), tally)
    if not keep_token_ids:
        body.pop("prompt_token_ids", None)
        for choice in body.get("choices") or []:
            choice.pop("token_ids", None)
    extra = {}
    for choice in body.get("choices") or []:
        if on_finish is not None:
            choice["finish_reason"], extra = on_finish(choice.get("finish_reason"), tally.tokens)
        tally.finish[int(choice.get("index", 0))] = choice.get("finish_reason")
    # One choice cut by its cap makes the group's answer cut: the choices' own finish_reason say which.
    cut = [stopped_by(f) for f in tally.finish.values() if stopped_by(f) != "natural_stop"]
    body["id"] = rid
    body["clear"] = dict(clear, **extra, stopped_by=cut[0] if cut else "natural_stop")
    return body, tally


def _report_reasoning(usage: dict | None, tally: Tally) -> None:
    if usage is not None and tally.reasoning:
        details = usage.get("completion_tokens_details") or {}
        details["reasoning_tokens"] = sum(tally.reasoning.values())
        usage["completion_tokens_details"] = details


class StreamRelay:
    """Relays one vLLM stream: :meth:`feed` takes what Ray Serve LLM yields and returns the SSE lines to send."""

    def __init__(self, rid: str, clear: dict, stopped_by: Callable[[str | None], str], *, include_usage: bool,
                 continuous_usage: bool, on_finish: OnFinish | None = None, count_reasoning: bool = False,
                 cap: int | None = None):
        self.rid = rid
        self.clear = clear
        self.stopped_by = stopped_by
        self.include_usage = include_usage
        self.continuous_usage = continuous_usage
        self.on_finish = on_finish
        self.count_reasoning = count_reasoning
        self.cap = cap  # each choice's max_tokens
        self.tally = Tally()
        self.done = False  # vLLM's [DONE] arrived
        self._first = True

    def feed(self, item) -> list[str]:
        out = []
        for entry in item if isinstance(item, list) else [item]:
            refused = _refusal(entry)
            if refused is not None:
                raise refused
            for line in str(entry).splitlines():
                if not line.startswith("data:"):
                    continue
                data = line[len("data:"):].strip()
                if data == "[DONE]":
                    self.done = True
                    continue
                if not data:
                    continue
                chunk = self._relay(json.loads(data))
                if chunk is not None:
                    out.append(f"data: {json.dumps(chunk)}\n\n")
        return out

    def _relay(self, chunk: dict) -> dict | None:
        refused = _refusal(chunk)
        if refused is not None:
            raise refused
        choices = chunk.get("choices") or []
        usage = chunk.get("usage")
        if not choices:  # the final usage chunk
            if usage is not None:
                self.tally.final = int(usage.get("completion_tokens") or 0)
                if self.count_reasoning:
                    _report_reasoning(usage, self.tally)
            if not self.include_usage:
                return None
        elif usage is not None:
            for choice in choices:  # continuous usage counts the chunk's choice
                index = int(choice.get("index", 0))
                self.tally.per_choice[index] = int(usage.get("completion_tokens") or 0)
                delta = choice.get("delta") or {}
                if self.count_reasoning and (delta.get("reasoning") or delta.get("reasoning_content")):
                    self.tally.reasoning[index] = self.tally.per_choice[index]
            if not self.continuous_usage:
                chunk.pop("usage", None)
        chunk["id"] = self.rid
        finished, extra = [], {}
        for choice in choices:
            reason = choice.get("finish_reason")
            if reason is None:
                continue
            index = int(choice.get("index", 0))
            if reason == "tool_calls" and self.cap is not None and self.tally.per_choice.get(index, 0) >= self.cap:
                reason = choice["finish_reason"] = "length"  # vLLM streams "tool_calls" for a call its cap cut
            if self.on_finish is not None:
                reason, extra = self.on_finish(reason, self.tally.tokens)
                choice["finish_reason"] = reason
            self.tally.finish[index] = reason
            finished.append(self.stopped_by(reason))
        if finished:
            chunk["clear"] = dict(self.clear, **extra, stopped_by=finished[0])
        elif self._first:
            chunk["clear"] = self.clear
        self._first = False
        return chunk
