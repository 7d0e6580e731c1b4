"""A viewer: one client's view of one session, whatever carries it (a socket, an SSE stream).

It holds the client's position ``(epoch, seq)`` and hands frames, in order, to its
transport (:mod:`thoughtwire.api.transport`), which never calls back. Live events that continue
the position go on at once; anything else (a duplicate, a hole, a new epoch) is
settled against the log by a recovery task (:mod:`thoughtwire.api.recovery`), so the client sees
every event once and in order, or an explicit ``gap``.

A transport that keeps up takes each frame in the caller's own call (``write``), with
no task and no queue. When it pushes back, frames wait in a bounded queue, made on
first use, and a writer task, alive only while frames wait, offers them to ``send``
one at a time: an idle viewer holds no task.

Slow-client policy (:mod:`thoughtwire.api.backlog`): past ``queue_size`` waiting
frames, the queue's consecutive deltas of one block are merged into one frame, so a
slow reader still gets every token's content, in fewer frames. A queue that, merged,
still holds more than ``queue_bytes`` is a client too far behind: the viewer closes
its transport with 4008 (SLOW), which tells the client to reconnect and resume from
its last ``seq``. Nobody waits: a send in progress is abandoned.
"""

from __future__ import annotations

import asyncio
import logging
from functools import partial
from typing import Any

from thoughtwire.api import scopes
from thoughtwire.api.backlog import Backlog
from thoughtwire.api.hub import Hub, Run
from thoughtwire.api.metrics import COUNTS, Resume, resume_outcome
from thoughtwire.api.recovery import (
    CATCH_UP_ROUNDS,
    Emit,
    Position,
    ReadLog,
    ReadMeta,
    ReadSnapshot,
    Replay,
    Settle,
    Step,
    TakeLive,
    catch_up,
)
from thoughtwire.api.snapshots import reader
from thoughtwire.api.transport import Transport
from thoughtwire.shared.backoff import UNAVAILABLE, retry
from thoughtwire.shared.bus import Bus, Meta
from thoughtwire.shared.closecodes import Close
from thoughtwire.shared.vocab import ViewScope

logger = logging.getLogger("thoughtwire.viewer")

RECOVERY_RETRY_SECONDS = 10.0
LOG_UNAVAILABLE = "the event log is unavailable; reconnect and resume"
CATCH_UP_PATIENCE = 10.0  # seconds a catch-up waits for room in the queue
BUFFER_FACTOR = 4  # live frames held during a catch-up, in queue sizes

SLOW_REASON = "slow consumer: reconnect and resume"
QUEUE_BYTES = 1 << 20  # the default byte cap of a viewer's queue (THOUGHTWIRE_SEND_QUEUE_BYTES)


class Viewer:
    """One client's view of one session: its position, recovery and queue, over a transport."""

    # A frontend holds one per socket, for hours: no per-instance dict.
    __slots__ = (
        "_again",
        "_buffer",
        "_channels",
        "_epoch",
        "_now",
        "_queue",
        "_queue_bytes",
        "_queue_size",
        "_recovery",
        "_replay",
        "_resume",
        "_seq",
        "_transport",
        "_writer",
        "bus",
        "closed",
        "hub",
        "scope",
        "session",
    )

    def __init__(
        self,
        bus: Bus,
        hub: Hub,
        transport: Transport,
        *,
        queue_size: int,
        queue_bytes: int = QUEUE_BYTES,
        scope: ViewScope = ViewScope.FULL,
    ) -> None:
        self.bus = bus
        self.scope = scope  # what its token shows (api/scopes.py): fixed for its life
        self.hub = hub
        self._transport = transport
        self._queue: Backlog | None = None  # made on first use: most never need it
        self._queue_size = queue_size
        self._queue_bytes = queue_bytes
        self._writer: asyncio.Task[None] | None = None  # alive only while frames wait
        self.session: str | None = None
        self._channels: set[str] = set()
        self._epoch: str | None = None
        self._seq = 0
        self._buffer: list[str] | None = None  # live frames held while the log is read
        self._again = False
        self._recovery: asyncio.Task[None] | None = None
        self._replay = Replay.RAW  # how follow() asked to be caught up
        self._now: Meta | None = None  # a join's log as it stood before the greeting
        self._resume: Resume | None = None  # a resume's outcome so far, until it settles
        self.closed = False

    @property
    def queue(self) -> Backlog:
        """Frames the transport pushed back, waiting for it: merged, and capped in bytes."""
        if self._queue is None:
            self._queue = Backlog(self._queue_size, self._queue_bytes)
        return self._queue

    @property
    def position(self) -> Position:
        """The last event the client was given: ``(epoch, seq)``."""
        return Position(self._epoch, self._seq)

    def oldest_waiting(self) -> str | None:
        """The oldest frame its transport has not taken yet, if one waits (for metrics)."""
        return None if self._queue is None else self._queue.oldest()

    # --- frames in ----------------------------------------------------------

    def put(self, frame: str, wire: bytes | None = None) -> None:
        """Send or queue a frame for the client; closes the client when it is too far behind.

        ``wire`` is the frame ready-made for a WebSocket (:mod:`thoughtwire.api.wire`), if the hub
        made it. While nothing waits, the transport is offered the frame at once; only
        when it pushes back does the frame queue.
        """
        if self.closed:
            return
        writer = self._writer
        if (writer is None or writer.done()) and self._transport.write(frame, wire):
            return
        if not self.queue.push(frame):
            self.close(Close.SLOW, SLOW_REASON)
            return
        self._wake_writer()

    def deliver(
        self, frame: str, position: tuple[int, str] | None, wire: bytes | None = None
    ) -> None:
        """From the hub: one frame, with its position when it is an event. Never blocks."""
        if position is None or self.closed:
            self.put(frame, wire)
            return
        if self._buffer is not None:
            if len(self._buffer) >= self._queue_size * BUFFER_FACTOR:
                self.close(Close.SLOW, SLOW_REASON)
            self._buffer.append(frame)
            return
        seq, epoch = position
        if epoch == self._epoch or (self._epoch is None and self._seq == 0 and seq == 1):
            if seq == self._seq + 1:
                self._epoch, self._seq = epoch, seq
                self.put(frame, wire)
                return
            if seq <= self._seq:
                return  # already sent
        # A hole, or another epoch: settle it against the log.
        self._buffer = [frame]
        self._start_recovery(self.position)

    def deliver_run(self, run: Run) -> None:
        """From the hub: a run of frames that came in one read, in order. Never blocks.

        A run that continues the position as a whole, to a transport with nothing of
        the viewer's waiting, goes in one write; any other run goes frame by frame.
        """
        if (
            run.epoch is not None
            and run.epoch == self._epoch
            and run.first == self._seq + 1
            and self._buffer is None
            and not self.closed
            and (self._writer is None or self._writer.done())
            and self._transport.write_run(run.frames, run.wire)
        ):
            self._seq = run.last
            return
        for frame, position, wire in zip(run.frames, run.positions, run.wires, strict=True):
            self.deliver(frame, position, wire)

    def deliver_view(
        self, frame: str, position: tuple[int, str] | None, view: str | None, wire: bytes | None
    ) -> None:
        """From the hub, to a viewer whose scope is not full: ``view`` is what its scope
        shows of ``frame`` (None: nothing), ``wire`` the view ready for a WebSocket.

        An event its scope drops moves the position as a sent one does, so the next
        one's seq jumping over it is no hole. A catch-up buffers ``frame`` as it came:
        what it sends is projected then.
        """
        if position is None or self.closed:
            if view is not None:
                self.put(view, wire)
        elif self._advance(frame, position) and view is not None:
            self.put(view, wire)

    def _advance(self, frame: str, position: tuple[int, str]) -> bool:
        """Whether the event at ``position`` is the next one (the position moves to it);
        otherwise it is buffered, dropped as a duplicate, or settled by a catch-up.
        :meth:`deliver` inlines the same steps: it runs per socket and event."""
        if self._buffer is not None:
            if len(self._buffer) >= self._queue_size * BUFFER_FACTOR:
                self.close(Close.SLOW, SLOW_REASON)
            self._buffer.append(frame)
            return False
        seq, epoch = position
        if epoch == self._epoch or (self._epoch is None and self._seq == 0 and seq == 1):
            if seq == self._seq + 1:
                self._epoch, self._seq = epoch, seq
                return True
            if seq <= self._seq:
                return False  # already sent
        self._buffer = [frame]
        self._start_recovery(self.position)
        return False

    def resync(self) -> None:
        """From the hub, after it reconnected: frames may have been missed meanwhile."""
        if self.session is None or self.closed:
            return
        if self._buffer is not None:
            self._again = True
            return
        self._buffer = []
        self._start_recovery(self.position)

    # --- following ----------------------------------------------------------

    async def follow(
        self,
        session: str,
        after: int | None = None,
        epoch: str | None = None,
        greeting: str | None = None,
        replay: Replay = Replay.RAW,
    ) -> None:
        """Follow ``session``: from after ``after`` (a resume), or from now on.

        ``greeting`` is queued once the previous session is left, so no frame of
        that session comes after it, and once this frontend is subscribed to the new
        one: a client that acts on the greeting (a prompt through another frontend) must
        not make events this one is not yet listening for. ``replay``
        :attr:`Replay.SNAPSHOT` starts a join with the session's snapshot, and repairs a
        trimmed log with one.
        """
        if self.session is not None:
            self._stop_recovery()
            # While it leaves (the hub's lock may be held), a hole or a resync in the old
            # session must not start a catch-up of it: its frames wait here, to be dropped.
            self._buffer = []
            await self.leave(self.bus.session_channel(self.session))
        self.session = session
        self._epoch, self._seq = epoch, after or 0
        self._replay = replay
        self._resume = None if after is None else Resume.RECOVERED
        self._buffer = []  # subscribe first, read the log second: nothing falls between
        await self.join(self.bus.session_channel(session))
        start = None if after is None else Position(epoch, after)
        self._now = None
        if start is None:
            # "From now on" is from where the log stands before the client is greeted, and
            # goes on as a resume from there: whatever its answer to the greeting makes
            # comes after. Read once the greeting was out, the log could count an event
            # pub/sub had not yet brought here, which then came as old and was dropped (or,
            # for a join with a snapshot, was folded into one the client should not get).
            try:
                meta = await retry(partial(self.bus.meta, session), seconds=RECOVERY_RETRY_SECONDS)
            except UNAVAILABLE:
                self.close(Close.TRY_LATER, LOG_UNAVAILABLE)
                return
            if replay is Replay.RAW:
                start = Position(meta.epoch, meta.last_seq)
                self._epoch, self._seq = start.epoch, start.seq
            else:
                self._now = meta  # the snapshot join starts from it (api/recovery.py)
        if greeting is not None:
            self.put(greeting)  # ahead of the buffered live frames and the log's
        self._stop_recovery()  # from here only this join's catch-up may run
        self._start_recovery(start)

    async def join(self, channel: str) -> None:
        """Take the frames of ``channel`` too."""
        if channel not in self._channels:
            self._channels.add(channel)
            await self.hub.join(channel, self, self.scope)

    async def leave(self, channel: str) -> None:
        """Stop taking the frames of ``channel``."""
        if channel in self._channels:
            self._channels.discard(channel)
            await self.hub.leave(channel, self)

    def close(self, code: int, reason: str) -> None:
        """Stop taking frames, drop what waits, and close the transport. Idempotent.

        A send in progress is abandoned, not waited for: a client that stopped reading
        is closed at once.
        """
        if self.closed:
            return
        if code == Close.SLOW:
            COUNTS.slow_closes[code] += 1
        self._stop()
        self._transport.close(code, reason)

    async def detach(self) -> None:
        """Stop, and leave every channel; its owner calls this once the transport ended."""
        self._stop()
        writer, self._writer = self._writer, None
        if writer is not None:
            await asyncio.gather(writer, return_exceptions=True)
        for channel in list(self._channels):
            await self.leave(channel)

    def _stop(self) -> None:
        self.closed = True
        self._stop_recovery()
        if self._writer is not None:
            self._writer.cancel()
        self._queue = None  # what waited is dropped

    # --- the writer ---------------------------------------------------------

    def _wake_writer(self) -> None:
        """A frame was queued: make sure a writer is offering the queue to the transport."""
        if not self.closed and (self._writer is None or self._writer.done()):
            self._writer = asyncio.get_running_loop().create_task(
                self._write(), name="viewer-writer"
            )
            self._writer.add_done_callback(self._writer_ended)

    async def _write(self) -> None:
        """Hand what is queued to the transport, in order, then end."""
        queue = self.queue
        while not queue.empty():
            if not await self._transport.send(queue.pop()):
                # The transport has ended, and reports its own failure: just stop.
                self._writer = None  # this task, which must not cancel itself
                self._stop()
                return

    def _writer_ended(self, writer: asyncio.Task[None]) -> None:
        if writer is self._writer:
            self._writer = None
        if not writer.cancelled() and writer.exception() is not None:
            logger.error("writing to a transport failed", exc_info=writer.exception())
            self.close(Close.INTERNAL, "internal error")

    # --- recovery -----------------------------------------------------------

    def _start_recovery(self, position: Position | None) -> None:
        if self._recovery is None or self._recovery.done():
            self._recovery = asyncio.create_task(self._recover(position), name="viewer-recovery")
            self._recovery.add_done_callback(self._recovered)

    def _stop_recovery(self) -> None:
        if self._recovery is not None:
            self._recovery.cancel()
            self._recovery = None

    def _recovered(self, task: asyncio.Task[None]) -> None:
        if task.cancelled() or task is not self._recovery:
            return  # a catch-up replaced while it went on (see _current) decides nothing
        exc = task.exception()
        if isinstance(exc, UNAVAILABLE):
            self.close(Close.TRY_LATER, LOG_UNAVAILABLE)
        elif exc is not None:
            logger.error("recovery failed", exc_info=exc)
            self.close(Close.INTERNAL, "internal error")

    async def _recover(self, position: Position | None) -> None:
        """Catch up from the log, a page at a time, then take the buffered live frames.

        :func:`thoughtwire.api.recovery.catch_up` decides; this does its reads and sends. Log
        pages wait for room in the queue (a backlog may be far longer than the
        queue); live frames that arrive meanwhile wait in the buffer.
        """
        session = self.session
        assert session is not None
        now, self._now = self._now, None
        steps = catch_up(session, position, replay=self._replay, now=now)
        answer: Any = None
        try:
            # Bounded: catch_up ends within CATCH_UP_ROUNDS rounds, whatever it is told.
            while self._current():
                try:
                    step = steps.send(answer)
                except StopIteration as done:
                    if not done.value:
                        self._give_up()
                    return
                answer = await self._do(session, step)
        finally:
            steps.close()

    def _current(self) -> bool:
        """Whether the running catch-up is still this viewer's one, and it is open.

        A cancelled catch-up may go on all the same: on Python 3.11, a cancel that comes
        as an awaited Redis reply arrives is lost inside ``asyncio.wait_for`` (which
        redis-py uses). One that goes on after its viewer moved to another session
        would send that session's frames and take the new one's live frames; so after
        every wait it stops unless it is still the current one.
        """
        return not self.closed and asyncio.current_task() is self._recovery

    def _give_up(self) -> None:
        logger.warning(
            "a catch-up did not settle in %d rounds; closing for a reconnect", CATCH_UP_ROUNDS
        )
        self.close(Close.TRY_LATER, "could not catch up; reconnect and resume")

    async def _do(self, session: str, step: Step) -> Any:
        """One step of a catch-up: a read, a send, or a look at the buffer."""
        if isinstance(step, TakeLive):
            live, self._buffer = self._buffer or [], []
            return live
        if isinstance(step, ReadMeta):
            self._again = False  # a resync from here on is seen by this meta read, or Settle
            return await retry(partial(self.bus.meta, session), seconds=RECOVERY_RETRY_SECONDS)
        if isinstance(step, ReadSnapshot):
            return await retry(
                partial(reader(self.bus).get, session, step.upto), seconds=RECOVERY_RETRY_SECONDS
            )
        if isinstance(step, ReadLog):
            return await retry(
                partial(self.bus.history, session, step.after, step.count),
                seconds=RECOVERY_RETRY_SECONDS,
            )
        if isinstance(step, Emit):
            await self._emit(step)
            return None
        assert isinstance(step, Settle)
        return self._settle()

    async def _emit(self, step: Emit) -> None:
        """Send what a catch-up step gives, projected to the viewer's scope."""
        full = self.scope is ViewScope.FULL
        for frame in step.frames:
            view = frame if full else scopes.project_frame(frame, self.scope)
            if view is not None:  # a dropped event: the position moves past it below
                await self._put_patiently(view)
                if not self._current():
                    return
        self._epoch, self._seq = step.position.epoch, step.position.seq
        if self._resume is not None:
            self._resume = resume_outcome(step.frames, self._resume)

    def _settle(self) -> bool:
        """Whether the catch-up is over: nothing live came meanwhile, no resync asked."""
        if self._buffer or self._again:
            return False
        self._buffer = None  # caught up: live frames go straight to the client again
        if self._resume is not None:  # a resume is counted once it has caught up
            COUNTS.resumes[self._resume] += 1
            self._resume = None
        return True

    async def _put_patiently(self, frame: str) -> None:
        if not self._current():
            return
        try:
            async with asyncio.timeout(CATCH_UP_PATIENCE):
                await self.queue.wait_for_room()
        except TimeoutError:
            if self._current():
                self.close(Close.SLOW, SLOW_REASON)
            return
        if self._current():
            self.put(frame)
