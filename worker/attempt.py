"""One attempt at a run: drive the agent, keep the lease, write the events, end the run.

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

from shared.backoff import UNAVAILABLE, retry
from shared.bus import FENCED, Bus
from shared.protocol import TERMINAL_STATUS, Job, Thought
from shared.vocab import OnDisconnect, StopReason
from worker.agents import Agent, AgentError, Turn
from worker.coalesce import coalesce

logger = logging.getLogger("thoughtwire.worker")

GENERIC_FAILURE = "the agent failed; see the worker's log"
MAX_RESULT_CHARS = 256 * 1024
MAX_BATCH = 256  # events per append call
MAX_QUEUED = 1024  # events an agent may run ahead of Redis before it waits


class LeaseLost(Exception):
    """Another attempt owns the run now; this one must not write again."""


@dataclass(frozen=True)
class RunLimits:
    """The bounds a worker holds each run to: lease, retries, grace, coalescing, memory."""

    lease_ms: int
    redis_retry_seconds: float
    disconnect_grace: float
    coalesce_window: float = 0.0
    memory_turns: int = 20


class RunAttempt:
    """One attempt at a run: drives the agent, renews the lease, and writes its events fenced."""

    def __init__(
        self,
        bus: Bus,
        job: Job,
        entry_id: str,
        fence: str,
        owner: str,
        limits: RunLimits,
        history: list[dict[str, Any]] | None = None,
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
        self._next = 1  # this attempt's number for its next event
        self._last_seq = 0
        self._answer: list[str] = []
        self._answer_chars = 0
        self._driver: asyncio.Task[None] | None = None
        self._cancel_message = "the run was cancelled"
        self._turn: Turn | None = None
        self._terminal: Thought | None = None
        self._queued: list[bytes] = []  # encoded events not yet sent
        self._flight: asyncio.Future[Any] | None = None  # the write under way
        self._failure: BaseException | None = None  # what made a write fail, for good
        self._waiters: list[asyncio.Future[None]] = []

    def stop(self, reason: StopReason) -> None:
        """Stop the agent for ``reason`` (cancel, lost, shutdown); the first reason wins."""
        if self.stop_reason is None:
            self.stop_reason = reason
            if self._driver is not None:
                self._driver.cancel()

    async def emit(self, *thoughts: Thought, result: str = "", remember: bytes = b"") -> None:
        """Write ``thoughts`` now, after everything queued; the last may end the run,
        and then ``remember`` (the turn's messages) joins the session's memory."""
        await self._settled()
        last = thoughts[-1]
        heads = [self.bus.encode(self.job, t) for t in thoughts]
        status = TERMINAL_STATUS[last.type] if last.terminal else ""
        first, self._next = self._next, self._next + len(heads)
        if await self._write_numbered(heads, first, status, result, remember) == FENCED:
            raise LeaseLost

    # --- the agent's events: queued, and written one batch in flight at a time -----
    #
    # A slow token stream costs a call per event; a fast one fills calls of up to
    # MAX_BATCH events, because whatever the agent produced while a call was away goes
    # in the next one. The agent waits only when MAX_QUEUED events wait for Redis. The
    # happy path takes no task of its own: each reply's callback sends the next batch.

    async def _queue(self, thought: Thought) -> None:
        """Queue ``thought`` for writing, stamped now; the agent goes on meanwhile."""
        if self._failure is not None:
            raise self._failure
        self._queued.append(self.bus.encode(self.job, thought))
        if self._flight is None:
            self._send_next()
        elif len(self._queued) >= MAX_QUEUED:
            await self._settled()

    def _send_next(self) -> None:
        batch = self._queued[:MAX_BATCH]
        del self._queued[:MAX_BATCH]
        # Numbers are taken before the call: if it is dropped after Redis ran it, the
        # next call must not reuse them (the script would skip its events).
        first, self._next = self._next, self._next + len(batch)
        flight = self.bus.submit_encoded(
            self.job, batch, fence=self.fence, first=first, min_seq=self._last_seq
        )
        self._watch(flight, batch, first)

    def _watch(self, flight: asyncio.Future[Any], batch: list[bytes], first: int) -> None:
        self._flight = flight
        flight.add_done_callback(partial(self._landed, batch, first))

    def _landed(self, batch: list[bytes], first: int, flight: asyncio.Future[Any]) -> None:
        self._flight = None
        if flight.cancelled():
            return  # the attempt is ending
        error = flight.exception()
        if isinstance(error, UNAVAILABLE) and not isinstance(flight, asyncio.Task):
            # Redis is away: the same batch, under the same numbers, with backoff.
            retrying = asyncio.get_running_loop().create_task(
                self._write_numbered(batch, first), name=f"write-{self.job.run}"
            )
            self._watch(retrying, batch, first)
            return
        if error is not None:
            self._failure = error
        elif int(flight.result()) == FENCED:
            self._failure = LeaseLost()
            self._queued.clear()
            self.stop(StopReason.LOST)
        else:
            self._last_seq = int(flight.result())  # a retry has set it already
            if self._queued:
                self._send_next()
        if self._flight is None:
            for waiter in self._waiters:
                if not waiter.done():
                    waiter.set_result(None)
            self._waiters.clear()

    async def _settled(self) -> None:
        """Wait until nothing is queued or in flight; raise what made a write fail."""
        while self._flight is not None:
            waiter = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            await waiter
        if self._failure is not None:
            raise self._failure

    async def _write_numbered(
        self,
        heads: list[bytes],
        first: int,
        status: str = "",
        result: str = "",
        remember: bytes = b"",
    ) -> int:
        reply = await retry(
            partial(
                self.bus.submit_encoded,
                self.job,
                heads,
                fence=self.fence,
                first=first,
                min_seq=self._last_seq,
                status=status,
                result=result,
                remember=remember,
                turns=self.limits.memory_turns,
            ),
            seconds=self.limits.redis_retry_seconds,
        )
        seq = int(reply)
        if seq != FENCED:
            self._last_seq = seq
        return seq

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
            if self._flight is not None:
                self._flight.cancel()
            keeper.cancel()
            self._driver.cancel()
            await asyncio.gather(keeper, self._driver, return_exceptions=True)

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
            if self._flight is not None:
                self._flight.cancel()
            await self.bus.release(self.job, self.fence)
            await self.bus.requeue(self.entry_id, self.job)
            logger.info("run %s handed back to the queue", self.job.run)
            return
        result = "".join(self._answer) if terminal.type == "done" else str(terminal.content)
        remember = b""
        if (
            terminal.type == "done"
            and self.limits.memory_turns > 0
            and self._turn is not None
            and self._turn.messages
        ):
            remember = orjson.dumps(self._turn.messages)
        await self.emit(terminal, result=result, remember=remember)
        self.ended = terminal.type
        await self.bus.finish(self.entry_id, self.job)

    async def _drive(self, agent: Agent) -> None:
        self._turn = Turn(self.job.prompt, self.history)
        window = self.limits.coalesce_window
        thoughts = agent.run(self._turn)
        async for thought in coalesce(thoughts, window) if window > 0 else thoughts:
            if thought.terminal:
                self._terminal = thought  # the agent's own ending, with its details
                return
            if thought.type == "answer" and self._answer_chars < MAX_RESULT_CHARS:
                self._answer.append(str(thought.content))
                self._answer_chars += len(str(thought.content))
            await self._queue(thought)

    async def _keep_lease(self) -> None:
        """Renew the lease a few times per lease period; notice cancellation and absence."""
        interval = self.limits.lease_ms / 3000
        unwatched_since: float | None = None
        channel = self.bus.keys.session_channel(self.job.session)
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
