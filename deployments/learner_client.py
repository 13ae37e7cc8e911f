"""The other replicas' side of the length learner (:mod:`deployments.learner`).

* :class:`ModelFollower`: a predictor, allocator or ingress replica polls the
  learner every ``learner.advanced.poll_s`` for a model newer than its own and
  applies it (the predictor's head and calibration, the markets' length
  histograms). An unreachable learner leaves the replica on the model it has.
* :class:`ObservationSender`: an ingress replica buffers the records of its
  settled requests and sends them to the learner in batches, off the request
  path. The buffer is bounded: while the learner is unreachable the oldest
  records are dropped (and counted), never a request delayed.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import asdict

from clear_core.length_model import LengthModel
from deployments.background import cancel_on_stop, stop_if_cancelled

logger = logging.getLogger("ray.serve")

#: Records per batch sent to the learner, and the longest a record waits for its batch, s.
SEND_BATCH = 64
SEND_AFTER_S = 2.0
#: Most records an ingress replica buffers while the learner is unreachable.
MAX_BUFFERED = 20_000


class ModelFollower:
    """Polls the learner for a newer length model and hands it to ``apply`` (module docstring)."""

    def __init__(self, learner, poll_s: float, apply, version: int = 0):
        self.learner = learner
        self.poll_s = float(poll_s)
        self.apply = apply
        self.version = int(version)
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        """Start polling (from a running event loop; a second call does nothing)."""
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._loop())

    async def poll(self) -> bool:
        """Ask once; True when a new model was applied."""
        doc = await self.learner.model.remote(self.version)
        if doc is None:
            return False
        model = LengthModel.from_dict(doc)
        self.apply(model)
        self.version = model.version
        return True

    async def _loop(self) -> None:
        while True:
            stop_if_cancelled()
            try:
                await self.poll()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the learner restarting or gone: keep the model in hand, ask again later
                logger.debug("length model poll failed: %s", exc)
            await asyncio.sleep(self.poll_s)

    def stop(self) -> None:
        cancel_on_stop(self._task)


class ObservationSender:
    """Batches traffic records to the learner (module docstring)."""

    def __init__(self, learner):
        self.learner = learner
        self._buffer: list[dict] = []
        self._oldest = 0.0
        self._sending: asyncio.Task | None = None
        self._timer: asyncio.TimerHandle | None = None  # sends a batch that no later record fills
        self.dropped = 0
        self.sent = 0

    def add(self, record) -> None:
        """Buffer one :class:`~deployments.traffic_log.TrafficRecord`; send a full or old batch in the background."""
        if not self._buffer:
            self._oldest = time.monotonic()
        self._buffer.append(asdict(record))
        if len(self._buffer) > MAX_BUFFERED:
            drop = len(self._buffer) - MAX_BUFFERED
            del self._buffer[:drop]
            self.dropped += drop
        if len(self._buffer) >= SEND_BATCH or time.monotonic() - self._oldest >= SEND_AFTER_S:
            self._kick()
        elif self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(SEND_AFTER_S, self._kick)

    def _kick(self) -> None:
        self._timer = None
        if not self._buffer:
            return
        if self._sending is None or self._sending.done():
            self._sending = asyncio.get_running_loop().create_task(self.send())
        else:  # a send is under way: look again when this batch's time is up
            self._timer = asyncio.get_running_loop().call_later(SEND_AFTER_S, self._kick)

    async def send(self) -> int:
        """Send what is buffered; how many records the learner took (0: nothing buffered, or it failed)."""
        batch, self._buffer = self._buffer, []
        if not batch:
            return 0
        try:
            await self.learner.observe.remote(batch)
        except Exception as exc:  # back in front of the buffer; the bound drops the oldest if this persists
            logger.debug("traffic records not sent to the learner: %s", exc)
            self._buffer = batch + self._buffer
            if len(self._buffer) > MAX_BUFFERED:
                drop = len(self._buffer) - MAX_BUFFERED
                del self._buffer[:drop]
                self.dropped += drop
            return 0
        self.sent += len(batch)
        return len(batch)

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        cancel_on_stop(self._sending)
