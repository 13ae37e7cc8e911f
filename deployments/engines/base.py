"""The interface every engine implements, and the records passed through it.

The ingress sends an :class:`EngineRequest` (plain dataclass, pickled over a
Serve handle) and iterates the :class:`EngineChunk` stream it gets back. The
last chunk carries ``finish_reason`` and the final token count; the ingress
settles the request's reservation with the tokens the chunks report (or, if
the stream breaks, with what it received so far).
"""

from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator
from dataclasses import dataclass, field


@dataclass(frozen=True)
class EngineRequest:
    request_id: str  # the ingress's id, also the ledger reservation id
    kind: str  # "chat" or "completion"
    prompt: str  # the problem text (last user message, or the completion prompt)
    messages: tuple[dict, ...] | None  # chat: the full message list as sent
    cap_tokens: int  # the engine's cap: min(client's max_tokens, CLEAR cap), tokens
    model: str  # model id the client asked for
    sample_index: int | None = None  # replay: which recorded sample to replay
    sampling: dict = field(default_factory=dict)  # temperature, top_p, stop, seed ... passed through
    stream: bool = True  # the client streams; False lets an engine answer in one piece


@dataclass(frozen=True)
class EngineChunk:
    text: str  # newly generated text
    tokens: int  # tokens in this chunk
    finish_reason: str | None = None  # "stop" or "length" on the last chunk
    info: dict | None = None  # engine extras on the last chunk (replay: problem_id, sample_index, solved)


class Engine(ABC):
    """``generate(request)`` streams the completion of one request, never beyond ``cap_tokens``."""

    @abstractmethod
    def generate(self, request: EngineRequest) -> AsyncIterator[EngineChunk]:
        """Stream the completion of ``request``.

        Implementations must stop at ``request.cap_tokens`` tokens, must end the
        stream with exactly one chunk whose ``finish_reason`` is set, and raise
        (rather than end quietly) when generation fails, so the ingress can tell
        an engine error from a finished request.
        """


class DeploymentEngine(Engine):
    """An :class:`Engine` deployed on its own (the replay engine), reached through its Serve handle.

    Cancelling the consumer (a client that leaves) cancels the remote stream.
    """

    def __init__(self, handle):
        self.handle = handle

    async def generate(self, request: EngineRequest) -> AsyncIterator[EngineChunk]:
        gen = self.handle.options(stream=True).generate.remote(request)
        try:
            async for chunk in gen:
                yield chunk
        except (asyncio.CancelledError, GeneratorExit):
            gen.cancel()
            raise
