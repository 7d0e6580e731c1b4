"""The redis-py adapter: every reach into redis-py's internals, for hiredis to read our replies.

Two fast paths read Redis' replies with hiredis from the read callback itself, with no
task, lock or await per reply (docs/performance.md, "Fast paths"):

- the batcher's line (:mod:`thoughtwire.shared.redis.pipeline`) takes over a pooled
  connection that redis-py opened (so AUTH, SELECT and TLS are redis-py's) by swapping
  the protocol under its transport: :func:`transport_of` finds that transport;
- both it and the pub/sub link (:mod:`thoughtwire.shared.redis.pubsub`) map error replies to
  redis-py's exception classes with redis-py's own mapping: :func:`parse_error`.

Nothing else in the code touches redis-py's private names. With the fast paths off
(``THOUGHTWIRE_FAST_PATHS=0``), or with a redis-py or hiredis this was not tested on,
the batcher goes through redis-py's public ``Pipeline`` and the link through its
``PubSub``. ``tests/test_fast_paths.py`` has the canary that fails when these
internals change.
"""

from __future__ import annotations

from typing import Any

from redis._parsers import BaseParser

from thoughtwire.shared.fastpaths import Adapter

REDIS = Adapter("redis-py", {"redis": "8.1.0", "hiredis": "3.5.0"})

# The setting, as the process's RedisFactory was built with it: the batcher is handed a
# client, not the settings, and every client a process opens comes from its factory.
_switch = True


def set_switch(on: bool) -> None:
    """Record ``THOUGHTWIRE_FAST_PATHS`` for the Redis fast paths (the factory calls this)."""
    global _switch
    _switch = on


def enabled() -> bool:
    """Whether the Redis fast paths are on: the switch, and tested versions installed."""
    return REDIS.enabled(_switch)


def parse_error(response: str) -> Exception:
    """An error reply as redis-py's exception class for it (``NOSCRIPT``: ``NoScriptError``)."""
    error: Exception = BaseParser.parse_error(response)
    return error


def transport_of(connection: Any) -> Any:
    """The transport under a redis-py connection that hiredis can read instead of redis-py,
    or None: not a plain stream, RESP other than 2 or 3, decoded replies, or bytes that
    redis-py read and has not handed on."""
    writer = getattr(connection, "_writer", None)
    transport = getattr(writer, "transport", None)
    reader = getattr(connection, "_reader", None)
    encoder = getattr(connection, "encoder", None)
    if (
        transport is None
        or not hasattr(transport, "set_protocol")
        or str(getattr(connection, "protocol", 2)) not in ("2", "3")  # hiredis reads both
        or getattr(encoder, "decode_responses", False)  # callers expect str replies then
        or getattr(reader, "_buffer", b"")  # bytes redis-py read and did not hand on
    ):
        return None
    return transport
