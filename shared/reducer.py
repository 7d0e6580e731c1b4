"""The reducer: a session's frames folded into its state. Pure; no I/O, no dependencies.

``reduce(state, frame)`` takes a state and one decoded frame and returns the next
state. It never mutates its input: it returns the same object when the frame changes
nothing, and otherwise a new state that shares every part it left alone with the old
one (so treat states as read-only). The JavaScript client's ``reduce``
(clients/js/thoughtwire.js) follows the same rules, and both pass the cases of
``clients/conformance/reducer.json``. docs/protocol.md ("The reducer") lists the rules.

The state::

    {"epoch": null | str, "seq": int, "runs": {run: RunState}, "order": [run, ...]}

A RunState is ``{"run", "status", "attempt", "blocks", "usage", "error",
"finish_reason"}`` and a block is ``{"id", "kind", "text", "done"}``, plus ``tool``,
``call_id``, ``input``, ``arguments`` and ``approval`` for a tool call, and ``tool``,
``call_id`` and ``is_error`` for a tool result.

What it guarantees: frames are applied once each by ``seq`` within an epoch, so a
log replayed, resumed from any earlier seq, or with duplicates folds to the same state
as the log read once; a merged delta (``from_seq``..``seq``, sent to a slow viewer)
applies only the part of its content past the state's ``seq``; a ``retry`` drops what the run's earlier attempt showed, so a
retried run ends as its clean run would.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable, Iterable, Mapping
from typing import Any, TypeGuard

State = dict[str, Any]
Frame = Mapping[str, Any]
Run = dict[str, Any]
Block = dict[str, Any]

# The block kind each content event belongs to.
KINDS = {
    "thinking": "reasoning",
    "answer": "text",
    "tool_input": "tool_call",
    "action": "tool_call",
    "observation": "tool_result",
}
# The run statuses the reducer uses; the last three are ends.
RUNNING, WAITING, DONE, FAILED, CANCELLED = "running", "waiting", "done", "failed", "cancelled"
ENDED = (DONE, FAILED, CANCELLED)
# Fields an event copies onto its block when it carries them.
DETAILS = {
    "tool_input": ("tool", "call_id"),
    "action": ("tool", "call_id", "arguments"),
    "observation": ("tool", "call_id", "is_error"),
    "approval": ("tool", "call_id", "arguments"),
}


def initial_state() -> State:
    """The state before any frame: no epoch, seq 0, no runs."""
    return {"epoch": None, "seq": 0, "runs": {}, "order": []}


def fold(frames: Iterable[Frame], state: State | None = None) -> State:
    """``frames`` reduced in turn, from ``state`` (by default the initial state)."""
    folded = initial_state() if state is None else state
    for frame in frames:
        folded = reduce(folded, frame)
    return folded


def reduce(state: State, frame: Frame) -> State:
    """The state after ``frame``; ``state`` itself when the frame changes nothing."""
    if not isinstance(frame, Mapping):
        return state
    kind = frame.get("type")
    if kind == "gap":
        # What is lost cannot be told apart from what is kept: start again, and the
        # server sends what the log still has.
        return initial_state()
    if kind == "snapshot":
        given = frame.get("state")
        return copy.deepcopy(dict(given)) if isinstance(given, Mapping) else state
    seq = frame.get("seq")
    if not _is_seq(seq):
        return state  # a reply (session, ping, error, ...): not part of the log
    if state["epoch"] is not None and frame.get("epoch") != state["epoch"]:
        state = initial_state()  # another log: nothing of the old one holds
    if seq <= state["seq"]:
        return state  # seen already
    first = frame.get("from_seq")
    if _is_seq(first) and first <= state["seq"]:
        frame = _unseen(frame, state["seq"] - first + 1)
    return _apply(state, frame, seq)


def _is_seq(value: Any) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def _unseen(frame: Frame, seen: int) -> Frame:
    """A merged delta (``from_seq``..``seq``) less its first ``seen`` events' content.

    ``lengths`` gives each merged event's content length in characters (code points);
    without it the frame cannot be cut and applies whole.
    """
    lengths = frame.get("lengths")
    content = frame.get("content")
    if not (
        isinstance(content, str)
        and isinstance(lengths, list)
        and len(lengths) == frame["seq"] - frame["from_seq"] + 1
        and all(_is_seq(n) for n in lengths)
    ):
        return frame
    return {**frame, "content": content[sum(lengths[:seen]) :]}


def _apply(state: State, frame: Frame, seq: int) -> State:
    """The event at a new ``seq`` applied: the position moves, and its run changes."""
    new = {**state, "epoch": frame.get("epoch"), "seq": seq}
    run_id = frame.get("run")
    if not isinstance(run_id, str):
        return new
    run = state["runs"].get(run_id)
    if run is None:
        run = _new_run(run_id)
        new["order"] = [*state["order"], run_id]
    handler = HANDLERS.get(str(frame.get("type")), _unknown)
    new["runs"] = {**state["runs"], run_id: handler(run, frame, seq)}
    return new


def _new_run(run_id: str) -> Run:
    return {
        "run": run_id,
        "status": RUNNING,
        "attempt": 1,
        "blocks": [],
        "usage": None,
        "error": None,
        "finish_reason": None,
    }


def _new_block(block_id: str, kind: str) -> Block:
    block: Block = {"id": block_id, "kind": kind, "text": "", "done": False}
    if kind == "tool_call":
        block.update(tool=None, call_id=None, input="", arguments=None, approval=None)
    elif kind == "tool_result":
        block.update(tool=None, call_id=None, is_error=False)
    return block


def _text(content: Any) -> str:
    """An event's content as text: strings as they are, null as nothing, the rest as JSON."""
    if isinstance(content, str):
        return content
    if content is None:
        return ""
    return json.dumps(content, separators=(",", ":"), ensure_ascii=False)


# --- run handlers: (run, frame, seq) -> new run -----------------------------


def _unknown(run: Run, _frame: Frame, _seq: int) -> Run:
    return run  # a type this reducer does not know moves the position only


def _content(run: Run, frame: Frame, seq: int) -> Run:
    """A thinking, answer, tool_input, action or observation event, into its block."""
    kind = KINDS[frame["type"]]
    block_id = frame.get("block")
    if not isinstance(block_id, str):
        return _v1_content(run, frame, seq, kind)
    index = _index(run["blocks"], block_id)
    block = _new_block(block_id, kind) if index is None else run["blocks"][index]
    return _put(run, index, _fill(block, frame, frame.get("delta") is True))


def _v1_content(run: Run, frame: Frame, seq: int, kind: str) -> Run:
    """An event of a log without blocks: a whole item, but answers join the open text block."""
    blocks = run["blocks"]
    if kind == "text":
        last = blocks[-1] if blocks else None
        if last is not None and last["kind"] == "text" and not last["done"]:
            return _put(run, len(blocks) - 1, _fill(last, frame, True))
        return _put(run, None, _fill(_new_block(f"seq{seq}", kind), frame, True))
    return _put(run, None, _fill(_new_block(f"seq{seq}", kind), frame, False))


def _fill(block: Block, frame: Frame, delta: bool) -> Block:
    """``block`` with the event's content appended (a delta) or set (a whole item)."""
    kind = frame["type"]
    field = "input" if kind == "tool_input" else "text"
    content = _text(frame.get("content"))
    if delta:
        new = {**block, field: block[field] + content}
    else:
        new = {**block, field: content, "done": True}
    for name in DETAILS.get(kind, ()):
        if name in frame:
            new[name] = frame[name]
    return new


def _block_end(run: Run, frame: Frame, _seq: int) -> Run:
    index = _index(run["blocks"], frame.get("block"))
    if index is None or run["blocks"][index]["done"]:
        return run
    return _put(run, index, {**run["blocks"][index], "done": True})


def _approval(run: Run, frame: Frame, seq: int) -> Run:
    """A tool call waits for a person: its approval is pending, and so is the run."""
    index, block = _tool_call(run, frame, seq)
    block = {**block, "approval": {"status": "pending", "reason": None, "by": None}}
    for name in DETAILS["approval"]:
        if name in frame:
            block[name] = frame[name]
    return _with_status(_put(run, index, block), WAITING)


def _decision(run: Run, frame: Frame, seq: int) -> Run:
    """A person (or the timeout) decided: the approval says how, and the run goes on."""
    index, block = _tool_call(run, frame, seq)
    approval = {
        "status": frame.get("decision"),
        "reason": frame.get("reason"),
        "by": frame.get("by"),
    }
    return _with_status(_put(run, index, {**block, "approval": approval}), RUNNING)


def _tool_call(run: Run, frame: Frame, seq: int) -> tuple[int | None, Block]:
    """The tool-call block an approval or decision is about: by its block, else its call_id."""
    blocks = run["blocks"]
    index = _index(blocks, frame.get("block"))
    if index is None and frame.get("call_id") is not None:
        index = next(
            (
                i
                for i, b in enumerate(blocks)
                if b["kind"] == "tool_call" and b["call_id"] == frame["call_id"]
            ),
            None,
        )
    if index is not None:
        return index, blocks[index]
    block_id = frame.get("block")
    return None, _new_block(block_id if isinstance(block_id, str) else f"seq{seq}", "tool_call")


def _with_status(run: Run, status: str) -> Run:
    # An approval or decision that comes after the run's end does not bring it back.
    return run if run["status"] in ENDED else {**run, "status": status}


def _retry(run: Run, frame: Frame, _seq: int) -> Run:
    """A new attempt starts over: what the run showed so far is dropped."""
    attempt = frame.get("attempt")
    return {
        **run,
        "status": RUNNING,
        "attempt": attempt if _is_seq(attempt) else run["attempt"] + 1,
        "blocks": [],
        "usage": None,
        "error": None,
        "finish_reason": None,
    }


def _done(run: Run, frame: Frame, _seq: int) -> Run:
    return _ended(run, DONE, usage=frame.get("usage"), finish_reason=frame.get("finish_reason"))


def _error(run: Run, frame: Frame, _seq: int) -> Run:
    return _ended(run, FAILED, error={"message": frame.get("content"), "code": frame.get("code")})


def _cancelled(run: Run, _frame: Frame, _seq: int) -> Run:
    return _ended(run, CANCELLED)


def _ended(run: Run, status: str, **fields: Any) -> Run:
    """The run in its end ``status``, every block complete."""
    blocks = [b if b["done"] else {**b, "done": True} for b in run["blocks"]]
    return {**run, **fields, "status": status, "blocks": blocks}


# --- blocks -----------------------------------------------------------------


def _index(blocks: list[Block], block_id: Any) -> int | None:
    """Where the block ``block_id`` is in ``blocks``; None if it is not there."""
    if not isinstance(block_id, str):
        return None
    for i in range(len(blocks) - 1, -1, -1):  # the block sought is nearly always a late one
        if blocks[i]["id"] == block_id:
            return i
    return None


def _put(run: Run, index: int | None, block: Block) -> Run:
    """``run`` with ``block`` at ``index``, or appended for None."""
    blocks = list(run["blocks"])
    if index is None:
        blocks.append(block)
    else:
        blocks[index] = block
    return {**run, "blocks": blocks}


HANDLERS: dict[str, Callable[[Run, Frame, int], Run]] = {
    **dict.fromkeys(KINDS, _content),
    "block_end": _block_end,
    "approval": _approval,
    "decision": _decision,
    "retry": _retry,
    "done": _done,
    "error": _error,
    "cancelled": _cancelled,
}
