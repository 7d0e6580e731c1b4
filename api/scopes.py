"""Scopes: what a viewer token lets its holder see of a session, as pure projections.

A viewer token's scope (:class:`thoughtwire.shared.vocab.ViewScope`) is fixed when it is
minted. ``full`` sees every event. ``answer`` sees the answer and the shape of the run,
but no reasoning and nothing of a tool call's arguments or results:

==============  ==================================================================
``thinking``    dropped
``tool_input``  dropped
``action``      only ``tool``, ``call_id``, ``block``, ``delta``; ``content`` is the tool's name
``observation`` only ``tool``, ``call_id``, ``is_error``, ``block``, ``delta``; no ``content``
``approval``    without ``arguments``
``decision``    without ``reason`` (null)
others          as they are, if the list below names them; an event type it does not
                name is dropped, so a new type shows nothing until it is listed here
==============  ==================================================================

Every kept event keeps its envelope (``type``, ``session``, ``run``, ``ts``) and its
position (``seq``, ``epoch``, last, as :func:`thoughtwire.shared.protocol.event_position`
reads them). A dropped event sends nothing: the next frame's ``seq`` jumps over it, which
the clients and the reducer take as they take any seq past their position (they only
drop what is not past it). Frames without a ``seq`` (replies) pass as they are, except a
``snapshot``, whose state is projected by :func:`project_state`.

The frontend projects each live event once per scope present on its channel, not per
socket (:mod:`thoughtwire.api.hub`); a viewer projects what it replays from the log
itself (:mod:`thoughtwire.api.viewer`).
"""

from __future__ import annotations

from typing import Any

import orjson

from thoughtwire.shared.vocab import ViewScope

ENVELOPE = ("type", "session", "run", "ts")
# What an ``answer`` viewer sees of each event type it sees: its fields besides the
# envelope and the position. None: the event as it is.
ANSWER_FIELDS: dict[str, tuple[str, ...] | None] = {
    "answer": None,
    "done": None,
    "error": None,
    "cancelled": None,
    "retry": None,
    "block_end": None,
    "action": ("block", "delta", "tool", "call_id"),
    "observation": ("block", "delta", "tool", "call_id", "is_error"),
    "approval": ("block", "call_id", "tool", "timeout_ms", "default"),
    "decision": ("block", "call_id", "decision", "by"),
}


def project_event(event: dict[str, Any], scope: ViewScope) -> dict[str, Any] | None:
    """What a viewer of ``scope`` is sent of ``event``: the event, a part of it, or None."""
    if scope is ViewScope.FULL:
        return event
    kind = event.get("type")
    if not isinstance(kind, str) or kind not in ANSWER_FIELDS:
        return None
    fields = ANSWER_FIELDS[kind]
    if fields is None:
        return event
    out = {name: event[name] for name in ENVELOPE if name in event}
    out.update((name, event[name]) for name in fields if name in event)
    if kind == "action":
        out["content"] = event.get("tool") or ""
    elif kind == "observation":
        out["content"] = ""
    elif kind == "decision":
        out["reason"] = None
    for name in ("seq", "epoch"):  # last: clients read an event's position off its tail
        if name in event:
            out[name] = event[name]
    return out


def project_frame(frame: str, scope: ViewScope) -> str | None:
    """What a viewer of ``scope`` is sent of a frame (JSON text), or None for nothing.

    A ``full`` viewer's frame is the frame itself, unparsed. Others' frames are parsed
    once here: callers call this once per frame and scope, never per socket.
    """
    if scope is ViewScope.FULL:
        return frame
    message = orjson.loads(frame)
    if not isinstance(message, dict):
        return None
    if message.get("type") == "snapshot":  # a late joiner's state (it has a seq too)
        state = message.get("state")
        message["state"] = project_state(state, scope) if isinstance(state, dict) else None
        return orjson.dumps(message).decode()
    if "seq" not in message:
        return frame  # a reply of the frontend's own: nothing of a run in it
    projected = project_event(message, scope)
    if projected is None:
        return None
    return frame if projected is message else orjson.dumps(projected).decode()


def project_state(state: dict[str, Any], scope: ViewScope) -> dict[str, Any]:
    """A reducer state (``thoughtwire.shared.reducer``) as a viewer of ``scope`` may see it.

    It is close to the state the projected events fold to: reasoning blocks are gone, a tool
    call keeps its tool, call id and approval's decision (its text is the tool's name,
    no input, arguments or reason), a tool result its tool, call id and ``is_error``.
    """
    if scope is ViewScope.FULL:
        return state
    runs = {run_id: _project_run(run) for run_id, run in state.get("runs", {}).items()}
    return {**state, "runs": runs}


def _project_run(run: dict[str, Any]) -> dict[str, Any]:
    blocks = [_project_block(b) for b in run.get("blocks", []) if b.get("kind") != "reasoning"]
    return {**run, "blocks": blocks}


def _project_block(block: dict[str, Any]) -> dict[str, Any]:
    kind = block.get("kind")
    if kind == "tool_call":
        approval = block.get("approval")
        if isinstance(approval, dict):
            approval = {**approval, "reason": None}
        return {
            **block,
            "text": block.get("tool") or "",
            "input": "",
            "arguments": None,
            "approval": approval,
        }
    if kind == "tool_result":
        return {**block, "text": ""}
    return block
