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
retried run ends as its clean run would. No frame makes it raise: a field of the wrong
type is as if absent, and a snapshot that is not a whole state is ignored; and it folds
any frames, however odd, to the state the JavaScript ``reduce`` gives them.
"""

from __future__ import annotations

import copy
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
# The largest whole number a JavaScript number holds exactly (Number.MAX_SAFE_INTEGER).
MAX_WHOLE = 2**53 - 1
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
        return copy.deepcopy(dict(given)) if _is_state(given) else state
    seq = _whole(frame.get("seq"))
    epoch = frame.get("epoch")
    if seq is None or not (epoch is None or isinstance(epoch, str)):
        return state  # a reply (session, ping, error, ...), or no event: not part of the log
    if state["epoch"] is not None and epoch != state["epoch"]:
        state = initial_state()  # another log: nothing of the old one holds
    if seq <= state["seq"]:
        return state  # seen already
    first = _whole(frame.get("from_seq"))
    if first is not None and first <= state["seq"]:
        frame = _unseen(frame, seq - first + 1, state["seq"] - first + 1)
    return _apply(state, frame, seq)


def _whole(value: Any) -> int | None:
    """``value`` as a seq (or attempt, or length): a whole number up to ``MAX_WHOLE``.

    By value, not by how it is written: JSON.parse makes ``1.0`` the number 1, so the
    JavaScript client cannot tell them apart, and neither does this one. ``true`` is no
    number, and beyond ``MAX_WHOLE`` JavaScript rounds, so neither is a seq.
    """
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    if isinstance(value, float) and not value.is_integer():  # also nan and the infinities
        return None
    return int(value) if abs(value) <= MAX_WHOLE else None


def _unseen(frame: Frame, merged: int, seen: int) -> Frame:
    """A merged delta of ``merged`` events less its first ``seen`` events' content.

    ``lengths`` gives each merged event's content length in characters (code points);
    without it the frame cannot be cut and applies whole.
    """
    lengths = frame.get("lengths")
    content = frame.get("content")
    if not isinstance(content, str) or not isinstance(lengths, list) or len(lengths) != merged:
        return frame
    counts = [_whole(n) for n in lengths]
    if any(n is None or n < 0 for n in counts):
        return frame
    return {**frame, "content": content[sum(n or 0 for n in counts[:seen]) :]}


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
    """An event's content as text: a string as it is; anything else adds nothing.

    Only strings, because two languages write other JSON values as different text
    (``1.0``, ``1e20``, lone surrogates); the protocol's content is always a string.
    """
    return content if isinstance(content, str) else ""


def _copy_details(block: Block, frame: Frame, kind: str) -> None:
    """The fields of ``DETAILS[kind]`` the frame carries, onto ``block``.

    A ``call_id`` that is not a string is no call_id (it could never name a call in
    both languages alike: Python has ``True == 1``, JavaScript ``===`` has not).
    """
    for name in DETAILS.get(kind, ()):
        if name in frame and (name != "call_id" or isinstance(frame[name], str)):
            block[name] = frame[name]


# --- snapshots ----------------------------------------------------------------
# A snapshot's state is taken only when it has every part reducing reads, each of the
# type reducing needs; any other one changes nothing, so a bad snapshot cannot make a
# later event fail (nor the two languages fold it differently).


def _is_state(value: Any) -> TypeGuard[Mapping[str, Any]]:
    """Whether ``value`` is a whole state: epoch, seq, runs, and order naming each run once."""
    if not isinstance(value, Mapping) or "epoch" not in value:
        return False
    epoch, runs, order = value["epoch"], value.get("runs"), value.get("order")
    return (
        (epoch is None or isinstance(epoch, str))
        and _whole(value.get("seq")) is not None
        and isinstance(runs, Mapping)
        and isinstance(order, list)
        and all(isinstance(run_id, str) and run_id in runs for run_id in order)
        and len(set(order)) == len(order) == len(runs)
        and all(_is_run(run) for run in runs.values())
    )


def _is_run(run: Any) -> bool:
    return (
        isinstance(run, Mapping)
        and isinstance(run.get("status"), str)
        and _whole(run.get("attempt")) is not None
        and isinstance(run.get("blocks"), list)
        and all(_is_block(block) for block in run["blocks"])
    )


def _is_block(block: Any) -> bool:
    if not (
        isinstance(block, Mapping)
        and isinstance(block.get("id"), str)
        and block.get("kind") in KINDS.values()
        and isinstance(block.get("text"), str)
        and isinstance(block.get("done"), bool)
    ):
        return False
    if block["kind"] != "tool_call":
        return True
    call_id = block.get("call_id", 0)  # absent: not a string, nor None
    return isinstance(block.get("input"), str) and (call_id is None or isinstance(call_id, str))


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
    if block["kind"] != kind:
        return run  # the id is another kind's block: the event is not about it
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
    _copy_details(new, frame, kind)
    return new


def _block_end(run: Run, frame: Frame, _seq: int) -> Run:
    index = _index(run["blocks"], frame.get("block"))
    if index is None or run["blocks"][index]["done"]:
        return run
    return _put(run, index, {**run["blocks"][index], "done": True})


def _approval(run: Run, frame: Frame, seq: int) -> Run:
    """A tool call waits for a person: its approval is pending, and so is the run."""
    found = _tool_call(run, frame, seq)
    if found is None:
        return run
    index, block = found
    block = {**block, "approval": {"status": "pending", "reason": None, "by": None}}
    _copy_details(block, frame, "approval")
    return _with_status(_put(run, index, block), WAITING)


def _decision(run: Run, frame: Frame, seq: int) -> Run:
    """A person (or the timeout) decided: the approval says how, and the run goes on."""
    found = _tool_call(run, frame, seq)
    if found is None:
        return run
    index, block = found
    approval = {
        "status": frame.get("decision"),
        "reason": frame.get("reason"),
        "by": frame.get("by"),
    }
    return _with_status(_put(run, index, {**block, "approval": approval}), RUNNING)


def _tool_call(run: Run, frame: Frame, seq: int) -> tuple[int | None, Block] | None:
    """The tool-call block an approval or decision is about: by its block, else its call_id.

    None when its block is of another kind: then the event is not about a tool call.
    """
    blocks = run["blocks"]
    index = _index(blocks, frame.get("block"))
    call_id = frame.get("call_id")
    if index is None and isinstance(call_id, str):
        index = next(
            (
                i
                for i, b in enumerate(blocks)
                if b["kind"] == "tool_call" and b["call_id"] == call_id
            ),
            None,
        )
    if index is not None:
        return (index, blocks[index]) if blocks[index]["kind"] == "tool_call" else None
    block_id = frame.get("block")
    return None, _new_block(block_id if isinstance(block_id, str) else f"seq{seq}", "tool_call")


def _with_status(run: Run, status: str) -> Run:
    # An approval or decision that comes after the run's end does not bring it back.
    return run if run["status"] in ENDED else {**run, "status": status}


def _retry(run: Run, frame: Frame, _seq: int) -> Run:
    """A new attempt starts over: what the run showed so far is dropped."""
    attempt = _whole(frame.get("attempt"))
    return {
        **run,
        "status": RUNNING,
        "attempt": run["attempt"] + 1 if attempt is None else attempt,
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
