"""Resume, as pure functions: where to read a session's log from, and how to merge what
was read with the live frames that arrived meanwhile. No I/O here.

A frontend that (re)joins a session subscribes first, buffers live frames, reads the
log, then sends log entries and buffered frames in ``seq`` order, dropping the
duplicates at the boundary. Every event is in the log, in the buffer, or both, so
nothing falls between. What the log no longer holds is announced with a ``gap``
reply, never silently skipped:

* ``trimmed``: the log was cut by its MAXLEN; the oldest events are gone.
* ``expired``: the session's log is gone altogether (TTL, or Redis lost its data).
* ``epoch``: the log restarted under a new epoch; its seq numbering starts over.

A gap says where the stream continues: ``next`` is the seq of the next event in
``epoch``. Clients resume from there.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson

from shared.bus import Meta
from shared.protocol import event_position


@dataclass(frozen=True, slots=True)
class Position:
    """The last event a client has: ``seq`` within ``epoch`` (None: not known yet)."""

    epoch: str | None
    seq: int


@dataclass
class Recovered:
    frames: list[str]  # to send, in order: events and gap replies
    position: Position  # where the client stands after them
    pending: list[str] = field(default_factory=list)  # frames of a newer epoch: recover again


def log_reset(position: Position, meta: Meta) -> str | None:
    """Why the log cannot continue from ``position`` (a gap reason), or None."""
    if position.seq == 0:
        return None
    if meta.epoch is None:
        return "expired"
    if position.epoch not in (None, meta.epoch) or position.seq > meta.last_seq:
        return "epoch"
    return None


def replay_from(position: Position | None, meta: Meta) -> int:
    """The seq after which to read the log. None means "from now on"."""
    if position is None:
        return meta.last_seq
    if log_reset(position, meta):
        return 0
    return position.seq


def gap(session: str, reason: str, after: int, epoch: str | None, next_seq: int) -> dict[str, Any]:
    return {
        "type": "gap",
        "session": session,
        "reason": reason,
        "after": after,
        "epoch": epoch,
        "next": next_seq,
    }


def recover(
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
        if reason is not None:
            out.append(gap(session, reason, seq, meta.epoch, 1))
            epoch, seq = meta.epoch, 0
    frames = [*entries, *live]
    for i, frame in enumerate(frames):
        at = event_position(frame)
        if at is None:
            continue
        frame_seq, frame_epoch = at
        if epoch is None:
            epoch = frame_epoch  # the first event of a log that did not exist yet
        elif frame_epoch != epoch:
            # A newer epoch began after the log was read: read it again from there.
            pending = [f for f in frames[i:] if _epoch_of(f) != epoch]
            return _finish(out, Position(epoch, seq), pending)
        if frame_seq <= seq:
            continue  # in both the log and the buffer
        if frame_seq > seq + 1:
            if out and isinstance(out[-1], dict) and out[-1]["next"] == seq + 1:
                out[-1]["next"] = frame_seq  # the same hole as the gap just announced
            else:
                out.append(gap(session, "trimmed", seq, epoch, frame_seq))
        out.append(frame)
        seq = frame_seq
    return _finish(out, Position(epoch, seq), [])


def _epoch_of(frame: str) -> str | None:
    at = event_position(frame)
    return None if at is None else at[1]


def _finish(out: list[Any], position: Position, pending: list[str]) -> Recovered:
    frames = [orjson.dumps(f).decode() if isinstance(f, dict) else f for f in out]
    return Recovered(frames, position, pending)
