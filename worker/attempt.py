"""One attempt at a run: drive the agent, keep the lease, end the run.

The events are written by the attempt's :class:`~worker.writer.RunWriter`.

An attempt writes only while it holds the run's fence. It stops for one of four
reasons, and what it leaves behind differs:

========  =====================================================  ==================
reason    what happens                                           job acknowledged?
========  =====================================================  ==================
(none)    the agent finished: ``done`` (or ``error``)            yes
cancel    a client asked, or nobody watched the session: the     yes
          agent is cancelled and ``cancelled`` ends the run
lost      the lease lapsed and another attempt took over: stop   no (not ours)
          writing at once
shutdown  the worker is draining and the deadline passed: give   re-queued
          the lease up and re-queue the job for another worker
========  =====================================================  ==================
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from dataclasses import dataclass
from functools import partial
from typing import Any

import orjson

from thoughtwire.shared.bus import Bus
from thoughtwire.shared.closecodes import ErrorCode
from thoughtwire.shared.grants import NO_BUDGET, Budget
from thoughtwire.shared.protocol import Job, Thought
from thoughtwire.shared.vocab import OnDisconnect, StopReason
from thoughtwire.worker.agents import Agent, AgentError, Turn
from thoughtwire.worker.approvals import DEFAULT_POLICY, ApprovalPolicy, Approvals
from thoughtwire.worker.blocks import BlockTracker
from thoughtwire.worker.coalesce import coalesce
from thoughtwire.worker.metrics import FIRST_TOKEN_SECONDS
from thoughtwire.worker.snapshots import SnapshotKeeper
from thoughtwire.worker.usage import BudgetCharge, BudgetSpent, RunUsage, UsageMeter
from thoughtwire.worker.writer import LeaseLost, RunWriter

logger = logging.getLogger("thoughtwire.worker")

GENERIC_FAILURE = "the agent failed; see the worker's log"
MAX_RESULT_CHARS = 256 * 1024


@dataclass(frozen=True)
class RunLimits:
    """The bounds a worker holds each run to: lease, retries, grace, coalescing, memory."""

    lease_ms: int
    redis_retry_seconds: float
    disconnect_grace: float
    coalesce_window: float = 0.0
    memory_turns: int = 20
    approval: ApprovalPolicy = DEFAULT_POLICY  # how long a tool call waits for a person
    budget: Budget = NO_BUDGET  # tokens per user; none: nothing is charged


class RunAttempt:
    """One attempt's lifecycle: drives the agent, keeps the lease, and ends the run.

    Its events go out through its :class:`~worker.writer.RunWriter`, in order and fenced.
    """

    def __init__(
        self,
        bus: Bus,
        job: Job,
        entry_id: str,
        fence: str,
        owner: str,
        limits: RunLimits,
        history: list[dict[str, Any]] | None = None,
        waiting: dict[str, str] | None = None,
    ) -> None:
        self.bus = bus
        self.job = job
        self.entry_id = entry_id
        self.fence = fence
        self.owner = owner
        self.limits = limits
        self.history = history or []  # the session's earlier messages, from the start
        self.stop_reason: StopReason | None = None
        self.ended: str | None = None  # the terminal event written (done, error, cancelled)
        self.snapshots = SnapshotKeeper(bus, job.session)
        self.writer = RunWriter(
            bus,
            job,
            fence,
            retry_seconds=limits.redis_retry_seconds,
            memory_turns=limits.memory_turns,
            on_fenced=partial(self.stop, StopReason.LOST),
            on_written=self.snapshots.written,
        )
        self.blocks = BlockTracker()  # numbers the agent's blocks; restorable from its state()
        # ``waiting``: the approval an earlier attempt of this run was waiting for when its
        # worker died. This attempt goes on from there (worker/approvals.py).
        self.approvals = Approvals(
            bus,
            job,
            fence,
            limits.approval,
            send=self._send,
            snapshot=self._snapshot,
            waiting=waiting,
            on_cancel=partial(self.stop, StopReason.CANCEL),
        )
        self._resume: Any = None
        # Counted always (``done`` carries it); charged only with a budget (worker/usage.py).
        charge = None
        if limits.budget.enabled:
            charge = BudgetCharge(bus.grants, job.user, limits.budget)
        self.usage = RunUsage(UsageMeter(job.prompt, self.history), charge)
        self._answer: list[str] = []
        self._answer_chars = 0
        if waiting is not None:
            self.blocks = BlockTracker.restore(orjson.loads(waiting["blocks"]))
            self._answer = [waiting.get("answer", "")]
            self._answer_chars = len(self._answer[0])
            self._resume = orjson.loads(waiting["checkpoint"])
            if "usage" in waiting:  # the counts before the wait: done counts the run whole
                self.usage.restore(orjson.loads(waiting["usage"]))
        self._driver: asyncio.Task[None] | None = None
        self._cancel_message = "the run was cancelled"
        self._turn: Turn | None = None
        self._terminal: Thought | None = None
        self._tokens: tuple[int, int] | None = None  # done's usage, as it was written
        self._began = time.monotonic()  # for the time to its first answer token

    def stop(self, reason: StopReason) -> None:
        """Stop the agent for ``reason`` (cancel, lost, shutdown); the first reason wins."""
        if self.stop_reason is None:
            self.stop_reason = reason
            if self._driver is not None:
                self._driver.cancel()

    @property
    def tokens(self) -> tuple[int, int]:
        """The run's input and output tokens: as ``done`` said, or as counted so far."""
        meter = self.usage.meter
        return self._tokens or (meter.prompt_tokens, meter.completion_tokens)

    async def emit(self, *thoughts: Thought, result: str = "", remember: bytes = b"") -> None:
        """Write ``thoughts`` now, after everything queued (:meth:`RunWriter.emit`)."""
        await self.writer.emit(*thoughts, result=result, remember=remember)

    async def execute(self, agent: Agent) -> None:
        """Run the agent to its end and write the terminal event, per the table above."""
        self._driver = asyncio.create_task(self._drive(agent), name=f"agent-{self.job.run}")
        keeper = asyncio.create_task(self._keep_lease(), name=f"lease-{self.job.run}")
        try:
            outcome = await self._outcome()
            keeper.cancel()  # a renewal during the handoff would make the next START wait
            await self._finish(outcome)
        except LeaseLost:
            logger.warning("run %s: lease lost to another attempt; stopped writing", self.job.run)
        finally:
            self.writer.abandon()
            keeper.cancel()
            self._driver.cancel()
            await asyncio.gather(keeper, self._driver, return_exceptions=True)
            await self.snapshots.close(ended=self.ended is not None)

    async def _outcome(self) -> Thought | None:
        """The terminal event to write, or None for a stop that writes nothing."""
        assert self._driver is not None
        try:
            await asyncio.shield(self._driver)
        except asyncio.CancelledError:
            if self.stop_reason is None:
                raise  # the worker itself is being cancelled
        except LeaseLost:
            raise
        except BudgetSpent as exc:
            return Thought("error", str(exc), {"code": ErrorCode.BUDGET})
        except AgentError as exc:
            return Thought("error", str(exc))
        except Exception:
            logger.exception("run %s of session %s failed", self.job.run, self.job.session)
            return Thought("error", GENERIC_FAILURE)
        if self.stop_reason == StopReason.CANCEL:
            return Thought("cancelled", self._cancel_message)
        if self.stop_reason == StopReason.LOST:
            raise LeaseLost
        if self.stop_reason == StopReason.SHUTDOWN:
            return None
        return self._terminal or Thought("done", "")

    async def _finish(self, terminal: Thought | None) -> None:
        if terminal is None:  # shutdown: hand the job to another worker right away
            self.writer.abandon()
            await self.usage.hand_back()  # what it reserved and did not write goes back
            await self.bus.release(self.job, self.fence)
            await self.bus.requeue(self.entry_id, self.job)
            logger.info("run %s handed back to the queue", self.job.run)
            return
        terminal = await self.usage.settle(terminal)
        reported = (terminal.extra or {}).get("usage")
        if reported:
            self._tokens = (reported["prompt_tokens"], reported["completion_tokens"])
        result = "".join(self._answer) if terminal.type == "done" else str(terminal.content)
        remember = b""
        if (
            terminal.type == "done"
            and self.limits.memory_turns > 0
            and self._turn is not None
            and self._turn.messages
        ):
            remember = orjson.dumps(self._turn.messages)
        # The open block of deltas ends before the run does, in the same call.
        await self.emit(*self.blocks.close(), terminal, result=result, remember=remember)
        self.ended = terminal.type
        if self.approvals.used:  # a wait the run ended in (a cancel) is over
            await self.bus.end_approval(self.job)
        await self.bus.finish(self.entry_id, self.job)

    async def _drive(self, agent: Agent) -> None:
        self._turn = Turn(
            self.job.prompt, self.history, resume=self._resume, approver=self.approvals.ask
        )
        window = self.limits.coalesce_window
        await self.usage.start()
        thoughts = agent.run(self._turn)
        async for thought in coalesce(thoughts, window) if window > 0 else thoughts:
            if thought.terminal:
                self._terminal = thought  # the agent's own ending, with its details
                return
            await self.usage.cover(thought)  # held in the budget before it is queued
            if thought.type == "answer" and not self._answer:
                FIRST_TOKEN_SECONDS.observe(time.monotonic() - self._began)
            if thought.type == "answer" and self._answer_chars < MAX_RESULT_CHARS:
                self._answer.append(str(thought.content))
                self._answer_chars += len(str(thought.content))
            for written in self.blocks.track(thought):
                await self.writer.queue(written)
            if thought.type == "action":
                self.approvals.seen(thought)  # an approval of the call may follow now

    async def _send(self, thought: Thought) -> None:
        """Write ``thought`` (an approval's event) in its block, after all queued before."""
        for written in self.blocks.track(thought):
            await self.writer.queue(written)
        await self.writer.settled()

    def _snapshot(self) -> dict[str, str]:
        """What a new attempt needs besides the agent's checkpoint to go on after a wait."""
        return {
            "blocks": orjson.dumps(self.blocks.state()).decode(),
            "answer": "".join(self._answer),
            "usage": orjson.dumps(self.usage.state()).decode(),
        }

    async def _keep_lease(self) -> None:
        """Renew the lease a few times per lease period; notice cancellation and absence."""
        interval = self.limits.lease_ms / 3000
        unwatched_since: float | None = None
        channel = self.bus.session_channel(self.job.session)
        # The first renewal comes at a random point of the first interval: runs started
        # together (a burst of prompts, a batch of claimed jobs) would otherwise renew
        # together forever, a burst of Redis calls that stalls every stream at once.
        delay = interval * random.uniform(0.25, 1.0)
        while True:
            await asyncio.sleep(delay)
            delay = interval
            with contextlib.suppress(Exception):
                await self.bus.touch(self.owner, self.entry_id)
            try:
                verdict = await self.bus.renew(self.job, self.fence, self.limits.lease_ms)
                if self.job.on_disconnect == OnDisconnect.CANCEL:
                    watched = (await self.bus.subscribers([channel])).get(channel, 0)
            except asyncio.CancelledError:
                raise
            except Exception:
                continue  # Redis is away; the lease may lapse, and fencing keeps that safe
            # A run whose state Redis lost is not lost to us: the renewal took it back (0).
            if verdict < 0:
                self.stop(StopReason.LOST)
                return
            if verdict > 0:
                self.stop(StopReason.CANCEL)
                return
            if self.job.on_disconnect == OnDisconnect.CANCEL:
                now = time.monotonic()
                unwatched_since = None if watched else (unwatched_since or now)
                if (
                    unwatched_since is not None
                    and now - unwatched_since >= self.limits.disconnect_grace
                ):
                    self._cancel_message = "the run was cancelled: nobody was watching"
                    self.stop(StopReason.CANCEL)
                    return
