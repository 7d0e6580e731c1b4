"""Keeping a session's snapshot as a run writes (:mod:`thoughtwire.shared.snapshots`).

An attempt tells its keeper the session's last seq after each written batch. Every
:data:`~thoughtwire.shared.snapshots.SNAPSHOT_EVERY` events, and once more as the run
ends, the keeper brings the snapshot up to the log's end: it reads the stored one,
folds the log's tail onto it and writes it back forward-only. One save at a time per
attempt, off the writer's path: the agent never waits for it, and a save that fails
(Redis away) is only logged, since the next one, or a frontend's join, goes on from the
log.
"""

from __future__ import annotations

import asyncio
import logging

from thoughtwire.shared.backoff import UNAVAILABLE
from thoughtwire.shared.bus import Bus
from thoughtwire.shared.snapshots import SNAPSHOT_EVERY, save

logger = logging.getLogger("thoughtwire.snapshots")

CLOSE_SECONDS = 5.0  # how long an ending attempt waits for its last save


class SnapshotKeeper:
    """One attempt's snapshot saves: at most one in flight, every ``every`` events."""

    def __init__(self, bus: Bus, session: str, every: int = SNAPSHOT_EVERY) -> None:
        self.bus = bus
        self.session = session
        self.every = every
        self._saved_at = 0  # the seq the last save started at
        self._last = 0  # the session's last seq this attempt wrote
        self._task: asyncio.Task[None] | None = None

    def written(self, seq: int) -> None:
        """The session's log stands at ``seq`` after a batch of this attempt's."""
        self._last = max(self._last, seq)
        if self._saved_at == 0:
            self._saved_at = seq  # the first batch: count from here
        if self._last - self._saved_at >= self.every and self._idle():
            self._start()

    async def close(self, ended: bool) -> None:
        """Wait for the save under way; then, if the run ended, save its end too."""
        try:
            async with asyncio.timeout(CLOSE_SECONDS):
                if self._task is not None:
                    await asyncio.gather(self._task, return_exceptions=True)
                if ended and self._last > 0:
                    self._start()
                    assert self._task is not None
                    await asyncio.gather(self._task, return_exceptions=True)
        except TimeoutError:
            logger.warning("session %s: the last snapshot save did not finish", self.session)
        finally:
            if self._task is not None:
                self._task.cancel()

    def _idle(self) -> bool:
        return self._task is None or self._task.done()

    def _start(self) -> None:
        self._saved_at = self._last
        self._task = asyncio.get_running_loop().create_task(
            self._save(), name=f"snapshot-{self.session}"
        )

    async def _save(self) -> None:
        try:
            await save(self.bus, self.session)
        except asyncio.CancelledError:
            raise
        except UNAVAILABLE:
            logger.info("session %s: Redis away, snapshot left for later", self.session)
        except Exception:
            logger.exception("session %s: saving a snapshot failed", self.session)
