"""Snapshots: a session's compacted state at a seq, kept beside its log.

A snapshot is ``(epoch, seq, state)``: the reducer's state (:mod:`thoughtwire.shared.reducer`)
after folding the session's log up to ``seq``, then compacted (:func:`compact`). It
never disagrees with the log, because it is only ever made one way: a stored snapshot
(or the initial state) with the log's *contiguous* tail folded onto it, and it is
written only forward (``SAVE_SNAPSHOT``: a snapshot of the log's current epoch at a seq
above the stored one). Any writer may make one: the state at a seq is a function of the
log, so two writers at one seq write the same state, and the script keeps the newest.

The workers keep it (:mod:`thoughtwire.worker.snapshots`, every :data:`SNAPSHOT_EVERY`
events and as a run ends); a frontend reads it for a joining viewer and folds the few
events since (:mod:`thoughtwire.api.snapshots`). docs/protocol.md, "Snapshots".
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson

from thoughtwire.shared.bus import Bus
from thoughtwire.shared.reducer import ENDED, State, fold, initial_state

SNAPSHOT_EVERY = 256  # events a worker writes between two snapshots of its session
FINISHED_KEPT = 20  # finished runs a snapshot keeps, the latest; older ones are dropped
TAIL_PAGE = 1000  # log entries read at a time when folding a tail
TAIL_PAGES = 20  # pages folded onto one snapshot at most (a log holds 10,000 by default)


def compact(state: State) -> State:
    """``state`` with its finished runs in short form, the latest :data:`FINISHED_KEPT` of them.

    Unfinished runs are kept whole. A finished run keeps its status, attempt, usage,
    error, finish_reason and its text blocks (the answer); its reasoning and tool
    blocks go. Idempotent, and pure: it makes a new state and changes nothing given.
    """
    runs: dict[str, Any] = state["runs"]
    finished = [r for r in state["order"] if runs[r]["status"] in ENDED]
    dropped = set(finished[: max(0, len(finished) - FINISHED_KEPT)])
    order = [r for r in state["order"] if r not in dropped]
    kept = {r: _short(runs[r]) for r in order}
    return {**state, "runs": kept, "order": order}


def _short(run: dict[str, Any]) -> dict[str, Any]:
    if run["status"] not in ENDED:
        return run
    return {**run, "blocks": [b for b in run["blocks"] if b["kind"] == "text"]}


@dataclass(frozen=True, slots=True)
class Snapshot:
    """A session's compacted state at ``seq`` of ``epoch``."""

    session: str
    epoch: str
    seq: int
    state: State
    _frame: list[str] = field(default_factory=list, compare=False, repr=False)

    @property
    def frame(self) -> str:
        """The snapshot frame, encoded once however many viewers are sent it."""
        if not self._frame:
            self._frame.append(snapshot_frame(self.session, self.state))
        return self._frame[0]


def snapshot_frame(session: str, state: State) -> str:
    """The frame a viewer is sent for ``state``: the one place a snapshot becomes a frame.

    A projection of the state for a viewer (what its scope may see) goes here. The
    position comes last, as an event's does, so it is read off the tail like one
    (:func:`thoughtwire.shared.protocol.event_position`: an SSE ``id``, a resume).
    """
    return orjson.dumps(
        {
            "type": "snapshot",
            "session": session,
            "state": state,
            "seq": state["seq"],
            "epoch": state["epoch"],
        }
    ).decode()


class Hole(Exception):
    """The log does not continue the state: a trimmed or restarted log."""


def fold_tail(state: State, entries: Sequence[str]) -> State:
    """``entries`` (log events after ``state``'s seq, in order) folded onto ``state``.

    Raises :class:`Hole` unless they continue it contiguously, in its epoch: a state
    with a hole in it would disagree with the log.
    """
    frames = [orjson.loads(e) for e in entries]
    seq, epoch = state["seq"], state["epoch"]
    for frame in frames:
        if frame.get("seq") != seq + 1 or (epoch is not None and frame.get("epoch") != epoch):
            raise Hole(f"after seq {seq} of {epoch} comes {frame.get('seq')}")
        seq, epoch = frame["seq"], frame.get("epoch")
    return fold(_joined(frames), state)


DELTAS = ("thinking", "answer", "tool_input")


def _joined(frames: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Consecutive deltas of one block as one frame at the last one's seq.

    The reducer appends each delta's content to its block, so the joined frame folds
    to the same state; it copies a block's text once, not once per token, and a frame
    once per run of deltas, not once per delta.
    """
    out: list[dict[str, Any]] = []
    pieces: list[str] = []  # the contents of the run of deltas ending at ``last``
    last: dict[str, Any] | None = None
    block: tuple[Any, ...] | None = None  # the block ``last`` is a delta of, if it is one
    for frame in frames:
        key = _delta_block(frame)
        if key is not None and key == block:
            pieces.append(frame["content"])
            last = frame
            continue
        if last is not None:
            out.append(_run_of(last, pieces))
        last, block, pieces = frame, key, [frame["content"]] if key is not None else []
    if last is not None:
        out.append(_run_of(last, pieces))
    return out


def _run_of(last: dict[str, Any], pieces: list[str]) -> dict[str, Any]:
    """``last``, standing for the deltas whose contents are ``pieces`` (itself if one)."""
    return last if len(pieces) < 2 else {**last, "content": "".join(pieces)}


def _delta_block(frame: dict[str, Any]) -> tuple[Any, ...] | None:
    """The ``(type, run, block)`` a frame is a plain delta of, or None if it is none."""
    kind = frame.get("type")
    if (
        kind in DELTAS
        and frame.get("delta") is True
        and isinstance(block := frame.get("block"), str)
        and isinstance(frame.get("content"), str)
        and "from_seq" not in frame
    ):
        return (kind, frame.get("run"), block)
    return None


async def stored(bus: Bus, session: str) -> State | None:
    """The session's stored snapshot's state, or None."""
    raw = await bus.snapshot(session)
    return None if raw is None else orjson.loads(raw)


async def _fold_log(bus: Bus, session: str, state: State, upto: int | None = None) -> State:
    """``state`` brought up to the end of the log, or to seq ``upto`` (a page at a time,
    bounded)."""
    for _ in range(TAIL_PAGES):
        page = TAIL_PAGE if upto is None else min(TAIL_PAGE, upto - state["seq"])
        if page <= 0:
            return state
        entries = await bus.history(session, state["seq"], page)
        state = fold_tail(state, entries)
        if len(entries) < page:
            return state
    return state  # still behind: the next reader goes on from here


async def current(bus: Bus, session: str, upto: int | None = None) -> Snapshot | None:
    """The session's state at the end of its log, from its snapshot and the tail since;
    with ``upto``, at that seq at most (a stored snapshot past it is not used).

    None when the session has no events, or when no snapshot covers what the log lost
    (then a viewer gets the raw log, with its ``gap``).
    """
    base = await stored(bus, session)
    later = None
    if base is not None and upto is not None and base["seq"] > upto:
        base, later = None, base  # folded from the log's start instead
    for start in (base, None) if base is not None else (None,):
        try:
            state = await _fold_log(bus, session, start or initial_state(), upto)
        except Hole:
            continue  # a snapshot of an older epoch, or older than the log: from the start
        if state["seq"] == 0 or state["epoch"] is None:
            return None
        return Snapshot(session, state["epoch"], state["seq"], compact(state))
    if later is not None:  # the log no longer starts at 1: one past the bound beats none
        return await current(bus, session)
    return None


async def save(bus: Bus, session: str) -> bool:
    """Bring the session's snapshot up to the end of its log; True if one was written."""
    snapshot = await current(bus, session)
    if snapshot is None:
        return False
    return await bus.save_snapshot(
        session, snapshot.epoch, snapshot.seq, orjson.dumps(snapshot.state)
    )
