"""The hub's pub/sub link: every message handed on from the read callback itself.

Each frontend reads every event of every session it serves through one connection, so
its per-message cost is the relay's floor. redis-py's ``PubSub.get_message`` costs a
coroutine round, a timeout and a dict per message, and asks the event loop for itself
several times (each a ``getpid`` system call on Python 3.11). :class:`RawLink` instead
is a :class:`~shared.redis.resp.ReplyReader`: ``data_received`` parses every whole
reply of one read and calls ``on_message(kind, channel, data)`` for each, with no
await at all. Messages of one channel that follow each other in one read go together
to ``on_run(channel, data)`` instead, when the caller gives one: a frontend that falls
behind reads many events of a session at once, and hands each socket all of them in
one write (:mod:`thoughtwire.api.hub`). Only consecutive messages are taken together,
so the order in which messages are handed on is exactly the order Redis sent them.

It speaks only what the hub needs: AUTH, SUBSCRIBE, UNSUBSCRIBE, and a PING every
``ping_interval`` so that a connection that went silent (a dead peer, a NAT that
dropped it) is noticed; a link that hears nothing for two intervals aborts. Whatever
ends the connection resolves :meth:`RawLink.wait_closed`; the hub then reconnects and
resubscribes (:mod:`thoughtwire.api.hub`).

Behind Sentinel the raw link connects to the master the sentinels name, and is aborted
when the master switches (:mod:`thoughtwire.shared.redis.sentinel`): the hub reconnects.

The embedded mode has no server to connect to: :class:`ClientLink` gives the same
interface over redis-py's ``PubSub`` on the in-process Redis. It is also the link with
the fast paths off (``THOUGHTWIRE_FAST_PATHS=0``), or with a redis-py or hiredis release
the raw link was not tested on (:mod:`thoughtwire.shared.redis.fast`).

A worker follows one channel, its control channel, at a low rate: :func:`channel_messages`
reads it through redis-py's ``PubSub``, whatever the Redis.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import AsyncGenerator, Callable, Mapping
from typing import Any, Protocol, runtime_checkable

from redis.asyncio.connection import SSLConnection, parse_url
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from thoughtwire.shared.redis import fast
from thoughtwire.shared.redis.connections import RedisFactory
from thoughtwire.shared.redis.resp import PARTIAL, Call, ReplyReader, pack_command, settle

# kind (b"message", b"subscribe", b"unsubscribe"; b"resync": the channel's messages may
# have been missed, its subscription moved, shared/redis/cluster.py), channel, data
# (messages only)
OnMessage = Callable[[bytes, bytes, "bytes | None"], None]
# channel, and the data of two or more messages of it that came in a row in one read
OnRun = Callable[[bytes, list[bytes]], None]

CONNECT_TIMEOUT = 10.0
PING_INTERVAL = 15.0


class Link(Protocol):
    """A pub/sub connection that hands each message to ``on_message`` as it arrives."""

    async def subscribe(self, *channels: bytes) -> None:
        """Subscribe to ``channels``; each confirmation comes through ``on_message``."""

    async def unsubscribe(self, *channels: bytes) -> None:
        """Unsubscribe from ``channels``; each confirmation comes through ``on_message``."""

    async def wait_closed(self) -> None:
        """Return (or raise) once the connection is gone, whoever ended it."""

    async def close(self) -> None:
        """Close the connection; idempotent."""


@runtime_checkable
class ShardedLink(Link, Protocol):
    """A link of one connection per shard (a Redis Cluster's masters), each probed alone."""

    async def probe_shards(
        self, token: bytes, within: float, channel_of: Callable[[str], str]
    ) -> int:
        """Probe each shard's connection on a channel of its own (``channel_of(tag)``);
        drop those deaf within ``within`` seconds (their viewers resync); how many."""


async def open_link(
    factory: RedisFactory, on_message: OnMessage, on_run: OnRun | None = None
) -> Link:
    """A pub/sub link to the factory's Redis: raw for a server, redis-py's ``PubSub`` for the
    embedded one or with the fast paths off (which reads one message at a time, so never
    calls ``on_run``). A Redis Cluster's link is raw whatever the switch (it has no public
    path yet): one connection per master of the channels it follows (shared/redis/cluster.py)."""
    if factory.cluster is not None:
        from thoughtwire.shared.redis.cluster import ClusterLink  # which imports this module

        return await ClusterLink.open(factory.cluster, factory.settings, on_message, on_run)
    if factory.url() is None or not fast.REDIS.enabled(factory.settings.fast_paths):
        return await ClientLink.open(factory, on_message)
    url = await factory.link_url()  # behind Sentinel: the master named now
    assert url is not None
    link = await RawLink.open(url, on_message, on_run=on_run)
    factory.watch(link)  # dropped when the master switches: the hub reconnects, resyncs
    return link


class RawLink(ReplyReader):
    """The pub/sub link over a socket of its own, read from the read callback."""

    def __init__(
        self,
        on_message: OnMessage,
        ping_interval: float,
        on_run: OnRun | None = None,
        *,
        sharded: bool = False,
    ) -> None:
        # Silent for two intervals, not even a pong: the connection is dead.
        super().__init__(2 * ping_interval)
        self._on_message = on_message
        # Sharded pub/sub (a cluster's master, shared/redis/cluster.py): SSUBSCRIBE, and
        # messages come as ``smessage``; confirmations are handed on with their own kind.
        self._sharded = sharded
        self._message = b"smessage" if sharded else b"message"
        self._on_run = on_run
        self._closed: asyncio.Future[None] = self._loop.create_future()
        self._ping_interval = ping_interval

    @classmethod
    async def open(
        cls,
        url: str,
        on_message: OnMessage,
        *,
        ping_interval: float = PING_INTERVAL,
        on_run: OnRun | None = None,
        sharded: bool = False,
    ) -> RawLink:
        """Connect to the Redis at ``url`` and authenticate, within CONNECT_TIMEOUT."""
        options = parse_url(url)
        loop = asyncio.get_running_loop()
        link = cls(on_message, ping_interval, on_run, sharded=sharded)
        try:
            async with asyncio.timeout(CONNECT_TIMEOUT):
                try:
                    if "path" in options:
                        await loop.create_unix_connection(lambda: link, options["path"])
                    else:
                        context = _tls_context(options) if url.startswith("rediss:") else None
                        await loop.create_connection(
                            lambda: link,
                            options.get("host", "localhost"),
                            options.get("port", 6379),
                            ssl=context,
                        )
                except OSError as exc:
                    raise RedisConnectionError(f"pub/sub connection failed: {exc}") from exc
                # A user with no password (ACL ``nopass``) signs in too, with an empty one.
                password, username = options.get("password"), options.get("username")
                if password or username:
                    credentials = (username, password or "") if username else (password or "",)
                    try:
                        await link._call(b"AUTH", *(c.encode() for c in credentials))
                    except RedisError:
                        link.abort()
                        raise RedisConnectionError("pub/sub authentication failed") from None
        except BaseException:  # a timeout, or cancelled: the connection made is not left open
            link.abort()
            raise
        link._watch(ping_interval)
        return link

    async def subscribe(self, *channels: bytes) -> None:
        """Subscribe to ``channels``; the confirmations come through ``on_message``."""
        self._write(pack_command(b"SSUBSCRIBE" if self._sharded else b"SUBSCRIBE", *channels))

    async def unsubscribe(self, *channels: bytes) -> None:
        """Unsubscribe from ``channels``; the confirmations come through ``on_message``."""
        self._write(pack_command(b"SUNSUBSCRIBE" if self._sharded else b"UNSUBSCRIBE", *channels))

    async def wait_closed(self) -> None:
        """Raise once the connection is gone, whoever ended it."""
        await asyncio.shield(self._closed)

    async def close(self) -> None:
        """Close the connection and wait until it is gone."""
        if self._transport is not None:
            self._transport.close()
        with contextlib.suppress(Exception):
            await asyncio.shield(self._closed)

    # --- asyncio.Protocol ---------------------------------------------------

    def connection_lost(self, exc: Exception | None) -> None:
        """Fail what waits, and resolve :meth:`wait_closed` with the loss."""
        super().connection_lost(exc)
        error = RedisConnectionError(f"pub/sub connection lost: {exc or 'closed'}")
        if not self._closed.done():
            self._closed.set_exception(error)
            self._closed.exception()  # retrieved here, so an unawaited loss is not logged

    def data_received(self, data: bytes) -> None:
        """Hand each whole message of ``data`` on, a run of one channel's together; a reply
        to its command."""
        self._heard = self._loop.time()
        parser = self._parser
        parser.feed(data)
        channel = b""
        run: list[bytes] = []  # messages of ``channel`` read in a row, not yet handed on
        message = self._message
        while (reply := parser.gets()) is not PARTIAL:
            if isinstance(reply, list) and reply and reply[0] == message:
                if reply[1] != channel and run:
                    self._hand_on(channel, run)
                    run = []
                channel = reply[1]
                run.append(reply[2])
                continue
            if run:  # anything else comes after the messages before it
                self._hand_on(channel, run)
                run = []
            self._reply(reply)
        if run:
            self._hand_on(channel, run)

    def _hand_on(self, channel: bytes, run: list[bytes]) -> None:
        if len(run) == 1 or self._on_run is None:
            for data in run:
                self._on_message(b"message", channel, data)
        else:
            self._on_run(channel, run)

    def _reply(self, reply: Any) -> None:
        """A reply that is not a message: a confirmation, a pong, or a command's reply."""
        if isinstance(reply, list) and reply:
            kind = reply[0]
            if kind in (b"subscribe", b"unsubscribe", b"ssubscribe", b"sunsubscribe"):
                self._on_message(kind, reply[1], None)
                return
            if kind == b"pong":
                return
        if self._waiting:
            settle(self._waiting.popleft(), reply)
        elif isinstance(reply, Exception):  # a refused (S)SUBSCRIBE: MOVED, CROSSSLOT
            self._on_message(b"error", b"", str(reply).encode())

    # --- inside -------------------------------------------------------------

    def _idle(self) -> bool:
        return False  # a link is watched all its life: a message may come at any time

    def _quiet(self, quiet: float) -> None:
        with contextlib.suppress(RedisConnectionError):
            self._write(pack_command(b"PING"))
        self._watch(self._ping_interval)

    def _write(self, data: bytes) -> None:
        if self._transport is None or self._transport.is_closing():
            raise RedisConnectionError("pub/sub connection is closed")
        self._transport.write(data)

    async def _call(self, *args: bytes) -> Any:
        call = Call(pack_command(*args), 1, None, self._loop.create_future())
        self._waiting.append(call)
        self._write(call.payload)
        return await call.future


def _tls_context(options: Mapping[str, Any]) -> ssl.SSLContext:
    """The TLS context redis-py's own connections to the URL use: its ``ssl_*`` query
    options (a private CA's ``ssl_ca_certs``, ``ssl_cert_reqs``...) and redis-py's defaults."""
    return SSLConnection(
        **{k: v for k, v in options.items() if k.startswith("ssl_")}
    ).ssl_context.get()


class ClientLink:
    """The link over redis-py's PubSub: the embedded Redis's, and the public path's."""

    def __init__(self, client: Any, on_message: OnMessage) -> None:
        self._client = client
        self._pubsub = client.pubsub()
        self._on_message = on_message
        self._reader: asyncio.Task[None] | None = None

    @classmethod
    async def open(cls, factory: RedisFactory, on_message: OnMessage) -> ClientLink:
        """A link on a pub/sub client of ``factory``."""
        return cls(factory.pubsub(), on_message)

    async def subscribe(self, *channels: bytes) -> None:
        """Subscribe to ``channels``, and start reading once there is something to read."""
        await self._pubsub.subscribe(*channels)
        if self._reader is None:
            # Read only once subscribed: redis-py's get_message returns at once on a
            # connection with no subscription.
            self._reader = asyncio.create_task(self._read(), name="pubsub-reader")

    async def unsubscribe(self, *channels: bytes) -> None:
        """Unsubscribe from ``channels``."""
        await self._pubsub.unsubscribe(*channels)

    async def wait_closed(self) -> None:
        """Return (or raise) once the reader has stopped."""
        assert self._reader is not None, "subscribe first"
        await asyncio.shield(self._reader)

    async def close(self) -> None:
        """Stop reading and close the client."""
        if self._reader is not None:
            self._reader.cancel()
            await asyncio.gather(self._reader, return_exceptions=True)
        with contextlib.suppress(Exception):
            await self._pubsub.aclose()
        await self._client.aclose()

    async def _read(self) -> None:
        while True:  # until closed (cancelled) or the connection fails
            message = await self._pubsub.get_message(timeout=None)
            if message is None:
                continue
            kind = message["type"]
            if kind in ("message", "subscribe", "unsubscribe"):
                data = message["data"] if kind == "message" else None
                self._on_message(kind.encode(), message["channel"], data)


async def channel_messages(factory: RedisFactory, channel: str) -> AsyncGenerator[bytes, None]:
    """Each message published on ``channel``, on a connection of its own, until it drops.

    A connection error ends it; the caller reconnects (redis-py's own retries are off on
    this client, so nothing published meanwhile is lost silently). Close it with
    ``contextlib.aclosing`` so the connection is closed at once.
    """
    client: Any = factory.pubsub()
    pubsub = client.pubsub()
    try:
        await pubsub.subscribe(channel)
        while True:  # until the connection drops or the caller stops reading
            message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=None)
            if message is not None and message["type"] == "message":
                yield message["data"]
    finally:
        with contextlib.suppress(RedisConnectionError, RedisTimeoutError, OSError):
            await pubsub.aclose()
        await client.aclose()
