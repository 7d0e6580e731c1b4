"""A viewer's backlog: the frames its transport pushed back, merged when it lags, bounded in bytes.

A client that keeps up never has a backlog (its frames are written in the caller's own
call, :mod:`thoughtwire.api.viewer`). One that reads slower than its session streams
gets one, and what it holds is bounded by merging, then by bytes:

1. **Merge, do not drop.** Once more than ``merge_after`` frames wait, consecutive
   deltas of one block (same run, type, block and epoch, seqs following each other)
   become one frame: the last one's fields, ``content`` joined, ``seq`` the last,
   ``from_seq`` the first, and ``lengths`` the characters each merged event carried
   (what a reducer needs to cut a merged frame it has partly seen: docs/protocol.md,
   "Slow viewers"). No content is lost and the reducer's state is the same.
2. **The byte cap is the last resort.** A backlog still over ``max_bytes`` after
   merging is a client too far behind: its viewer closes it with 4008.

Order is never changed. A control event (``block_end``, ``done``, ``error``,
``cancelled``, ``retry``, ``approval``, ``decision``, a whole item, a reply) is never
merged, and it never overtakes a frame queued before it: overtaking an earlier ``seq``
would make a reducer skip that event, a ``block_end`` must follow its block's deltas
and a terminal event its run's. What keeps a control event from waiting behind
tokens is the merge: on a backlog that has been past ``merge_after`` since it was last
empty, a control event queued behind more than ``CONTROL_PATIENCE`` unmerged frames
merges them first, so it waits behind about one frame per block.

The merge parses frames; it runs only on a backlog past a threshold, so a client that
keeps up pays nothing for it. Each frame is parsed about once: a merge looks only at
the frames queued since the last merge, and the last frame before them.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Any

import orjson

from thoughtwire.api.metrics import COUNTS

# Event types whose deltas may be merged: the content events that come as deltas.
DELTA_TYPES = frozenset({"thinking", "answer", "tool_input"})
# Fields that must be equal for two deltas to be one block's.
SAME = ("type", "run", "block", "epoch", "session", "call_id", "tool")
# A control event merges the frames queued before it once more than this many wait.
CONTROL_PATIENCE = 8
DELTA_MARK = '"delta":true'


def merge(frames: list[str]) -> list[str]:
    """``frames`` with each run of consecutive deltas of one block made one frame.

    Pure: frames that are not mergeable deltas (not JSON, control events, replies)
    come out as they went in, in the same order. A merged frame's ``seq`` is its last
    event's and ``from_seq`` its first's; ``lengths`` lists each event's content
    length in characters (Unicode code points), in order.
    """
    out: list[str] = []
    open_: dict[str, Any] | None = None  # the delta at out[-1], decoded, to merge into
    merged = False  # whether ``open_`` holds more than the frame at out[-1]
    for frame in frames:
        delta = _delta(frame)
        if open_ is not None and delta is not None and _follows(open_, delta):
            open_, merged = _joined(open_, delta), True
            continue
        if merged:
            out[-1] = _encode(open_)  # type: ignore[arg-type]
        out.append(frame)  # kept as it is unless a later delta merges into it
        open_, merged = delta, False
    if merged:
        out[-1] = _encode(open_)  # type: ignore[arg-type]
    return out


def _delta(frame: str) -> dict[str, Any] | None:
    """The decoded frame if it is a delta a merge may take, else None."""
    if DELTA_MARK not in frame:
        return None
    try:
        obj = orjson.loads(frame)
    except orjson.JSONDecodeError:
        return None
    if not (
        isinstance(obj, dict)
        and obj.get("type") in DELTA_TYPES
        and obj.get("delta") is True
        and isinstance(obj.get("block"), str)
        and isinstance(obj.get("content"), str)
        and _is_int(obj.get("seq"))
    ):
        return None
    return obj


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _first(obj: dict[str, Any]) -> int:
    first: Any = obj.get("from_seq")
    return int(first) if _is_int(first) else int(obj["seq"])


def _lengths(obj: dict[str, Any]) -> list[int]:
    lengths = obj.get("lengths")
    if isinstance(lengths, list) and len(lengths) == obj["seq"] - _first(obj) + 1:
        return lengths
    return [len(obj["content"])]


def _follows(before: dict[str, Any], after: dict[str, Any]) -> bool:
    """Whether ``after`` continues ``before``'s block with the very next seqs."""
    if _first(after) != before["seq"] + 1:
        return False
    return all(before.get(name) == after.get(name) for name in SAME)


def _joined(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """One frame for both: ``after``'s fields, content joined, covering both ranges."""
    return {
        **after,
        "content": before["content"] + after["content"],
        "from_seq": _first(before),
        "lengths": _lengths(before) + _lengths(after),
    }


def _encode(obj: dict[str, Any]) -> str:
    # seq and epoch go last, as in every event, so the frame's position can be read off
    # its tail (shared.protocol.event_position).
    seq, epoch = obj.pop("seq"), obj.pop("epoch")
    obj["seq"], obj["epoch"] = seq, epoch
    return orjson.dumps(obj).decode()


class Backlog:
    """Frames waiting for a transport, in order: merged past ``merge_after``, capped in bytes.

    ``push`` answers whether the backlog is within ``max_bytes`` after the frame; the
    viewer closes the client when it is not. Bytes are counted as characters of the
    frames' JSON (most frames are ASCII).
    """

    __slots__ = ("_bytes", "_frames", "_fresh", "_lagging", "_merge_after", "_room", "max_bytes")

    def __init__(self, merge_after: int, max_bytes: int) -> None:
        self._frames: deque[str] = deque()
        self._bytes = 0
        self._fresh = 0  # frames at the tail queued since the last merge
        self._lagging = False  # past the threshold once, until the backlog empties
        self._merge_after = merge_after
        self.max_bytes = max_bytes
        self._room: asyncio.Event | None = None  # made when a catch-up waits for room

    def __len__(self) -> int:
        return len(self._frames)

    @property
    def bytes(self) -> int:
        """What the waiting frames hold, in characters."""
        return self._bytes

    def empty(self) -> bool:
        """Whether nothing waits."""
        return not self._frames

    def oldest(self) -> str | None:
        """The oldest waiting frame, left in place; None when nothing waits."""
        return self._frames[0] if self._frames else None

    def push(self, frame: str) -> bool:
        """Queue ``frame``; False when the backlog, merged, is still over its byte cap."""
        if self._lagging and self._fresh > CONTROL_PATIENCE and DELTA_MARK not in frame:
            self.merge()  # a control event does not wait behind tokens
        self._frames.append(frame)
        self._bytes += len(frame)
        self._fresh += 1
        if self._fresh > self._merge_after or self._bytes > self.max_bytes:
            self._lagging = True
            self.merge()
        return self._bytes <= self.max_bytes

    def pop(self) -> str:
        """The oldest waiting frame, taken off the backlog."""
        frame = self._frames.popleft()
        self._bytes -= len(frame)
        self._fresh = min(self._fresh, len(self._frames))
        self._lagging = self._lagging and bool(self._frames)
        if self._room is not None and len(self._frames) < self._merge_after:
            self._room.set()
        return frame

    def merge(self) -> None:
        """Merge the frames queued since the last merge, with the one before them."""
        start = max(len(self._frames) - self._fresh - 1, 0)
        if len(self._frames) - start < 2:
            self._fresh = 0
            return
        tail = [self._frames.pop() for _ in range(len(self._frames) - start)]
        tail.reverse()
        merged = merge(tail)
        COUNTS.merged += len(tail) - len(merged)
        self._frames.extend(merged)
        self._bytes += sum(map(len, merged)) - sum(map(len, tail))
        self._fresh = 0

    async def wait_for_room(self) -> None:
        """Return once fewer than ``merge_after`` frames wait (a catch-up paces itself)."""
        while len(self._frames) >= self._merge_after:
            if self._room is None:
                self._room = asyncio.Event()
            self._room.clear()
            await self._room.wait()
