"""Jobs whose run waits for an earlier run of its session: parked here, holding no slot.

Runs of one session run one at a time, in the order they were admitted (``ADMIT`` and
``START`` in :mod:`thoughtwire.shared.scripts`). A job whose ``START`` says ``wait`` is
parked: its task ends, so it holds none of the worker's run slots (a worker whose every
slot held a waiting run would never run the runs they wait for), and the job stays
claimed by this worker.

* **Kept**: every third of a lease each parked job's stream entry is touched, so other
  workers do not reclaim it as abandoned. If this worker dies the touches stop, and
  another worker reclaims the job after a lease, as it would any job.
* **Woken**: a job is checked again (a new ``START``) when the run it waits for ends (its
  id on ``Keys.runs_ended``), when it is asked to cancel (the control channel: a
  cancelled run does not wait), and at every keep, in case an announcement was missed.
  The worker starts woken jobs as it has room.
* **Cancelled without a slot**: a job asked to cancel (the control channel) is unparked and
  ended at once by a small task of its own (``end_cancelled``: its ``START`` sees the
  cancel, and its ``cancelled`` is written), not when a slot frees: every slot may be
  held for minutes by runs waiting for an approval. At most ``ending_limit`` such tasks
  run at once; past that a cancelled job is due, as a woken one, and waits for a slot.
* **Never stuck behind a lost run**: a run waited for whose state stays missing for a
  whole lease (Redis lost it and nobody ended it), or that ended but is still in the
  queue, is taken out of the queue (``DEQUEUE``), so the runs after it start.
* **Never stuck behind a run never queued**: a run waited for that stays ``queued``, never
  started, with no job record, on checks ``never_queued_seconds`` apart, was admitted but
  its job never reached the stream (its frontend's queueing failed for good, and so did
  its withdrawal, or the frontend died between the two). It is ended as lost (``error``,
  ``WITHDRAW``, which acts only on a run still queued and never started:
  ``Bus.end_never_queued``), so its session's clients see it end and the runs after it
  start. (A ``reject`` prompt refused because of such a run ends it the same way,
  ``Bus.never_queued``: a refused prompt parks nothing behind it.) The record is written only
  once the job is on the stream (``Bus.submit``), and the bound is well past the
  frontend's retries. Should a job still reach the stream after that (a frontend paused
  for longer than the bound), its ``START`` finds the run ended and the job is let go:
  the run never runs, and its ``error`` says so.
* **Bounded**: at most ``limit`` jobs are parked. Past that a job is not parked: nobody
  touches it, and a worker reclaims it after a lease and asks again.
* **Stopping**: parked jobs go back to the queue, for the other workers; cancelled ones
  being ended are waited for, a lease at most.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Coroutine, Iterable
from dataclasses import dataclass
from typing import Any

from thoughtwire.shared.backoff import UNAVAILABLE
from thoughtwire.shared.bus import NEVER_QUEUED_SECONDS, Bus
from thoughtwire.shared.protocol import TERMINAL_STATUS, Job
from thoughtwire.shared.redis import RedisError
from thoughtwire.shared.vocab import RunStatus

logger = logging.getLogger("thoughtwire.worker")

PARKED_LIMIT = 1000
ENDED_REMEMBERED = 1000  # run ends kept, for a job parked just after its wait ended
ENDING_LIMIT = 32  # cancelled jobs ended at once without a slot; past that they wait for one
ENDED = frozenset(TERMINAL_STATUS.values())


@dataclass(slots=True)
class _Parked:
    entry_id: str
    job: Job
    waits_for: str  # the earliest run admitted before it that has not ended


class Parking:
    """This worker's parked jobs: kept claimed, woken when the run they wait for ends."""

    def __init__(
        self,
        bus: Bus,
        consumer: str,
        *,
        lease_seconds: float,
        on_due: Callable[[], None],
        end_cancelled: Callable[[str, Job], Coroutine[Any, Any, None]] | None = None,
        limit: int = PARKED_LIMIT,
        never_queued_seconds: float = NEVER_QUEUED_SECONDS,
        ending_limit: int = ENDING_LIMIT,
    ) -> None:
        self.bus = bus
        self.consumer = consumer
        self.lease_seconds = lease_seconds
        self.limit = limit
        self.never_queued_seconds = never_queued_seconds
        self._on_due = on_due  # called when jobs become due: the worker starts what it can
        # ends a cancelled job without a slot (a START, then its ``cancelled``); None: no task
        self._end_cancelled = end_cancelled
        self.ending_limit = ending_limit
        self._ending: set[asyncio.Task[None]] = set()
        # By stream entry, not by run: a submit retried after a lost reply can queue a run's
        # job twice, and each entry must be touched while it is parked.
        self._parked: dict[str, _Parked] = {}
        # run waited for -> entries parked behind it (a dict as an ordered set: arrival order)
        self._waiters: dict[str, dict[str, None]] = {}
        # run waited for -> when its state was first seen missing (monotonic); a job checked
        # again is parked anew, so this is kept by the run waited for, not by the job
        self._missing: dict[str, float] = {}
        # run waited for -> when it was first seen queued without a job record (monotonic)
        self._unqueued: dict[str, float] = {}
        self._due: OrderedDict[str, None] = OrderedDict()  # entries to check again, oldest first
        self._ended: OrderedDict[str, None] = OrderedDict()  # the last runs announced ended

    def __len__(self) -> int:
        return len(self._parked)

    def park(self, entry_id: str, job: Job, waits_for: str) -> bool:
        """Park ``job`` until ``waits_for`` ends; False if too many are parked already."""
        if entry_id not in self._parked and len(self._parked) >= self.limit:
            logger.warning("run %s: %d jobs parked already; left for later", job.run, self.limit)
            return False
        self._unpark(entry_id)
        self._parked[entry_id] = _Parked(entry_id, job, waits_for)
        self._waiters.setdefault(waits_for, {})[entry_id] = None
        if waits_for in self._ended:  # it ended while this job's START was on its way back
            self._make_due([entry_id])
        return True

    def ended(self, run: str) -> None:
        """``run`` ended (announced on ``runs_ended``): the jobs waiting for it are due."""
        self._ended[run] = None
        if len(self._ended) > ENDED_REMEMBERED:
            self._ended.popitem(last=False)
        self._make_due(self._waiters.get(run, ()))

    def cancelled(self, runs: list[str]) -> None:
        """Cancelling was asked for ``runs``: those parked here are ended now, each by a task
        of its own, as far as ``ending_limit`` allows; the rest are due (they need not wait)."""
        asked = set(runs)
        entries = [e for e, parked in self._parked.items() if parked.job.run in asked]
        due = []
        for entry_id in entries:
            if self._end_cancelled is None or len(self._ending) >= self.ending_limit:
                due.append(entry_id)
                continue
            parked = self._unpark(entry_id)
            assert parked is not None
            task = asyncio.create_task(
                self._end_cancelled(entry_id, parked.job), name=f"cancel-{parked.job.run}"
            )
            self._ending.add(task)
            task.add_done_callback(self._ended_cancelled)
        self._make_due(due)

    def _ended_cancelled(self, task: asyncio.Task[None]) -> None:
        self._ending.discard(task)
        if not task.cancelled() and task.exception() is not None:
            # Its job stays claimed here, untouched: a worker reclaims it after a lease, and
            # its START sees the cancel then.
            logger.error("ending a cancelled parked job failed", exc_info=task.exception())

    def take_due(self, count: int) -> list[tuple[str, Job]]:
        """Up to ``count`` due jobs, unparked, oldest first: the worker starts them."""
        taken: list[tuple[str, Job]] = []
        while self._due and len(taken) < count:
            entry_id, _ = self._due.popitem(last=False)
            parked = self._unpark(entry_id)
            if parked is not None:
                taken.append((parked.entry_id, parked.job))
        return taken

    async def keep(self) -> None:
        """Every third of a lease, touch the parked jobs and check them again; till cancelled."""
        while True:
            await asyncio.sleep(self.lease_seconds / 3)
            try:
                await self.check()
            except (*UNAVAILABLE, RedisError) as exc:
                logger.warning("keeping parked jobs failed (%r); trying again shortly", exc)

    async def check(self, now: float | None = None) -> None:
        """One keep: touch every parked job, free the queue of lost runs, wake them all."""
        now = time.monotonic() if now is None else now
        parked = list(self._parked.values())
        if not parked:
            return
        await asyncio.gather(*(self.bus.touch(self.consumer, p.entry_id) for p in parked))
        statuses = await self.bus.run_statuses([(p.job.session, p.waits_for) for p in parked])
        for p, status in zip(parked, statuses, strict=True):
            if self._stuck(p.waits_for, status, now) and await self.bus.dequeue(
                p.job.session, p.waits_for
            ):
                logger.warning("run %s: run %s it waited for was lost", p.job.run, p.waits_for)
        for run in [run for run in self._missing if run not in self._waiters]:
            del self._missing[run]
        queued = {
            p.waits_for: p.job.session
            for p, status in zip(parked, statuses, strict=True)
            if status == RunStatus.QUEUED
        }
        await self._end_never_queued(queued, now)
        self._make_due([p.entry_id for p in parked])

    async def _end_never_queued(self, queued: dict[str, str], now: float) -> None:
        """End the runs waited for (``queued``: run -> session) that stayed queued without
        a job record for ``never_queued_seconds``: their job never reached the stream."""
        for run in [run for run in self._unqueued if run not in queued]:
            del self._unqueued[run]  # it started, ended, or nobody waits for it here
        if not queued:
            return
        runs = list(queued)
        for run, has_job in zip(runs, await self.bus.queued_jobs(runs), strict=True):
            if has_job:
                self._unqueued.pop(run, None)
            elif now - self._unqueued.setdefault(run, now) >= self.never_queued_seconds:
                self._unqueued.pop(run)
                if await self.bus.end_never_queued(queued[run], run):
                    logger.warning("run %s: it was never queued; ended it as lost", run)

    def _stuck(self, run: str, status: str | None, now: float) -> bool:
        """Whether ``run`` (waited for) cannot end by itself: it ended, or its state stayed
        missing on checks a lease apart (an attempt alive would have taken it back)."""
        if status is not None:
            self._missing.pop(run, None)
            return status in ENDED
        return now - self._missing.setdefault(run, now) >= self.lease_seconds

    async def hand_back(self) -> None:
        """Put every parked job back on the queue for the other workers (stopping); let the
        cancelled ones being ended finish, a lease at most."""
        for entry_id in list(self._parked):
            parked = self._unpark(entry_id)
            assert parked is not None
            with contextlib.suppress(*UNAVAILABLE, RedisError):
                await self.bus.requeue(parked.entry_id, parked.job)
        if self._ending:
            _done, late = await asyncio.wait(set(self._ending), timeout=self.lease_seconds)
            for task in late:  # left claimed: a worker reclaims them after a lease
                task.cancel()
            if late:
                await asyncio.wait(late)

    def _make_due(self, entries: Iterable[str]) -> None:
        due = [entry_id for entry_id in entries if entry_id in self._parked]
        for entry_id in due:
            self._due[entry_id] = None
        if due:
            self._on_due()

    def _unpark(self, entry_id: str) -> _Parked | None:
        parked = self._parked.pop(entry_id, None)
        self._due.pop(entry_id, None)
        if parked is not None:
            waiters = self._waiters.get(parked.waits_for)
            if waiters is not None:
                waiters.pop(entry_id, None)
                if not waiters:
                    del self._waiters[parked.waits_for]
        return parked
