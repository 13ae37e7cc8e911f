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
