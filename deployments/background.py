"""Background loops of a deployment replica, and ending them when the replica stops."""

from __future__ import annotations

import asyncio


def cancel_on_stop(task: asyncio.Task | None) -> None:
    """Cancel a replica's background loop from ``__del__`` (Serve deletes the replica when it stops).

    Without it asyncio reports the still-pending task, with its stack, at
    shutdown. A replica collected after its event loop closed has nothing left
    to stop.
    """
    if task is not None and not task.done():
        try:
            task.cancel()
        except RuntimeError:
            pass


def stop_if_cancelled() -> None:
    """Raise CancelledError in a background loop whose task was cancelled but did not see it.

    On Python 3.11 ``asyncio.wait_for`` swallows a cancellation that arrives as
    its inner await completes (fixed in 3.12). A ``while True`` loop around it
    then never ends: ``asyncio.run`` and a replica's shutdown wait for it
    forever. The task still counts the request (``Task.cancelling()``), so each
    loop checks it once a round.
    """
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError
