"""A run's events, written in order under the attempt's fence.

Guarantee: the events of one attempt reach the session's log in the order they were
handed over, each at most once: every event takes its number in the attempt before
its call leaves, so a call retried after Redis ran it is skipped by the ``APPEND``
script rather than written twice. Nothing is written once another attempt holds the
run's fence; the writer then raises :class:`LeaseLost` and tells its attempt.

A slow token stream costs a call per event; a fast one fills calls of up to
``MAX_BATCH`` events, because whatever the agent produced while a call was away goes
in the next one. The agent waits only when ``MAX_QUEUED`` events wait for Redis. The
happy path takes no task of its own: each reply's callback sends the next batch.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from functools import partial
from typing import Any

from thoughtwire.shared import tracing
from thoughtwire.shared.backoff import UNAVAILABLE, retry
from thoughtwire.shared.bus import FENCED, Bus
from thoughtwire.shared.protocol import TERMINAL_STATUS, Job, Thought
from thoughtwire.worker.metrics import APPEND_BATCH_SIZE, APPEND_SECONDS

MAX_BATCH = 256  # events per append call
MAX_QUEUED = 1024  # events an agent may run ahead of Redis before it waits


class LeaseLost(Exception):
    """Another attempt owns the run now; this one must not write again."""


class RunWriter:
    """One attempt's fenced, ordered writer: events queued, one batch in flight at a time."""

    def __init__(
        self,
        bus: Bus,
        job: Job,
        fence: str,
        *,
        retry_seconds: float,
        memory_turns: int,
        on_fenced: Callable[[], None],
        on_written: Callable[[int], None] | None = None,
    ) -> None:
        self.bus = bus
        self.job = job
        self.fence = fence
        self.retry_seconds = retry_seconds
        self.memory_turns = memory_turns
        self._on_fenced = on_fenced  # the attempt stops its agent at once
        self._on_written = on_written  # told the session's last seq after each batch
        self._next = 1  # this attempt's number for its next event
        self._last_seq = 0
        self._queued: list[bytes] = []  # encoded events not yet sent
        self._flight: asyncio.Future[Any] | None = None  # the write under way
        self._failure: BaseException | None = None  # what made a write fail, for good
        self._waiters: list[asyncio.Future[None]] = []
        self._span: Any = None  # the write under way's, with tracing on (shared/tracing.py)

    async def emit(self, *thoughts: Thought, result: str = "", remember: bytes = b"") -> None:
        """Write ``thoughts`` now, after everything queued; the last may end the run,
        and then ``remember`` (the turn's messages) joins the session's memory."""
        await self.settled()
        last = thoughts[-1]
        heads = [self.bus.encode(self.job, t) for t in thoughts]
        status = TERMINAL_STATUS[last.type] if last.terminal else ""
        first, self._next = self._next, self._next + len(heads)
        if await self._write_numbered(heads, first, status, result, remember) == FENCED:
            raise LeaseLost

    async def queue(self, thought: Thought) -> None:
        """Queue ``thought`` for writing, stamped now; the agent goes on meanwhile."""
        if self._failure is not None:
            raise self._failure
        self._queued.append(self.bus.encode(self.job, thought))
        if self._flight is None:
            self._send_next()
        elif len(self._queued) >= MAX_QUEUED:
            await self.settled()

    async def settled(self) -> None:
        """Wait until nothing is queued or in flight; raise what made a write fail."""
        while self._flight is not None:
            waiter = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            await waiter
        if self._failure is not None:
            raise self._failure

    def abandon(self) -> None:
        """Drop the write under way: the attempt is ending without it."""
        if self._flight is not None:
            self._flight.cancel()

    def _send_next(self) -> None:
        batch = self._queued[:MAX_BATCH]
        del self._queued[:MAX_BATCH]
        # Numbers are taken before the call: if it is dropped after Redis ran it, the
        # next call must not reuse them (the script would skip its events).
        first, self._next = self._next, self._next + len(batch)
        self._span = tracing.start("append", {"thoughtwire.events": len(batch)})
        flight = self.bus.submit_encoded(
            self.job, batch, fence=self.fence, first=first, min_seq=self._last_seq
        )
        flight.add_done_callback(partial(_appended, len(batch), time.perf_counter()))
        self._watch(flight, batch, first)

    def _watch(self, flight: asyncio.Future[Any], batch: list[bytes], first: int) -> None:
        self._flight = flight
        flight.add_done_callback(partial(self._landed, batch, first))

    def _landed(self, batch: list[bytes], first: int, flight: asyncio.Future[Any]) -> None:
        self._flight = None
        if self._span is not None:
            tracing.end(self._span, {"thoughtwire.first": first})
            self._span = None
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
            self._on_fenced()
        else:
            self._last_seq = int(flight.result())  # a retry has set it already
            self._written()
            if self._queued:
                self._send_next()
        if self._flight is None:
            for waiter in self._waiters:
                if not waiter.done():
                    waiter.set_result(None)
            self._waiters.clear()

    async def _write_numbered(
        self,
        heads: list[bytes],
        first: int,
        status: str = "",
        result: str = "",
        remember: bytes = b"",
    ) -> int:
        with tracing.span("append", {"thoughtwire.events": len(heads)}):
            began = time.perf_counter()
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
                    turns=self.memory_turns,
                ),
                seconds=self.retry_seconds,
            )
        seq = int(reply)
        APPEND_SECONDS.observe(time.perf_counter() - began)  # retries and backoff included
        APPEND_BATCH_SIZE.observe(len(heads))
        if seq != FENCED:
            self._last_seq = seq
            self._written()
        return seq

    def _written(self) -> None:
        if self._on_written is not None:
            self._on_written(self._last_seq)


def _appended(events: int, sent_at: float, flight: asyncio.Future[Any]) -> None:
    """An append call answered: its latency and size (a failed one is retried, and timed there)."""
    if not flight.cancelled() and flight.exception() is None:
        APPEND_SECONDS.observe(time.perf_counter() - sent_at)
        APPEND_BATCH_SIZE.observe(events)
