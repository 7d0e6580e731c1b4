"""Resume, as pure functions: where to read a session's log from, and how to merge what
was read with the live frames that arrived meanwhile. No I/O here.

A frontend that (re)joins a session subscribes first, buffers live frames, reads the
log, then sends log entries and buffered frames in ``seq`` order, dropping the
duplicates at the boundary. Every event is in the log, in the buffer, or both, so
nothing falls between. What the log no longer holds, or what cannot be confirmed, is
announced with a ``gap`` reply, never silently skipped (:class:`GapReason`).

A gap says where the stream continues: ``next`` is the seq of the next event in
``epoch``. Clients resume from there.

:func:`catch_up` is the whole catch-up loop (rounds of a meta read, log pages and a
merge), written without I/O: it yields what to read or send and is answered with what
was read. The viewer runs it against Redis; the tests run it against a model log. It
ends in a bounded number of steps whatever it is told.
"""

from __future__ import annotations

from collections.abc import Generator, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import orjson

from thoughtwire.shared.bus import Meta
from thoughtwire.shared.protocol import event_position
from thoughtwire.shared.vocab import Replay as Replay  # how a catch-up replays: its contract

RECOVERY_PAGE = 500  # log entries read at a time when catching up
CATCH_UP_ROUNDS = 16  # meta reads before a catch-up gives up (the client reconnects)
CATCH_UP_PAGES = 10_000  # log pages read in one round, at most (5M events)


class GapReason(StrEnum):
    """Why a ``gap`` reply was sent."""

    TRIMMED = "trimmed"  # the log was cut by its MAXLEN; the oldest events are gone
    EXPIRED = "expired"  # the session's log is gone altogether (TTL, or Redis lost its data)
    EPOCH = "epoch"  # the log restarted under a new epoch; its seq numbering starts over
    # The client named no epoch, so its seq may belong to a log that restarted since:
    # the stream continues after that seq of the current epoch, and says so.
    UNCONFIRMED = "unconfirmed"


@dataclass(frozen=True, slots=True)
class Position:
    """The last event a client has: ``seq`` within ``epoch`` (None: not known yet)."""

    epoch: str | None
    seq: int


@dataclass
class Recovered:
    """What one merge produced."""

    frames: list[str]  # to send, in order: events and gap replies
    position: Position  # where the client stands after them
    pending: list[str] = field(default_factory=list)  # frames of another epoch: recover again


def log_reset(position: Position, meta: Meta) -> GapReason | None:
    """Why the log cannot simply continue from ``position`` (a gap reason), or None.

    A position that names no epoch is trusted only at seq 0 (the client has nothing
    yet): any other seq may be of a log that restarted since.
    """
    if position.seq == 0 and position.epoch in (None, meta.epoch):
        return None
    if meta.epoch is None:
        return GapReason.EXPIRED
    if position.epoch not in (None, meta.epoch) or position.seq > meta.last_seq:
        return GapReason.EPOCH
    if position.epoch is None:
        return GapReason.UNCONFIRMED
    return None


def _from_start(reason: GapReason | None) -> bool:
    return reason in (GapReason.EXPIRED, GapReason.EPOCH)


def replay_from(position: Position | None, meta: Meta) -> int:
    """The seq after which to read the log. None means "from now on"."""
    if position is None:
        return meta.last_seq
    if _from_start(log_reset(position, meta)):
        return 0
    return position.seq


def gap(session: str, reason: str, after: int, epoch: str | None, next_seq: int) -> dict[str, Any]:
    """A ``gap`` reply: events after ``after`` are not coming; ``next`` of ``epoch`` is."""
    return {
        "type": "gap",
        "session": session,
        "reason": reason,
        "after": after,
        "epoch": epoch,
        "next": next_seq,
    }


# One decision over the log's state (position, epoch, trim, live tail), kept whole so each
# case reads beside the others; tests/test_recovery_properties.py checks every case.
def recover(  # noqa: C901
    session: str,
    position: Position | None,
    meta: Meta,
    entries: Sequence[str],
    live: Sequence[str],
) -> Recovered:
    """Merge log ``entries`` (read after :func:`replay_from`) with buffered ``live`` frames."""
    out: list[Any] = []
    if position is None:
        # "From now on" means from the subscription: the buffer holds every event
        # since, even ones the log already counted when its meta was read, so the log
        # adds nothing. Without a buffered event, now is the meta's position.
        epoch, seq = meta.epoch, meta.last_seq
        heard = [at for at in map(event_position, live) if at is not None]
        if heard:
            epoch, seq = heard[0][1], heard[0][0] - 1
        entries = ()
    else:
        epoch, seq = position.epoch or meta.epoch, position.seq
        reason = log_reset(position, meta)
        if _from_start(reason):
            out.append(gap(session, str(reason), seq, meta.epoch, 1))
            epoch, seq = meta.epoch, 0
        elif reason is not None:
            out.append(gap(session, str(reason), seq, meta.epoch, seq + 1))
    frames = [*entries, *live]
    for i, frame in enumerate(frames):
        at = event_position(frame)
        if at is None:
            continue
        frame_seq, frame_epoch = at
        if epoch is None:
            epoch = frame_epoch  # the first event of a log that did not exist yet
        elif frame_epoch != epoch:
            # Another epoch than the log read: newer (read again from there) or older
            # (the next round's meta tells, see :func:`catch_up`).
            pending = [f for f in frames[i:] if _epoch_of(f) != epoch]
            return _finish(out, Position(epoch, seq), pending)
        if frame_seq <= seq:
            continue  # in both the log and the buffer
        if frame_seq > seq + 1:
            if out and isinstance(out[-1], dict) and out[-1]["next"] == seq + 1:
                # The same hole as the gap just announced (whose epoch may not have been known).
                out[-1].update(epoch=epoch, next=frame_seq)
            else:
                out.append(gap(session, GapReason.TRIMMED, seq, epoch, frame_seq))
        out.append(frame)
        seq = frame_seq
    return _finish(out, Position(epoch, seq), [])


def _epoch_of(frame: str) -> str | None:
    at = event_position(frame)
    return None if at is None else at[1]


def _finish(out: list[Any], position: Position, pending: list[str]) -> Recovered:
    frames = [orjson.dumps(f).decode() if isinstance(f, dict) else f for f in out]
    return Recovered(frames, position, pending)


# --- the catch-up loop, without I/O -------------------------------------------


@dataclass(frozen=True, slots=True)
class TakeLive:
    """Hand over the live frames buffered so far; the buffer goes on filling, empty."""


@dataclass(frozen=True, slots=True)
class ReadMeta:
    """Read the session's :class:`Meta`."""


@dataclass(frozen=True, slots=True)
class ReadLog:
    """Read at most ``count`` log entries with a seq above ``after``, oldest first."""

    after: int
    count: int


@dataclass(frozen=True, slots=True)
class Emit:
    """Send ``frames`` in order; the client then stands at ``position``."""

    frames: list[str]
    position: Position


@dataclass(frozen=True, slots=True)
class Settle:
    """Answer True, and stop buffering, if nothing was buffered or missed since the last take."""


@dataclass(frozen=True, slots=True)
class ReadSnapshot:
    """Read the session's current snapshot, at seq ``upto`` at most if it is given:
    answered with a ``Snapshot``, or None."""

    upto: int | None = None


Step = TakeLive | ReadMeta | ReadLog | ReadSnapshot | Emit | Settle
CatchUp = Generator[Step, Any, bool]


def catch_up(
    session: str,
    position: Position | None,
    *,
    page: int = RECOVERY_PAGE,
    rounds: int = CATCH_UP_ROUNDS,
    pages: int = CATCH_UP_PAGES,
    replay: Replay = Replay.RAW,
    now: Meta | None = None,
) -> CatchUp:
    """Catch a client up from ``position`` (None: from now on) to the live tail.

    Each round reads the meta, then the log a page at a time, and merges the last
    page with the live frames buffered meanwhile. Once the client has a position,
    frames heard before a meta read whose epoch is not the meta's are older than the
    log and are dropped (the gap that takes the client to the meta's epoch covers
    them): without that, a frame of an old epoch would be pending in every round. Returns
    True once settled; False after ``rounds`` rounds that did not settle.

    With ``replay`` :attr:`Replay.SNAPSHOT`, a client joining from now on (a session
    that has events) first gets a ``snapshot`` frame and goes on from its seq, and a
    position the log no longer holds is repaired by one when it covers the loss.
    ``now`` is the meta read before the client was greeted: such a join starts where
    the log stood then, and has a snapshot only if the log had events then.
    """
    held: list[str] = []  # frames taken but not merged yet
    if replay is Replay.SNAPSHOT and position is None:
        position, held = yield from _snapshot_join(now)
    for _ in range(rounds):
        heard = [*held, *(yield TakeLive())]
        meta: Meta = yield ReadMeta()
        if position is None:
            # Everything heard since the subscription is news to the client, whatever
            # its epoch: recover() takes it in order and leaves a newer epoch pending.
            live = [*heard, *(yield TakeLive())]
            result = recover(session, None, meta, (), live)
            yield Emit(result.frames, result.position)
            position, held = result.position, result.pending
        else:
            heard = [f for f in heard if _epoch_of(f) == meta.epoch]
            position, held = yield from _read_log(
                session, position, meta, heard, page, pages, replay
            )
        if not held and (yield Settle()):
            return True
    return False


def _snapshot_join(
    before: Meta | None = None,
) -> Generator[Step, Any, tuple[Position | None, list[str]]]:
    """A join's snapshot: the position it leaves the client at, and the frames taken.

    The client's position is the snapshot's seq: what follows comes once, from the
    seq after it, and an event heard since the subscription that the snapshot holds is
    not sent again. For a client that ignores snapshots, "from now on" starts at the
    snapshot rather than at the subscription, a few milliseconds later. A session with
    no events when the client subscribed gets no snapshot at all. Given ``before`` (the
    log's meta before the greeting), that is when "now" is: the snapshot stops there at
    most, and without one the client goes on from there; what the log counts since
    comes as events.
    """
    meta: Meta = before if before is not None else (yield ReadMeta())
    heard: list[str] = yield TakeLive()
    now = meta.last_seq
    first = next((at for at in map(event_position, heard) if at is not None), None)
    if first is not None and first[1] == meta.epoch:
        now = min(now, first[0] - 1)
    start = None if before is None else Position(meta.epoch, now)
    if meta.epoch is None or now == 0:
        return start, heard
    snapshot = yield ReadSnapshot(None if before is None else now)
    if snapshot is None or snapshot.epoch != meta.epoch:
        return start, heard
    position = Position(snapshot.epoch, snapshot.seq)
    yield Emit([snapshot.frame], position)
    return position, heard


def _read_log(
    session: str,
    position: Position,
    meta: Meta,
    heard: list[str],
    page: int,
    pages: int,
    replay: Replay = Replay.RAW,
) -> Generator[Step, Any, tuple[Position, list[str]]]:
    """One round's log pages: the client's new position, and the frames still to merge."""
    after = replay_from(position, meta)
    for n in range(pages):
        entries: list[str] = yield ReadLog(after, page)
        if n == 0 and replay is Replay.SNAPSHOT and _trimmed(position, meta, after, entries):
            snapshot = yield ReadSnapshot()
            if _covers(snapshot, meta, entries):
                position = Position(snapshot.epoch, snapshot.seq)
                yield Emit([snapshot.frame], position)
                after, meta = position.seq, Meta(meta.epoch, max(meta.last_seq, position.seq))
                entries = yield ReadLog(after, page)
        last = len(entries) < page
        live = [*heard, *(yield TakeLive())] if last else []
        result = recover(session, position, meta, entries, live)
        yield Emit(result.frames, result.position)
        position = result.position
        if result.pending or last:
            return position, result.pending if last else [*heard, *result.pending]
        after = position.seq
        meta = Meta(position.epoch, max(meta.last_seq, position.seq))
    return position, heard


def _trimmed(position: Position, meta: Meta, after: int, entries: Sequence[str]) -> bool:
    """Whether the log, in the client's epoch, no longer holds the events after ``after``."""
    if not entries or meta.epoch is None or log_reset(position, meta) is not None:
        return False
    first = event_position(entries[0])
    return first is not None and first[1] == meta.epoch and first[0] > after + 1


def _covers(snapshot: Any, meta: Meta, entries: Sequence[str]) -> bool:
    """Whether ``snapshot`` (or None) reaches the log's first event: nothing falls between."""
    first = event_position(entries[0])
    return (
        snapshot is not None
        and first is not None
        and snapshot.epoch == meta.epoch
        and snapshot.seq >= first[0] - 1
    )
