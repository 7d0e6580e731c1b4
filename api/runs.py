"""The runs a frontend queued, followed until they end; a run whose state Redis lost is ended here.

A job lives only in Redis. When Redis loses its data (FLUSHALL, a restart with nothing
to load) while a run is queued, the job goes with the jobs stream: no worker will ever
take it, and nothing in Redis remembers it. The frontend that queued it still does, so
it follows its runs until they end, in a bounded table, checking their statuses every
third of a lease in one pipelined call.

A run whose state is missing is not ended at once: an attempt that is alive takes the
state back (its lease renewal or its next append re-owns it, :mod:`thoughtwire.shared.scripts`),
and it renews every third of a lease. So a state missing on checks a whole lease apart
means no attempt holds the run (it was queued, or its worker died too): the frontend
then writes the terminal ``error`` with ``END_LOST``, which acts only while the state is
missing and starts a new epoch when the log went too, so watchers get a ``gap``, then
the ``error``; and its job record, so ``GET /v1/jobs/{id}`` says ``failed``.

A run's end is announced on ``Keys.runs_ended`` by the script that writes it, and the
table, listening there through the hub, lets the run go at once: a loss that lands
after a run ended but before the next check would otherwise look like a lost run, and
its watchers would get a ``gap`` and an ``error`` after their ``done``. An announcement
missed (the pub/sub connection was down) leaves the run to the next check.

Guarantee: a run this frontend queued ends with one terminal event within about two
leases of Redis coming back, as long as this frontend lives and follows it (the table
holds ``tracked_runs``; past that the oldest is let go).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict
from dataclasses import dataclass

from thoughtwire.api.hub import Run
from thoughtwire.shared.bus import Bus
from thoughtwire.shared.protocol import TERMINAL_STATUS, Thought
from thoughtwire.shared.redis import RedisError

logger = logging.getLogger("thoughtwire.runs")

LOST_MESSAGE = "the run was lost: the service lost its queued work; try again"
CHECK_BATCH = 1000  # statuses read per call
ENDED = frozenset(TERMINAL_STATUS.values())


@dataclass(slots=True)
class _Followed:
    session: str
    user: str | None = None  # whose run slot it holds, freed if it is ended as lost
    missing_since: float | None = None  # monotonic time its state was first seen missing


class Runs:
    """The runs this frontend queued, until they end; ends those whose state Redis lost."""

    def __init__(self, bus: Bus, *, limit: int, lease_seconds: float) -> None:
        self.bus = bus
        self.limit = limit
        self.lease_seconds = lease_seconds
        self._runs: OrderedDict[str, _Followed] = OrderedDict()
        self.ended = 0  # runs this frontend ended because their state was lost
        self.let_go = 0  # runs no longer followed because the table was full

    def __len__(self) -> int:
        return len(self._runs)

    def deliver(self, frame: str, position: object = None, wire: object = None) -> None:
        """From the hub: a run ended (its id, announced with its terminal event)."""
        self._runs.pop(frame, None)

    def deliver_run(self, run: Run) -> None:
        """From the hub: runs that ended, announced one after the other."""
        for frame in run.frames:
            self._runs.pop(frame, None)

    def resync(self) -> None:
        """Announcements may have been missed: the next check reads every status anyway."""

    def close(self, code: int, reason: str) -> None:
        """A draining frontend closes its viewers; this follows runs till the process ends."""

    def follow(self, session: str, run: str, user: str | None = None) -> None:
        """Follow ``run`` until it ends (a repeat changes nothing)."""
        if run in self._runs:
            return
        if len(self._runs) >= self.limit:
            self._runs.popitem(last=False)
            self.let_go += 1
        self._runs[run] = _Followed(session, user)

    async def check(self, now: float | None = None) -> None:
        """One pass: forget the runs that ended, end those whose state stayed missing."""
        now = time.monotonic() if now is None else now
        runs = list(self._runs.items())
        for start in range(0, len(runs), CHECK_BATCH):
            batch = runs[start : start + CHECK_BATCH]
            statuses = await self.bus.run_statuses([(f.session, run) for run, f in batch])
            for (run, followed), status in zip(batch, statuses, strict=True):
                await self._settle(run, followed, status, now)

    async def _settle(self, run: str, followed: _Followed, status: str | None, now: float) -> None:
        if status in ENDED:
            self._runs.pop(run, None)
        elif status is not None:
            followed.missing_since = None
        elif followed.missing_since is None:
            followed.missing_since = now  # an attempt that is alive takes it back meanwhile
        elif now - followed.missing_since >= self.lease_seconds:
            lost = Thought("error", LOST_MESSAGE)
            status = TERMINAL_STATUS["error"]
            if await self.bus.end_lost(followed.session, run, lost, status, followed.user):
                self.ended += 1
                self._runs.pop(run, None)
                logger.warning("run %s: its state was lost with Redis' data; ended it", run)
            else:
                followed.missing_since = None  # an attempt took it back just now

    async def watch(self) -> None:
        """Check every third of a lease, while the frontend lives."""
        while True:
            await asyncio.sleep(self.lease_seconds / 3)
            with contextlib.suppress(RedisError, OSError):
                await self.check()
