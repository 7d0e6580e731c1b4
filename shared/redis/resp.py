"""RESP on the wire: one encoder and one reply-reader core, for the pipeline and the pub/sub link.

Both of this folder's own connections (:mod:`thoughtwire.shared.redis.pipeline`'s line and
:mod:`thoughtwire.shared.redis.pubsub`'s link) pack their commands here and read their replies
with a :class:`ReplyReader`: an ``asyncio.Protocol`` whose ``data_received`` feeds
hiredis and hands every whole reply on from the read callback, with no await, task or
lock of its own. The core holds what the two share: the parser, the commands waiting
for a reply (in order: Redis answers in order), a watchdog that aborts a connection
that stays silent too long, and failing every waiting command together when the
connection ends, however it ends.

The parser is hiredis' with redis-py's mapping of error replies to exception classes
(``NOSCRIPT`` to ``NoScriptError``, ``LOADING`` to a connection error, ...), so an
error reply reads the same here as through redis-py.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import hiredis
from redis.commands.core import AsyncScript
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from thoughtwire.shared.redis.fast import parse_error

PARTIAL = object()  # the parser's answer while no whole reply has arrived (RESP3 has a real False)
PUSH = getattr(hiredis, "PushNotification", None)  # RESP3 pushes, in hiredis 3 and later


def _encode(value: Any) -> bytes:
    if isinstance(value, str):
        return value.encode()
    if isinstance(value, int):
        return b"%d" % value
    raise TypeError(f"cannot send {type(value).__name__} to Redis")


def pack(parts: Sequence[Any]) -> bytes:
    """One command (bytes, str and int arguments) in RESP, as redis-py would send it."""
    data = [part if part.__class__ is bytes else _encode(part) for part in parts]
    return b"*%d\r\n" % len(data) + b"".join([b"$%d\r\n%b\r\n" % (len(d), d) for d in data])


def pack_command(*parts: Any) -> bytes:
    """One command in RESP."""
    return pack(parts)


def pack_evalsha(sha: bytes, keys: Sequence[Any], args: Sequence[Any]) -> bytes:
    """One EVALSHA command in RESP."""
    return pack([b"EVALSHA", sha, len(keys), *keys, *args])


def unpack(payload: bytes) -> list[list[bytes]]:
    """The commands a packed payload holds, each as its arguments (bytes).

    A packed command is an array of bulk strings, which is also a reply RESP can read;
    so a payload packed for this folder's own connections can be handed to redis-py's
    instead, with no second form kept beside it on the hot path.
    """
    reader = hiredis.Reader(notEnoughData=PARTIAL)
    reader.feed(payload)
    commands: list[list[bytes]] = []
    while (command := reader.gets()) is not PARTIAL:  # ends with the payload
        commands.append(command)
    return commands


def new_parser() -> hiredis.Reader:
    """A hiredis reader of replies, error replies mapped as redis-py maps them."""
    return hiredis.Reader(replyError=parse_error, notEnoughData=PARTIAL)


@dataclass(slots=True)
class Call:
    """Commands sent together, and the future that gets their reply."""

    payload: bytes
    replies: int  # how many commands the payload holds
    script: AsyncScript | None  # set for a script run, to load it again after a restart
    future: asyncio.Future[Any]
    again: bool = False  # run again once already, after its script was loaded
    # On a cluster, the bundle (pipeline._Bundle) whose keys span slots of one master:
    # the call goes to that master, and its calls one by one if the master moved.
    bundle: Any = None


def settle(call: Call, result: Any) -> None:
    """Give ``call`` its result (an exception fails it), unless its caller gave up on it."""
    if call.future.done():
        return  # its caller was cancelled
    if isinstance(result, Exception):
        call.future.set_exception(result)
    else:
        call.future.set_result(result)


class ReplyReader(asyncio.Protocol):
    """A connection read by hiredis from the read callback (see above).

    ``silence`` is how long the connection may stay silent while it is watched: past
    it, every waiting call fails with a timeout and the connection is aborted. What
    "watched" means, and what is done at a quiet check within the limit, each
    connection says (:meth:`_idle`, :meth:`_quiet`).
    """

    def __init__(self, silence: float | None) -> None:
        self._loop = asyncio.get_running_loop()
        self._parser = new_parser()
        self._transport: Any = None
        self._waiting: deque[Call] = deque()
        self._silence = silence
        self._heard = self._loop.time()
        self._watchdog: asyncio.TimerHandle | None = None
        self.closed = False

    def _watch(self, delay: float) -> None:
        """Check for silence in ``delay`` seconds, unless a check is due already."""
        if self._silence is not None and self._watchdog is None:
            self._watchdog = self._loop.call_later(delay, self._check)

    def _check(self) -> None:
        self._watchdog = None
        if self.closed or self._idle():
            return
        assert self._silence is not None
        quiet = self._loop.time() - self._heard
        if quiet >= self._silence:
            self._lost(RedisTimeoutError(f"no reply from Redis in {self._silence:g} s"))
            self.abort()
        else:
            self._quiet(quiet)

    def _idle(self) -> bool:
        """Nothing is expected from Redis, so silence is fine."""
        return not self._waiting

    def _quiet(self, quiet: float) -> None:
        """Heard ``quiet`` seconds ago, within the limit: check again when it would pass."""
        assert self._silence is not None
        self._watch(self._silence - quiet)

    def _lost(self, error: Exception) -> None:
        """The connection is over: every waiting call fails with ``error``."""
        self.closed = True
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        waiting, self._waiting = self._waiting, deque()
        for call in waiting:
            settle(call, error)

    def abort(self) -> None:
        """Drop the connection at once; ``connection_lost`` follows."""
        if self._transport is not None:
            self._transport.abort()

    # --- asyncio.Protocol -------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Keep the transport, to write and to abort."""
        self._transport = transport

    def connection_lost(self, exc: Exception | None) -> None:
        """Every waiting call fails with a connection error."""
        self._lost(RedisConnectionError(f"the connection to Redis was lost: {exc or 'closed'}"))

    def eof_received(self) -> bool | None:
        """Redis closed its side: close the transport."""
        return None
