"""Batches of the prompts that wait while the encoder is busy.

:class:`WaitingBatches` runs one batch at a time. A prompt that arrives while the
encoder is idle starts a batch at once (after ``wait_s``, 0 by default); the
prompts that arrive while a batch runs form the next one, up to ``max_size``.
At low load every prompt is its own batch and waits for nobody; under load the
batches grow with the queue, which is where batching pays.

Ray Serve's ``@serve.batch`` is not used: it forms the next batch as soon as one
prompt arrives and only then waits for the running batch to finish
(``ray/serve/batching.py``, ``_BatchQueue._process_batches``), so under load its
batches hold about one prompt each whatever is waiting (design notes, "The
predictor on the request path").
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")


class WaitingBatches(Generic[T, R]):
    """``await batches(item)`` -> ``run(batch)[i]`` for the item's place ``i`` in its batch.

    ``run`` takes a list of items and returns one result per item, in order; if it raises, every item of that
    batch gets the exception. A caller that is cancelled leaves its item out of the batches still to run.
    Single event loop: all calls come from the loop the first call ran on.
    """

    def __init__(self, run: Callable[[list[T]], Awaitable[Sequence[R]]], max_size: int, wait_s: float = 0.0):
        if max_size < 1:
            raise ValueError(f"max_size must be at least 1, got {max_size}")
        if wait_s < 0:
            raise ValueError(f"wait_s must be at least 0, got {wait_s}")
        self.run = run
        self.max_size = int(max_size)
        self.wait_s = float(wait_s)
        self._waiting: deque[tuple[T, asyncio.Future]] = deque()
        self._worker: asyncio.Task | None = None
        #: Batches run and items in them (their ratio is the mean batch size).
        self.batches = 0
        self.items = 0

    async def __call__(self, item: T) -> R:
        fut = asyncio.get_running_loop().create_future()
        self._waiting.append((item, fut))
        if self._worker is None or self._worker.done():
            self._worker = asyncio.create_task(self._drain())
        return await fut

    async def _drain(self) -> None:
        while self._waiting:
            if self.wait_s > 0 and len(self._waiting) < self.max_size:
                await asyncio.sleep(self.wait_s)
            batch = []
            while self._waiting and len(batch) < self.max_size:
                item, fut = self._waiting.popleft()
                if not fut.done():  # a cancelled caller's item is not computed
                    batch.append((item, fut))
            if not batch:
                continue
            self.batches += 1
            self.items += len(batch)
            try:
                results = await self.run([item for item, _ in batch])
                if len(results) != len(batch):
                    raise ValueError(f"a batch of {len(batch)} items gave {len(results)} results")
            except asyncio.CancelledError:  # the loop is closing: nobody is left waiting forever
                for _, fut in (*batch, *self._waiting):
                    fut.cancel()
                self._waiting.clear()
                raise
            except Exception as exc:  # noqa: BLE001 - every caller of the batch gets it
                for _, fut in batch:
                    if not fut.done():
                        fut.set_exception(exc)
                continue
            for (_, fut), result in zip(batch, results):
                if not fut.done():
                    fut.set_result(result)
