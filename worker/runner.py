"""The worker: claims jobs, runs attempts, takes over jobs whose worker went away.

A worker runs up to ``concurrency`` attempts at once (:mod:`thoughtwire.worker.attempt`). Besides
new jobs it reclaims, every half lease, jobs that have sat unrenewed for a whole
lease (their worker died or stalled); the start script decides whether such a job
really is free and numbers the new attempt. A control channel carries cancellations
from frontends, so a cancel reaches the right worker at once; lease renewals carry
it too, in case that message was missed.

A job whose run must wait for an earlier run of its session is parked
(:mod:`thoughtwire.worker.parking`): it holds no slot, and starts when that run ends.

Stopping: :meth:`Worker.run` returns when its ``stop`` event is set. It stops claiming
at once, lets running attempts finish until ``drain_timeout``, then hands what is
left back to the queue.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from collections import Counter
from collections.abc import AsyncGenerator, Callable

import orjson

from thoughtwire.shared import logs, tracing
from thoughtwire.shared.backoff import UNAVAILABLE, delays
from thoughtwire.shared.bus import Bus
from thoughtwire.shared.protocol import Job, Thought
from thoughtwire.shared.redis import RedisError
from thoughtwire.shared.vocab import StopReason, Verdict
from thoughtwire.worker import metrics
from thoughtwire.worker.agents import Agent
from thoughtwire.worker.attempt import RunAttempt, RunLimits
from thoughtwire.worker.parking import Parking

logger = logging.getLogger("thoughtwire.worker")

# New jobs are taken at most this many at a time: a burst of prompts is then started in
# steps, and the first runs' events go out between the steps instead of waiting behind
# every start of the burst (docs/performance.md).
CLAIM_BATCH = 16

# How a run this worker ran ended, for its log line, by the attempt's stop reason; an
# attempt that stopped for none ended with the terminal event it wrote (done or error),
# or found at its last write that another attempt held the run (lease lost).
RUN_OUTCOMES = {
    StopReason.CANCEL: "cancelled",
    StopReason.SHUTDOWN: "handed back",
    StopReason.LOST: "lease lost",
}


class Worker:
    """Claims jobs from the stream and runs each as an attempt, up to its concurrency."""

    def __init__(
        self,
        bus: Bus,
        agents: dict[str, Agent],
        default_agent: str,
        *,
        concurrency: int,
        limits: RunLimits,
        max_attempts: int,
        listen: Callable[[str], AsyncGenerator[bytes, None]] | None = None,
        name: str | None = None,
    ) -> None:
        self.bus = bus
        self.agents = agents
        self.default_agent = default_agent
        self.concurrency = concurrency
        self.limits = limits
        self.max_attempts = max_attempts
        self.name = name or f"{socket.gethostname()}-{os.getpid()}-{os.urandom(2).hex()}"
        self._listen = listen  # a channel's messages (shared.redis.pubsub.channel_messages)
        self._tasks: set[asyncio.Task[None]] = set()
        self._attempts: dict[str, RunAttempt] = {}
        self.outcomes: Counter[str] = Counter()  # runs this worker ran, by how they ended
        self.parking = Parking(
            bus,
            self.name,
            lease_seconds=limits.lease_ms / 1000,
            on_due=self._start_parked,
            end_cancelled=self._end_cancelled,
        )
        self._stopping = False
        # Whether its last claim reached Redis, while it claims: its readiness (/readyz).
        self.consuming = False

    @property
    def claim_block_ms(self) -> int:
        """How long a claim waits for new jobs: half a lease, within 50 ms and 1 s."""
        return max(50, min(1000, self.limits.lease_ms // 2))

    async def run(self, stop: asyncio.Event, drain_timeout: float = 20.0) -> None:
        """Claim and run jobs until ``stop`` is set, then drain."""
        await self.bus.ensure_group()
        await self.bus.check_incarnations()  # warns if a failover's lost writes go unseen
        helpers = [
            asyncio.create_task(
                self._follow(self.bus.worker_control, self._on_control), name="worker-control"
            ),
            asyncio.create_task(
                self._follow(self.bus.runs_ended, self._on_run_ended), name="runs-ended"
            ),
            asyncio.create_task(self.parking.keep(), name="parked-jobs"),
        ]
        try:
            await self._claim_until(stop)
        finally:
            self._stopping = True
            await self.parking.hand_back()
            await self._drain(drain_timeout)
            await self.parking.hand_back()  # those the drained attempts' STARTs parked
            for helper in helpers:
                helper.cancel()
            for helper in helpers:
                with contextlib.suppress(asyncio.CancelledError):
                    await helper

    async def _claim_until(self, stop: asyncio.Event) -> None:
        stopping = asyncio.create_task(stop.wait())
        last_reclaim = 0.0
        try:
            while not stop.is_set():
                free = self.concurrency - len(self._tasks)
                if free <= 0:
                    await asyncio.wait(
                        {stopping, *self._tasks}, return_when=asyncio.FIRST_COMPLETED
                    )
                    continue
                try:
                    if time.monotonic() - last_reclaim > self.limits.lease_ms / 2000:
                        last_reclaim = time.monotonic()
                        for entry_id, job in await self.bus.reclaim(
                            self.name, free, self.limits.lease_ms
                        ):
                            self._start(entry_id, job)
                        free = self.concurrency - len(self._tasks)
                        if free <= 0:
                            continue
                    claim = asyncio.create_task(
                        self.bus.claim(self.name, min(free, CLAIM_BATCH), self.claim_block_ms)
                    )
                    await asyncio.wait({claim, stopping}, return_when=asyncio.FIRST_COMPLETED)
                    # A claim is bounded by claim_block_ms: let it finish even when stopping,
                    # so a job it took is run, not left to wait for a lease to lapse.
                    for entry_id, job in await claim:
                        self._start(entry_id, job)
                    self.consuming = True
                except (*UNAVAILABLE, RedisError) as exc:
                    self.consuming = False
                    logger.warning("claiming failed (%r); trying again shortly", exc)
                    await asyncio.wait({stopping}, timeout=next(delays(0.5)))
        finally:
            self.consuming = False
            stopping.cancel()

    def _start(self, entry_id: str, job: Job) -> None:
        task = asyncio.create_task(self._run_job(entry_id, job), name=f"run-{job.run}")
        self._tasks.add(task)
        task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            logger.error("run task failed", exc_info=task.exception())
        self._start_parked()  # a slot is free

    def _start_parked(self) -> None:
        """Start the parked jobs that are due, as far as there are free slots.

        A claim already on its way may bring more jobs than are then free: the worker
        runs them all, over its concurrency by at most one claim for a moment.
        """
        if self._stopping:
            return
        for entry_id, job in self.parking.take_due(self.concurrency - len(self._tasks)):
            self._start(entry_id, job)

    async def _drain(self, deadline: float) -> None:
        if not self._tasks:
            return
        _done, pending = await asyncio.wait(set(self._tasks), timeout=deadline)
        if pending:
            logger.warning("handing %d unfinished runs back to the queue", len(pending))
            for attempt in list(self._attempts.values()):
                attempt.stop(StopReason.SHUTDOWN)
            _done, pending = await asyncio.wait(pending, timeout=5)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending)

    async def _end_cancelled(self, entry_id: str, job: Job) -> None:
        """End a parked job cancelled while it waited, in no slot: its START sees the cancel."""
        await self._run_job(entry_id, job, slot=False)

    async def _run_job(self, entry_id: str, job: Job, *, slot: bool = True) -> None:
        # Every line logged while the job is handled, and by the tasks it starts, names it.
        with logs.bound(session=job.session, run=job.run, user=job.user):
            # The trace the prompt began goes on here: its time in the queue (from the
            # entry's id, its time on the stream), then this attempt, current while it runs.
            ids = {"thoughtwire.session": job.session, "thoughtwire.run": job.run}
            queued_ns = int(entry_id.partition("-")[0]) * 1_000_000
            tracing.record("queued", queued_ns, parent=job.traceparent, attributes=ids)
            with tracing.span("run", ids, parent=job.traceparent, kind="consumer"):
                await self._handle_job(entry_id, job, slot=slot)

    async def _handle_job(self, entry_id: str, job: Job, *, slot: bool) -> None:
        agent = self.agents.get(job.agent or self.default_agent)
        start = await self.bus.start(job, self.name, self.limits.lease_ms, self.max_attempts)
        if start.verdict == Verdict.RUN and not slot:
            # Not cancelled after all (Redis lost the run's state since): it runs in a slot,
            # here or on another worker, as a job handed back.
            await self.bus.release(job, start.fence)
            await self.bus.requeue(entry_id, job)
            return
        if start.verdict == Verdict.FINISHED:
            await self.bus.finish(entry_id, job)
            return
        if start.verdict == Verdict.BUSY:
            return  # another attempt holds a live lease; its renewals take the job back
        if start.verdict == Verdict.WAIT:
            assert start.waits_for is not None
            self.parking.park(entry_id, job, start.waits_for)  # its slot is free at return
            return
        waiting = None
        if start.verdict == Verdict.RUN and start.attempt > 1:
            # A run its last worker left waiting for an approval goes on waiting, from
            # where it was: no retry (worker/approvals.py).
            waiting = await self.bus.approval(job)
        logs.bind(attempt=start.attempt)  # undone with the job's fields, in _run_job
        tracing.annotate(
            {"thoughtwire.attempt": start.attempt, "thoughtwire.verdict": start.verdict}
        )
        attempt = RunAttempt(
            self.bus, job, entry_id, start.fence, self.name, self.limits, start.history, waiting
        )
        # A wait its last worker left (it may have died waiting) is forgotten before the
        # terminal event: whoever sees the run end sees no approval left waiting in it.
        if start.verdict == Verdict.CANCEL:
            await self.bus.end_approval(job)
            await attempt.emit(Thought("cancelled", "the run was cancelled"))
            metrics.run_ended_unrun("cancelled")  # ended, whatever becomes of its job
            await self.bus.finish(entry_id, job)
        elif start.verdict == Verdict.DEAD:
            reason = f"the run failed {self.max_attempts} times"
            await self.bus.end_approval(job)
            await attempt.emit(Thought("error", reason))
            metrics.run_ended_unrun("error")
            await self.bus.dead_letter(entry_id, job, reason)
        elif agent is None:
            await attempt.emit(Thought("error", f"agent {job.agent!r} is not available"))
            metrics.run_ended_unrun("error")
            await self.bus.finish(entry_id, job)
        else:
            if start.attempt > 1 and waiting is None:
                await attempt.emit(Thought("retry", "", {"attempt": start.attempt}))
            self._attempts[job.run] = attempt
            began, outcome = time.monotonic(), "interrupted"
            logger.info(
                "run started: session %s, run %s, attempt %d", job.session, job.run, start.attempt
            )
            try:
                await attempt.execute(agent)
                stopped = attempt.stop_reason
                outcome = (RUN_OUTCOMES[stopped] if stopped else attempt.ended) or "lease lost"
                tracing.annotate({"thoughtwire.outcome": outcome})
            finally:
                self._attempts.pop(job.run, None)
                self.outcomes[outcome] += 1
                metrics.run_ended(outcome, time.monotonic() - began, attempt.tokens)
                tokens_in, tokens_out = attempt.tokens
                logger.info(
                    "run ended: session %s, run %s, attempt %d, outcome %s, %.2f s, "
                    "tokens %d in, %d out",
                    job.session,
                    job.run,
                    start.attempt,
                    outcome,
                    time.monotonic() - began,
                    tokens_in,
                    tokens_out,
                )

    def cancel(self, runs: list[str]) -> None:
        """Stop the agents of those ``runs`` this worker is running; end those parked here."""
        for run in runs:
            attempt = self._attempts.get(run)
            if attempt is not None:
                attempt.stop(StopReason.CANCEL)
        self.parking.cancelled(runs)

    def wake(self, runs: list[str]) -> None:
        """Tell those ``runs`` this worker is running that their approval was answered."""
        for run in runs:
            attempt = self._attempts.get(run)
            if attempt is not None:
                attempt.approvals.wake()

    def _on_control(self, data: bytes) -> None:
        message = orjson.loads(data)
        self.cancel(message.get("cancel", []))
        self.wake(message.get("decided", []))

    def _on_run_ended(self, data: bytes) -> None:
        self.parking.ended(data.decode())

    async def _follow(self, channel: str, handle: Callable[[bytes], None]) -> None:
        """Follow ``channel``; reconnect (with backoff) whenever it drops.

        Messages missed meanwhile are made up for: cancels by lease renewals, run ends
        by the parked jobs' keep (:mod:`thoughtwire.worker.parking`).
        """
        if self._listen is None:
            return
        for delay in delays():
            try:
                async with contextlib.aclosing(self._listen(channel)) as messages:
                    async for data in messages:
                        handle(data)
            except asyncio.CancelledError:
                raise
            except UNAVAILABLE:
                logger.warning("channel %s lost; reconnecting", channel)
            await asyncio.sleep(delay)
