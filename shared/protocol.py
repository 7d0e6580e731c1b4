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

from dataclasses import dataclass
from typing import Any

import orjson

# Event types a run produces. ``done`` and ``error`` end a run.
THOUGHT_TYPES = ("thinking", "action", "observation", "answer")
TERMINAL_TYPES = ("done", "error")
EVENT_TYPES = THOUGHT_TYPES + TERMINAL_TYPES


class ProtocolError(ValueError):
    """A client frame that cannot be used; ``message`` is safe to send back."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


# --- events -----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Thought:
    """One step an agent yields, before the log gives it a position."""

    type: str
    content: Any = ""


@dataclass(frozen=True, slots=True)
class Event:
    type: str
    content: Any
    session: str
    run: str
    seq: int
    epoch: str
    ts: int

    @property
    def terminal(self) -> bool:
        return self.type in TERMINAL_TYPES


def encode_event_head(thought: Thought, session: str, run: str, ts: int) -> bytes:
    """Encode an event up to, not including, its position.

    The log script appends ``<seq>,"epoch":"<epoch>"}`` atomically, so the worker
    never needs to know the next ``seq`` and the bytes in the log are the bytes
    every client receives.
    """
    body = orjson.dumps(
        {"type": thought.type, "content": thought.content, "session": session, "run": run, "ts": ts}
    )
    return body[:-1] + b',"seq":'


def decode_event(data: bytes | str) -> Event:
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

    def encode(self) -> bytes:
        return orjson.dumps(
            {
                "session": self.session,
                "run": self.run,
                "prompt": self.prompt,
                "agent": self.agent,
            }
        )

    @classmethod
    def decode(cls, data: bytes | str) -> Job:
        obj = orjson.loads(data)
        return cls(
            session=obj["session"],
            run=obj["run"],
            prompt=obj["prompt"],
            agent=obj.get("agent"),
        )


# --- client messages --------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Prompt:
    content: str


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


ClientMessage = Prompt | Personal | Broadcast | Pong


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
        raise ProtocolError("bad_json", "frame is not valid JSON") from None
    if not isinstance(obj, dict):
        raise ProtocolError("bad_message", "a JSON frame must be an object")
    kind = obj.get("type")
    if kind == "prompt":
        return Prompt(_prompt_text(_string(obj, "content"), max_prompt_chars))
    if kind == "personal":
        return Personal(to=_client_id(_string(obj, "to")), content=_string(obj, "content"))
    if kind == "broadcast":
        return Broadcast(content=_string(obj, "content"))
    if kind == "pong":
        return Pong()
    if not isinstance(kind, str):
        raise ProtocolError("bad_message", "a JSON frame needs a string 'type'")
    raise ProtocolError("unknown_type", f"unknown message type {kind[:40]!r}")


def _string(obj: dict[str, Any], name: str) -> str:
    value = obj.get(name)
    if not isinstance(value, str):
        raise ProtocolError("bad_message", f"'{name}' must be a string")
    return value


def _prompt_text(text: str, max_chars: int) -> str:
    if not text.strip():
        raise ProtocolError("empty_prompt", "prompt is empty")
    if len(text) > max_chars:
        raise ProtocolError("too_long", f"prompt is longer than {max_chars} characters")
    return text


_ID_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.")


def valid_id(value: str) -> bool:
    """Session and client ids: 1-64 characters of ``[A-Za-z0-9._-]``.

    Ids end up inside key names and hash tags, so braces, colons and spaces are out.
    """
    return 0 < len(value) <= 64 and all(c in _ID_CHARS for c in value)


def _client_id(value: str) -> str:
    if not valid_id(value):
        raise ProtocolError("bad_message", "client ids are 1-64 characters of [A-Za-z0-9._-]")
    return value


# --- replies ----------------------------------------------------------------


def reply(type_: str, **fields: Any) -> str:
    """A frontend's own message to a socket, encoded as a text frame."""
    return orjson.dumps({"type": type_, **fields}).decode()


def error_reply(code: str, message: str) -> str:
    return reply("error", code=code, message=message)
