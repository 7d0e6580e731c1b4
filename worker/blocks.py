"""Blocks: the worker numbers a run's content blocks, so agents never have to.

Agents yield thoughts (shared/protocol.py); a delta carries ``extra={"delta": True}``,
anything else is a whole item. :class:`BlockTracker` sits between an attempt's agent and
its writer and turns each thought into the thoughts to write, each content event with
a ``block`` id (``b1``, ``b2``, ... in the order blocks start) and a ``delta`` flag
(docs/protocol.md, "Blocks").

Guarantees, for the thoughts of one attempt fed in order:

* consecutive deltas of one type (and, for ``tool_input``, one ``call_id``) share a
  block; a whole item is a block of its own, except an ``action``, which completes
  the tool-call block its ``tool_input`` pieces opened;
* a block of deltas is followed by exactly one ``block_end``: when another block
  starts, or from :meth:`BlockTracker.close` just before the run's terminal event
  (a block its whole ``action`` completed needs none);
* ``approval`` and ``decision`` carry the block of their ``call_id``.

It does no I/O and its state is plain JSON (:meth:`BlockTracker.state`), so a run that
waits for an approval can be continued by another attempt from where this one was.
"""

from __future__ import annotations

from typing import Any

from thoughtwire.shared.protocol import Thought

# What each content event is part of; the kinds are docs/protocol.md's block kinds.
CONTENT_TYPES = ("thinking", "answer", "tool_input", "action", "observation")
# Events about a tool call, written into the block of the call.
CALL_TYPES = ("approval", "decision")
# The events whose ``call_id`` names their block: a call's pieces and the call itself.
_CALL_BLOCK_TYPES = ("tool_input", "action")


class BlockTracker:
    """Numbers one attempt's blocks, and closes a block of deltas when the next starts."""

    __slots__ = ("_calls", "_next", "_open")

    def __init__(self) -> None:
        self._next = 1  # the number of the next block
        self._calls: dict[str, str] = {}  # call_id -> the block of that tool call
        # The block of deltas still open: (block, type, call_id); None when none is.
        self._open: tuple[str, str, str | None] | None = None

    def track(self, thought: Thought) -> list[Thought]:
        """The thoughts to write for ``thought``: a ``block_end`` first if it ends one."""
        kind, extra, opened = thought.type, thought.extra, self._open
        if (
            opened is not None
            and kind == opened[1]
            and extra is not None
            and extra.get("delta") is True
            and extra.get("call_id") == opened[2]
        ):
            # The next delta of the open block: most of a run's events, so no detours.
            return [Thought(kind, thought.content, {**extra, "block": opened[0], "delta": True})]
        if kind in CONTENT_TYPES:
            return self._content(thought)
        if kind in CALL_TYPES:
            return [self._call_event(thought)]
        return [thought]  # retry, block_end, terminal events: not part of a block

    def close(self) -> list[Thought]:
        """The ``block_end`` of the open block of deltas, if any: written before the end."""
        if self._open is None:
            return []
        block = self._open[0]
        self._open = None
        return [_block_end(block)]

    def state(self) -> dict[str, Any]:
        """The tracker's state as plain JSON, for :meth:`restore`."""
        return {
            "next": self._next,
            "calls": dict(self._calls),
            "open": None if self._open is None else list(self._open),
        }

    @classmethod
    def restore(cls, state: dict[str, Any]) -> BlockTracker:
        """A tracker that goes on from ``state`` (what :meth:`state` returned)."""
        tracker = cls()
        tracker._next = int(state["next"])
        tracker._calls = {str(k): str(v) for k, v in state["calls"].items()}
        opened = state.get("open")
        if opened is not None:
            block, kind, call_id = opened
            tracker._open = (str(block), str(kind), None if call_id is None else str(call_id))
        return tracker

    def _content(self, thought: Thought) -> list[Thought]:
        extra = thought.extra or {}
        delta = extra.get("delta") is True
        call_id = extra.get("call_id") if thought.type in _CALL_BLOCK_TYPES else None
        block = self._block_for(thought.type, delta, call_id)
        out = []
        opened = self._open
        if opened is not None and opened[0] != block:
            out.append(_block_end(opened[0]))
        if delta:
            self._open = (block, thought.type, call_id)
        elif opened is not None:
            self._open = None  # a whole item completes its block, and ends any other
        out.append(
            Thought(thought.type, thought.content, {**extra, "block": block, "delta": delta})
        )
        return out

    def _block_for(self, kind: str, delta: bool, call_id: Any) -> str:
        """The block ``kind`` goes in: its call's, the open one it continues, or a new one."""
        if call_id is not None:
            block = self._calls.get(call_id)
            if block is None:
                block = self._calls[call_id] = self._new_block()
            return block
        opened = self._open
        if delta and opened is not None and opened[1] == kind and opened[2] is None:
            return opened[0]
        return self._new_block()

    def _call_event(self, thought: Thought) -> Thought:
        extra = thought.extra or {}
        call_id = extra.get("call_id")
        block = self._calls.get(call_id) if call_id is not None else None
        if block is None:
            # An approval for a call nobody streamed: it still gets a block of its own.
            block = self._new_block()
            if call_id is not None:
                self._calls[call_id] = block
        return Thought(thought.type, thought.content, {**extra, "block": block})

    def _new_block(self) -> str:
        block = f"b{self._next}"
        self._next += 1
        return block


def _block_end(block: str) -> Thought:
    return Thought("block_end", "", {"block": block})
