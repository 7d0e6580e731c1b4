"""The wire protocol: typed messages and pure encode/decode functions. No I/O here.

Three kinds of message cross the system:

* **Events** are what a run produces (``thinking``, ``action``, ``observation``,
  ``answer``, ``done``, ``error``). A worker writes each one to the session's log
  and channel; frontends relay the bytes unchanged. Every event carries
  ``session``, ``run``, ``seq`` (1, 2, 3, ... per session, no gaps), ``epoch``
  (changes when the log may have lost data) and ``ts`` (the worker's clock, Unix ms).
* **Client messages** are what a socket sends: a plain-text prompt, or JSON with a
  ``type``. :func:`parse_client_message` turns a frame into one of the classes below
  or raises :class:`ProtocolError` with a code and a message safe to show.
* **Replies** are what a frontend says on its own (``session``, ``ping``, ``error``,
  ``personal``, ``broadcast``). They are not part of any log and carry no ``seq``.

``docs/protocol.md`` describes all of them.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson

from thoughtwire.shared.closecodes import ErrorCode
from thoughtwire.shared.vocab import Decision, Multitask, OnDisconnect, Replay, RunStatus

# Event types a run produces. ``done``, ``error`` and ``cancelled`` end a run; ``retry``
# says a new attempt starts over (clients drop the run's partial answer).
THOUGHT_TYPES = ("thinking", "action", "observation", "answer")
TERMINAL_TYPES = ("done", "error", "cancelled")
# Protocol v2 (docs/protocol.md): a tool call's argument pieces, the end of a block of
# deltas, and a tool call waiting for a person, then the person's (or the timeout's) answer.
V2_TYPES = ("tool_input", "block_end", "approval", "decision")
EVENT_TYPES = (*THOUGHT_TYPES, *V2_TYPES, "retry", *TERMINAL_TYPES)

# What a run's terminal event makes of its status.
TERMINAL_STATUS = {
    "done": RunStatus.DONE,
    "error": RunStatus.FAILED,
    "cancelled": RunStatus.CANCELLED,
}


class ProtocolError(ValueError):
    """A client frame that cannot be used; ``message`` is safe to send back."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


# --- events -----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Thought:
    """One step an agent yields, before the log gives it a position."""

    type: str
    content: Any = ""
    extra: dict[str, Any] | None = None  # more top-level fields, e.g. a retry's attempt

    @property
    def terminal(self) -> bool:
        """Whether this ends its run (``done``, ``error``, ``cancelled``)."""
        return self.type in TERMINAL_TYPES


@dataclass(frozen=True, slots=True)
class Event:
    """A decoded event of a session's log, as clients receive it."""

    type: str
    content: Any
    session: str
    run: str
    seq: int
    epoch: str
    ts: int

    @property
    def terminal(self) -> bool:
        """Whether this ends its run (``done``, ``error``, ``cancelled``)."""
        return self.type in TERMINAL_TYPES


def encode_event_head(thought: Thought, session: str, run: str, ts: int) -> bytes:
    """Encode an event up to, not including, its position.

    The log script appends ``<seq>,"epoch":"<epoch>"}`` atomically, so the worker
    never needs to know the next ``seq`` and the bytes in the log are the bytes
    every client receives.
    """
    fields = {"type": thought.type, "content": thought.content}
    if thought.extra:
        fields.update(thought.extra)
    fields.update(session=session, run=run, ts=ts)
    return orjson.dumps(fields)[:-1] + b',"seq":'


def event_position(frame: str) -> tuple[int, str] | None:
    """``(seq, epoch)`` of an event frame, read off its tail; None for other frames.

    The log script always ends an event with ``,"seq":N,"epoch":"E"}``. A quote in
    any string value is escaped, so the last unescaped ``,"seq":`` is the position.
    This avoids parsing the whole frame once per event and socket.
    """
    i = frame.rfind(',"seq":')
    if i < 0:
        return None
    j = frame.find(",", i + 7)
    return int(frame[i + 7 : j]), frame[j + 10 : -2]


def decode_event(data: bytes | str) -> Event:
    """An event from its JSON."""
    obj = orjson.loads(data)
    return Event(
        type=obj["type"],
        content=obj.get("content", ""),
        session=obj["session"],
        run=obj["run"],
        seq=obj["seq"],
        epoch=obj["epoch"],
        ts=obj["ts"],
    )


# --- jobs -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Job:
    """A prompt queued for the workers; ``run`` is also the job's id.

    ``agent`` overrides the configured agent (the echo endpoint uses it).
    """

    run: str
    session: str
    prompt: str
    agent: str | None = None
    on_disconnect: OnDisconnect = OnDisconnect.CONTINUE
    user: str | None = None  # whose concurrent-run slot the run holds
    multitask: Multitask = Multitask.ENQUEUE  # what it does while its session has a run
    # The W3C trace context of the prompt that queued it, with tracing on (shared/tracing.py).
    traceparent: str | None = None

    def encode(self) -> bytes:
        """The job as JSON, as it goes on the jobs stream."""
        fields = {
            "session": self.session,
            "run": self.run,
            "prompt": self.prompt,
            "agent": self.agent,
            "on_disconnect": self.on_disconnect,
            "user": self.user,
            "multitask": self.multitask,
        }
        if self.traceparent is not None:
            fields["traceparent"] = self.traceparent
        return orjson.dumps(fields)

    @classmethod
    def decode(cls, data: bytes | str) -> Job:
        """A job from the jobs stream's JSON."""
        obj = orjson.loads(data)
        return cls(
            session=obj["session"],
            run=obj["run"],
            prompt=obj["prompt"],
            agent=obj.get("agent"),
            on_disconnect=OnDisconnect(obj.get("on_disconnect", OnDisconnect.CONTINUE)),
            user=obj.get("user"),
            # Jobs queued before prompts chose were all enqueued.
            multitask=Multitask(obj.get("multitask", Multitask.ENQUEUE)),
            traceparent=obj.get("traceparent"),
        )


# --- client messages --------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Prompt:
    """A client's prompt for its session (``{"type": "prompt"}``)."""

    content: str
    key: str | None = None  # an idempotency key: the same key never runs twice
    multitask: Multitask | None = None  # None: the frontend's default (settings)


@dataclass(frozen=True, slots=True)
class Personal:
    """A message for one client id of the connection manager."""

    to: str
    content: str


@dataclass(frozen=True, slots=True)
class Broadcast:
    """A message for every client of the connection manager."""

    content: str


@dataclass(frozen=True, slots=True)
class Pong:
    """Answer to a ``ping``; also accepted unprompted as a keep-alive."""


@dataclass(frozen=True, slots=True)
class Resume:
    """Follow ``session`` from after ``after`` (of ``epoch``, when the client knows it)."""

    session: str
    after: int
    epoch: str | None = None
    replay: Replay = Replay.SNAPSHOT  # "raw": the log as it is, never a snapshot


@dataclass(frozen=True, slots=True)
class Cancel:
    """Cancel ``run``, or every unfinished run of the socket's session."""

    run: str | None = None


@dataclass(frozen=True, slots=True)
class Auth:
    """A fresh token for an open socket, before the old one expires."""

    token: str


@dataclass(frozen=True, slots=True)
class Approve:
    """The session owner's answer to a tool call waiting for approval."""

    run: str
    call_id: str
    decision: Decision
    reason: str | None = None


MAX_REASON_CHARS = 2000
MAX_KEY_CHARS = 200  # a prompt's idempotency key

ClientMessage = Prompt | Personal | Broadcast | Pong | Resume | Cancel | Auth | Approve
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")  # \ud800-\udfff, half a character


def parse_client_message(frame: str, *, max_prompt_chars: int) -> ClientMessage:
    """Turn a text frame into a client message.

    A frame whose first non-blank character is ``{`` is JSON; anything else is a
    plain-text prompt, as the seed's clients send.
    """
    if not frame.lstrip().startswith("{"):
        return Prompt(_prompt_text(frame, max_prompt_chars))
    try:
        obj = orjson.loads(frame)
    except orjson.JSONDecodeError:
        raise _unreadable(frame) from None
    if not isinstance(obj, dict):
        raise ProtocolError(ErrorCode.BAD_MESSAGE, "a JSON frame must be an object")
    kind = obj.get("type")
    if not isinstance(kind, str):
        raise ProtocolError(ErrorCode.BAD_MESSAGE, "a JSON frame needs a string 'type'")
    parse = _PARSERS.get(kind)
    if parse is None:
        raise ProtocolError(ErrorCode.UNKNOWN_TYPE, f"unknown message type {kind[:40]!r}")
    return parse(obj, max_prompt_chars)


def _unreadable(frame: str) -> ProtocolError:
    """Why orjson refused ``frame``. JSON may escape half a character (a lone surrogate,
    ``"\\ud83d"``: what a client that cuts a string in the middle of an emoji sends),
    which orjson refuses and no text may hold: that is ``bad_message``, else ``bad_json``."""
    obj = lenient_json(frame)
    if obj is not None and not whole_text(obj):
        return ProtocolError(
            ErrorCode.BAD_MESSAGE,
            "text must be whole characters: a lone surrogate (\\ud800-\\udfff) is half of one",
        )
    return ProtocolError(ErrorCode.BAD_JSON, "frame is not valid JSON")


def lenient_json(frame: str) -> Any:
    """``frame`` as Python's JSON parser reads it, lone surrogates and all, if it escapes
    a surrogate at all; None if it does not, or cannot be read (not JSON, or nested past
    the parser's depth). For frames orjson refused: a frame without the escape is refused
    at the cost of one search, however many of them a client sends."""
    if _SURROGATE_ESCAPE.search(frame) is None:
        return None  # a text frame is UTF-8: a surrogate can only come escaped
    try:
        return json.loads(frame)
    except (ValueError, RecursionError):
        return None


def whole_text(value: Any) -> bool:
    """Whether every string in ``value``, however deep, is whole characters (UTF-8 can
    encode it: no lone surrogate)."""
    pending = [value]
    while pending:  # as deep as the parser went, and no deeper
        item = pending.pop()
        if isinstance(item, str):
            if not item.isascii():
                try:
                    item.encode()
                except UnicodeEncodeError:
                    return False
        elif isinstance(item, dict):
            pending.extend(item.keys())
            pending.extend(item.values())
        elif isinstance(item, list):
            pending.extend(item)
    return True


def _prompt(obj: dict[str, Any], max_prompt_chars: int) -> Prompt:
    key = _optional_string(obj, "key")
    if key is not None and not 0 < len(key) <= MAX_KEY_CHARS:
        raise ProtocolError(ErrorCode.BAD_MESSAGE, "'key' must be 1-200 characters")
    multitask = _optional_string(obj, "multitask")
    if multitask is not None and multitask not in tuple(Multitask):
        raise ProtocolError(
            ErrorCode.BAD_MESSAGE, "'multitask' must be 'reject', 'enqueue' or 'interrupt'"
        )
    text = _prompt_text(_string(obj, "content"), max_prompt_chars)
    return Prompt(text, key, None if multitask is None else Multitask(multitask))


def _resume(obj: dict[str, Any], _max_prompt_chars: int) -> Resume:
    return Resume(
        session=_id(_string(obj, "session"), "session"),
        after=parse_after(obj.get("after", 0)),
        epoch=_optional_string(obj, "epoch"),
        replay=_replay(obj),
    )


def _replay(obj: dict[str, Any]) -> Replay:
    replay = _optional_string(obj, "replay")
    if replay is not None and replay not in tuple(Replay):
        raise ProtocolError(ErrorCode.BAD_MESSAGE, "'replay' must be 'snapshot' or 'raw'")
    return Replay.SNAPSHOT if replay is None else Replay(replay)


def _cancel(obj: dict[str, Any], _max_prompt_chars: int) -> Cancel:
    run = _optional_string(obj, "run")
    return Cancel(run=None if run is None else _id(run, "run"))


def _approve(obj: dict[str, Any], _max_prompt_chars: int) -> Approve:
    call_id = _string(obj, "call_id")
    if not 0 < len(call_id) <= 200:
        raise ProtocolError(ErrorCode.BAD_MESSAGE, "'call_id' must be 1-200 characters")
    decision = _string(obj, "decision")
    if decision not in tuple(Decision):
        raise ProtocolError(ErrorCode.BAD_MESSAGE, "'decision' must be 'allow' or 'deny'")
    reason = _optional_string(obj, "reason")
    if reason is not None and len(reason) > MAX_REASON_CHARS:
        raise ProtocolError(
            ErrorCode.BAD_MESSAGE, f"'reason' is longer than {MAX_REASON_CHARS} characters"
        )
    return Approve(_id(_string(obj, "run"), "run"), call_id, Decision(decision), reason)


# Each client message type and its parser, by the ``type`` it has on the wire.
_PARSERS: dict[str, Callable[[dict[str, Any], int], ClientMessage]] = {
    "prompt": _prompt,
    "personal": lambda obj, _max: Personal(
        to=_id(_string(obj, "to"), "client"), content=_string(obj, "content")
    ),
    "broadcast": lambda obj, _max: Broadcast(content=_string(obj, "content")),
    "pong": lambda _obj, _max: Pong(),
    "resume": _resume,
    "auth": lambda obj, _max: Auth(_string(obj, "token")),
    "cancel": _cancel,
    "approve": _approve,
}


def _string(obj: dict[str, Any], name: str) -> str:
    value = obj.get(name)
    if not isinstance(value, str):
        raise ProtocolError(ErrorCode.BAD_MESSAGE, f"'{name}' must be a string")
    return value


def _optional_string(obj: dict[str, Any], name: str) -> str | None:
    return None if obj.get(name) is None else _string(obj, name)


def parse_after(value: Any) -> int:
    """A resume position: a whole number >= 0 (also from a query string or header)."""
    # ASCII only: str.isdigit() also takes "²" and "①", which int() refuses.
    if isinstance(value, str) and value.isascii() and value.isdigit() and len(value) < 19:
        return int(value)
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2**63:
        return value
    raise ProtocolError(ErrorCode.BAD_MESSAGE, "'after' must be a whole number >= 0")


def parse_event_id(value: str) -> tuple[int, str | None]:
    """An SSE event id, ``<epoch>-<seq>`` or (from older streams) a bare ``<seq>``: (seq, epoch)."""
    epoch, dash, seq = value.rpartition("-")
    if not dash:
        return parse_after(value), None
    if not (0 < len(epoch) <= 64 and epoch.isalnum() and epoch.isascii()):
        raise ProtocolError(ErrorCode.BAD_MESSAGE, "an event id is <epoch>-<seq> or <seq>")
    return parse_after(seq), epoch


def event_id(seq: int, epoch: str) -> str:
    """The SSE id of an event: its epoch and seq, so a resume names both."""
    return f"{epoch}-{seq}"


def _prompt_text(text: str, max_chars: int) -> str:
    if not text.strip():
        raise ProtocolError(ErrorCode.EMPTY_PROMPT, "prompt is empty")
    if len(text) > max_chars:
        raise ProtocolError(ErrorCode.TOO_LONG, f"prompt is longer than {max_chars} characters")
    return text


_ID_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.")


def valid_id(value: str) -> bool:
    """Session and client ids: 1-64 characters of ``[A-Za-z0-9._-]``.

    Ids end up inside key names and hash tags, so braces, colons and spaces are out.
    """
    return 0 < len(value) <= 64 and all(c in _ID_CHARS for c in value)


def _id(value: str, what: str) -> str:
    if not valid_id(value):
        raise ProtocolError(
            ErrorCode.BAD_MESSAGE, f"{what} ids are 1-64 characters of [A-Za-z0-9._-]"
        )
    return value


# --- replies ----------------------------------------------------------------


def reply(type_: str, **fields: Any) -> str:
    """A frontend's own message to a socket, encoded as a text frame."""
    return orjson.dumps({"type": type_, **fields}).decode()


def error_reply(code: ErrorCode, message: str, **fields: Any) -> str:
    """An ``error`` reply frame with a code and a one-line message (and ``fields``: the
    ``key`` of a refused prompt)."""
    return reply("error", code=code, message=message, **fields)
