"""The hub: every live socket of this frontend, by channel, fed by ONE pub/sub connection.

A frontend subscribes to a channel while at least one of its sockets is on it
(reference-counted) and unsubscribes when the last one leaves. Channels are exact,
never patterns. A message from Redis is decoded from UTF-8 once and handed to every
viewer of its channel; nothing is parsed or re-encoded on the way. It is also framed
once, as the WebSocket frame every socket of the channel sends (:mod:`thoughtwire.api.wire`).

A viewer whose token is scoped (:mod:`thoughtwire.api.scopes`) is sent what its scope
shows: on a channel with such viewers, each message is projected and framed once per
scope present, whatever the number of sockets of each. A channel without one pays
nothing for scopes but a dictionary look-up per message.

A frontend that falls behind (thousands of sockets on one session) reads many messages
of a channel at once. The pub/sub link hands such a run over together, and the hub
hands every viewer the whole :class:`Run`: a socket that keeps up checks the run's
positions once and writes its frames with one call, one ``send`` for k events instead
of k. A run that does not continue a viewer's position as a whole, or that its
transport cannot take at once, is delivered frame by frame, as a lone message is. On a
channel with scoped viewers each message of a run is delivered alone.

Delivery to a viewer never blocks: ``Subscriber.deliver`` must return at once (a socket
puts the frame in its own bounded queue), so one slow client cannot stall the relay.

A pub/sub connection can stay connected, answer its pings, and deliver nothing: after a
failover it may still be on the old master, or a proxy between may have stopped
forwarding (Centrifugo's users lost deliveries that way while every health check stayed
green, centrifugal/centrifugo#1189). So the hub probes it: every ``probe_interval`` it
publishes a probe on its home channel through the command connection, which follows the
current master, and a probe that has not come back within the next interval means the
link is deaf: it is dropped, reconnected, and every viewer resyncs from the log, as
after any reconnect.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any, Protocol, cast

from thoughtwire.api import scopes
from thoughtwire.api.metrics import COUNTS
from thoughtwire.api.wire import text_frame
from thoughtwire.shared.backoff import delays
from thoughtwire.shared.protocol import event_position
from thoughtwire.shared.redis import RedisConnectionError, RedisError, RedisTimeoutError
from thoughtwire.shared.redis.pubsub import Link, OnMessage, OnRun, ShardedLink
from thoughtwire.shared.vocab import ViewScope

logger = logging.getLogger("thoughtwire.hub")

SUBSCRIBE_TIMEOUT = 10.0
RESUBSCRIBE_BATCH = 500


class Run:
    """Messages of one channel that came in a row in one read, each as ``deliver`` takes it.

    ``wire`` is every frame ready for a WebSocket, joined. When the run is events of one
    epoch whose seqs follow each other, ``epoch`` is that epoch and ``first`` and
    ``last`` the first and last seq (``epoch`` is None otherwise): a viewer checks the
    run's order with one comparison.
    """

    __slots__ = ("epoch", "events", "first", "frames", "last", "positions", "wire", "wires")

    def __init__(self, data: list[bytes]) -> None:
        self.frames = [d.decode() for d in data]
        self.positions = [event_position(f) for f in self.frames]
        self.wires = [text_frame(d) for d in data]  # once per message, whatever the sockets
        self.wire = b"".join(self.wires)
        self.epoch: str | None = None
        self.first = self.last = 0
        self.events = len(self.positions) - self.positions.count(None)  # frames that are events
        head = self.positions[0]
        if head is not None:
            seq, epoch = head
            for position in self.positions:  # bounded by the run
                if position != (seq, epoch):
                    return
                seq += 1
            self.epoch, self.first, self.last = epoch, head[0], seq - 1


class Subscriber(Protocol):
    """What the hub hands a channel's frames to: a viewer (api/viewer.py)."""

    def deliver(self, frame: str, position: tuple[int, str] | None, wire: bytes) -> None:
        """Take one frame (its ``(seq, epoch)`` if it is an event, and the frame ready
        for a WebSocket); must not block."""

    def deliver_run(self, run: Run) -> None:
        """Take a run's frames, in order, as ``deliver`` takes each; must not block."""

    def resync(self) -> None:
        """Frames may have been lost (the connection to Redis dropped): catch up."""

    def close(self, code: int, reason: str) -> None:
        """Close the client (a draining frontend tells it to reconnect elsewhere)."""


class ScopedSubscriber(Subscriber, Protocol):
    """A subscriber that joins with a scope other than full (a viewer of a scoped token)."""

    def deliver_view(
        self, frame: str, position: tuple[int, str] | None, view: str | None, wire: bytes | None
    ) -> None:
        """Take ``frame`` as it came, and ``view``, what the scope shows of it (None:
        nothing), with ``wire`` the view ready for a WebSocket; must not block."""


class _Views:
    """A channel's viewers by scope, kept while one of them has a scope other than full."""

    __slots__ = ("full", "scoped")

    def __init__(self, full: set[Subscriber]) -> None:
        self.full = full
        self.scoped: dict[ViewScope, set[ScopedSubscriber]] = {}


class Hub:
    """Registry of live sockets by channel; owns this process's pub/sub connection."""

    def __init__(
        self,
        open_link: Callable[[OnMessage, OnRun], Awaitable[Link]],
        home_channel: str,
        *,
        publish: Callable[[str, bytes], Awaitable[Any]] | None = None,
        probe_interval: float = 0.0,
        probe_channel: Callable[[str], str] | None = None,
    ) -> None:
        self._open_link = open_link
        # A cluster's link has a connection per master: each is probed on a channel of a
        # slot of that master, named by its tag (Bus.probe_channel).
        self._probe_channel = probe_channel
        # Subscribed for the hub's whole life, so the connection is never idle of
        # subscriptions (and a frontend can be reached on it). Probes come back on it.
        self._home = home_channel.encode()
        self._publish = publish
        self._probe_interval = probe_interval if publish is not None else 0.0
        self._probe: tuple[bytes, asyncio.Future[None]] | None = None  # the one under way
        self._deaf = asyncio.Event()  # a probe did not come back on the link in use
        self._prober: asyncio.Task[None] | None = None
        self.deaf_links = 0  # links dropped because a probe did not come back
        self._viewers: dict[bytes, set[Subscriber]] = {}
        # Only channels with a viewer of a scope other than full: every viewer by scope.
        self._scoped: dict[bytes, _Views] = {}
        # One future per SUBSCRIBE sent, resolved by its confirmation, in order.
        self._pending: dict[bytes, deque[asyncio.Future[None]]] = {}
        self._lock = asyncio.Lock()
        self._link: Link | None = None
        self._reader: asyncio.Task[None] | None = None
        self._connected = asyncio.Event()
        self._resync: asyncio.Task[None] | None = None
        self.reconnects = 0
        # Each channel's last event heard: how far behind it a viewer is (api/metrics.py).
        self.heads: dict[bytes, tuple[int, str]] = {}

    @property
    def healthy(self) -> bool:
        """Whether the pub/sub connection is up."""
        return self._connected.is_set()

    def channels(self) -> list[str]:
        """The channels this frontend is subscribed to."""
        return [c.decode() for c in self._viewers]

    def viewers(self) -> set[Subscriber]:
        """Every viewer on any channel: the live sockets and streams of this frontend."""
        return set().union(*self._viewers.values())

    async def start(self) -> None:
        """Connect, subscribe to the home channel, and start reading."""
        await self._connect()
        self._reader = asyncio.create_task(self._read_forever(), name="hub-reader")
        if self._probe_interval > 0:
            self._prober = asyncio.create_task(self._probe_forever(), name="hub-probe")

    async def close(self) -> None:
        """Stop reading and drop the connection. Idempotent."""
        prober, reader, resync = self._prober, self._reader, self._resync
        self._prober = self._reader = None
        for task in (prober, reader, resync):
            if task is not None:
                await _stop(task)
        await self._disconnect()

    async def join(
        self, channel: str, viewer: Subscriber, scope: ViewScope = ViewScope.FULL
    ) -> None:
        """Add a viewer; returns once this frontend is subscribed to the channel.

        A viewer of a ``scope`` other than full must be a :class:`ScopedSubscriber`.
        """
        key = channel.encode()
        async with self._lock:
            viewers = self._viewers.setdefault(key, set())
            first = not viewers
            viewers.add(viewer)
            if scope is not ViewScope.FULL or key in self._scoped:
                self._place(key, viewers, viewer, scope)
            if not self._connected.is_set():
                return  # the reader resubscribes every live channel when it reconnects
            if first:
                ready: asyncio.Future[None] | None = self._expect_subscribe(key)
                try:
                    assert self._link is not None
                    await self._link.subscribe(key)
                except (RedisConnectionError, RedisTimeoutError):
                    return  # likewise: the reader notices, reconnects, resubscribes
            else:
                waiters = self._pending.get(key)
                ready = waiters[-1] if waiters else None
        if ready is not None:
            async with asyncio.timeout(SUBSCRIBE_TIMEOUT):
                await asyncio.shield(ready)

    async def leave(self, channel: str, viewer: Subscriber) -> None:
        """Remove a viewer; unsubscribes when it was the channel's last."""
        key = channel.encode()
        async with self._lock:
            viewers = self._viewers.get(key)
            if viewers is None or viewer not in viewers:
                return
            viewers.discard(viewer)
            if key in self._scoped:
                self._unplace(key, viewer)
            if viewers:
                return
            del self._viewers[key]
            self.heads.pop(key, None)
            if self._connected.is_set():
                try:
                    assert self._link is not None
                    await self._link.unsubscribe(key)
                except (RedisConnectionError, RedisTimeoutError):
                    pass  # the reader reconnects and only resubscribes live channels

    def _place(
        self, key: bytes, viewers: set[Subscriber], viewer: Subscriber, scope: ViewScope
    ) -> None:
        """File a viewer under its scope, on a channel that has (or now has) a scoped one."""
        views = self._scoped.get(key)
        if views is None:  # the first scoped viewer: the others are all full
            views = self._scoped[key] = _Views(viewers - {viewer})
        if scope is ViewScope.FULL:
            views.full.add(viewer)
        else:
            views.scoped.setdefault(scope, set()).add(cast(ScopedSubscriber, viewer))

    def _unplace(self, key: bytes, viewer: Subscriber) -> None:
        """Unfile a viewer; once no scoped viewer is left, the channel is plain again."""
        views = self._scoped[key]
        views.full.discard(viewer)
        for scope, group in list(views.scoped.items()):
            group.discard(cast(ScopedSubscriber, viewer))
            if not group:
                del views.scoped[scope]
        if not views.scoped:
            del self._scoped[key]

    # --- reading ------------------------------------------------------------

    def _expect_subscribe(self, key: bytes) -> asyncio.Future[None]:
        fut = asyncio.get_running_loop().create_future()
        self._pending.setdefault(key, deque()).append(fut)
        return fut

    def _dispatch(self, kind: bytes, channel: bytes, data: bytes | None) -> None:
        """From the link's read callback: hand a message on, or settle a subscription."""
        if kind == b"message":
            viewers = self._viewers.get(channel)
            if viewers and data is not None:
                frame = data.decode()
                position = event_position(frame)
                wire = text_frame(data)  # once per message, whatever the number of sockets
                if position is not None:  # counted per message, never per socket
                    self.heads[channel] = position
                    COUNTS.relayed += len(viewers)
                views = self._scoped.get(channel)
                if views is not None:
                    self._deliver_views(views, frame, position, wire)
                    return
                for viewer in tuple(viewers):
                    viewer.deliver(frame, position, wire)
            elif channel == self._home and data is not None:
                self._heard(data)
        elif kind == b"subscribe":
            self._confirmed(channel)
        elif kind == b"resync":  # the link missed what came meanwhile (a cluster slot moved)
            for viewer in tuple(self._viewers.get(channel, ())):
                viewer.resync()

    def _confirmed(self, channel: bytes) -> None:
        """A subscription confirmed: the oldest join waiting for it goes on."""
        waiters = self._pending.get(channel)
        if waiters:
            fut = waiters.popleft()
            if not waiters:
                del self._pending[channel]
            if not fut.done():
                fut.set_result(None)

    def _dispatch_run(self, channel: bytes, data: list[bytes]) -> None:
        """From the link's read callback: messages of one channel that came in a row."""
        viewers = self._viewers.get(channel)
        if not viewers:
            if channel == self._home:
                for message in data:
                    self._heard(message)
            return
        if channel in self._scoped:  # projected message by message, once per scope each
            for message in data:
                self._dispatch(b"message", channel, message)
            return
        run = Run(data)
        if run.events:
            self.heads[channel] = next(p for p in reversed(run.positions) if p is not None)
            COUNTS.relayed += run.events * len(viewers)
        for viewer in tuple(viewers):
            viewer.deliver_run(run)

    @staticmethod
    def _deliver_views(
        views: _Views, frame: str, position: tuple[int, str] | None, wire: bytes
    ) -> None:
        """A message to a channel with scoped viewers: projected once per scope present."""
        for full in tuple(views.full):
            full.deliver(frame, position, wire)
        for scope, group in tuple(views.scoped.items()):
            view = scopes.project_frame(frame, scope)
            view_wire = None if view is None else text_frame(view.encode())
            for viewer in tuple(group):
                viewer.deliver_view(frame, position, view, view_wire)

    async def _read_forever(self) -> None:
        """Messages arrive through ``_dispatch``; this waits for the link to drop."""
        while True:
            try:
                assert self._link is not None
                if await self._until_dropped(self._link):
                    logger.warning("pub/sub connection closed; reconnecting")
                else:
                    logger.warning(
                        "pub/sub connection deaf: a probe did not come back within %.1f s; "
                        "reconnecting",
                        self._probe_interval,
                    )
            except asyncio.CancelledError:
                raise
            except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
                logger.warning("pub/sub connection lost (%s); reconnecting", type(exc).__name__)
            await self._reconnect()

    async def _until_dropped(self, link: Link) -> bool:
        """Wait until ``link`` closes (True) or a probe finds it deaf (False)."""
        closed = asyncio.ensure_future(link.wait_closed())
        deaf = asyncio.ensure_future(self._deaf.wait())
        try:
            done, _ = await asyncio.wait((closed, deaf), return_when=asyncio.FIRST_COMPLETED)
        finally:
            closed.cancel()
            deaf.cancel()
        if closed in done:
            if not closed.cancelled():
                closed.result()  # what ended the connection, if it failed
            return True
        self.deaf_links += 1
        return False

    # --- probing ------------------------------------------------------------

    async def _probe_forever(self) -> None:
        """Probe the link in use every interval, for the hub's whole life."""
        for n in itertools.count(1):
            await asyncio.sleep(self._probe_interval)
            try:
                await self._probe_round(n)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # one round's failure must not end deaf-link detection
                logger.warning("pub/sub probe %d failed (%s); probing on", n, type(exc).__name__)

    async def _probe_round(self, n: int) -> None:
        """Probe ``n`` of the link in use, and of a cluster link's masters' connections."""
        link = self._link
        if link is None or not self._connected.is_set() or self._deaf.is_set():
            return
        if not await self.probe(n) and self._link is link:
            self._deaf.set()
        elif isinstance(link, ShardedLink) and self._probe_channel is not None:
            token = b"probe %d" % n
            self.deaf_links += await link.probe_shards(
                token, self._probe_interval, self._probe_channel
            )

    async def probe(self, n: int) -> bool:
        """Publish probe ``n`` on the home channel; whether it came back within an interval.

        A probe that could not be published says nothing of the link (Redis is away, and
        the link will notice that itself): True. A cluster's link has one connection per
        master besides: those are probed each on a channel of its master's
        (:meth:`ShardedLink.probe_shards`), and a deaf one is dropped alone.
        """
        assert self._publish is not None
        token = b"probe %d" % n
        heard = asyncio.get_running_loop().create_future()
        self._probe = (token, heard)
        try:
            try:
                async with asyncio.timeout(self._probe_interval):
                    await self._publish(self._home.decode(), token)
            except (RedisError, OSError, TimeoutError):
                return True
            # Not a timeout around the await: a loop that stalled past the deadline runs
            # the reply's callback and the timeout in one turn, and a reply read by then
            # was heard. (A timeout would cancel the wait all the same.)
            done, _pending = await asyncio.wait([heard], timeout=self._probe_interval)
            return bool(done)
        finally:
            self._probe = None

    def _heard(self, data: bytes) -> None:
        """A message on the home channel: the probe under way, if it is that one."""
        if self._probe is not None and self._probe[0] == data and not self._probe[1].done():
            self._probe[1].set_result(None)

    async def _reconnect(self) -> None:
        """Back off (capped, with jitter), reconnect, and resubscribe every live channel."""
        self._connected.clear()
        await self._disconnect()
        for delay in delays():
            await asyncio.sleep(delay)
            try:
                async with self._lock:
                    await self._connect()
                    subscribed = await self._resubscribe()
            except asyncio.CancelledError:
                raise
            except (RedisConnectionError, RedisTimeoutError, OSError):
                await self._disconnect()
                continue
            self.reconnects += 1
            COUNTS.pubsub_reconnects += 1
            logger.info("pub/sub reconnected; %d channels resubscribed", len(self._viewers))
            self._resync = asyncio.create_task(self._resync_when(subscribed), name="hub-resync")
            return

    async def _resync_when(self, subscribed: list[asyncio.Future[None]]) -> None:
        """Once the resubscriptions are confirmed, have every viewer catch up from the log.

        Confirmed first: a viewer reading the log before its channel is live again
        could miss what is published in between. The reader resolves the futures.
        """
        if subscribed:
            # asyncio.wait, not gather: a timeout must not cancel futures joins await.
            await asyncio.wait(subscribed, timeout=SUBSCRIBE_TIMEOUT)
        for viewer in self.viewers():
            viewer.resync()

    async def _resubscribe(self) -> list[asyncio.Future[None]]:
        # Every SUBSCRIBE sent gets a future, awaited or not, so that confirmations
        # keep pairing with the right SUBSCRIBE if a channel is left and joined again.
        keys = list(self._viewers)
        futures = []
        for start in range(0, len(keys), RESUBSCRIBE_BATCH):
            batch = keys[start : start + RESUBSCRIBE_BATCH]
            futures += [self._expect_subscribe(key) for key in batch]
            assert self._link is not None
            await self._link.subscribe(*batch)
        return futures

    async def _connect(self) -> None:
        self._link = await self._open_link(self._dispatch, self._dispatch_run)
        try:
            await self._link.subscribe(self._home)
        except BaseException:
            await self._disconnect()
            raise
        self._deaf.clear()
        self._connected.set()

    async def _disconnect(self) -> None:
        self._connected.clear()
        # Joins waiting for a confirmation that will never come return now; their
        # channels are in ``_viewers`` and get resubscribed on reconnect.
        for waiters in self._pending.values():
            for fut in waiters:
                if not fut.done():
                    fut.set_result(None)
        self._pending.clear()
        link, self._link = self._link, None
        if link is not None:
            with contextlib.suppress(RedisConnectionError, OSError):
                await link.close()


async def _stop(task: asyncio.Task[None]) -> None:
    """Cancel ``task`` and wait for it; what it failed with is logged, not raised (closing
    goes on)."""
    task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        if not task.cancelled():  # it was this caller that was cancelled
            raise
    except Exception as exc:
        logger.warning("%s had failed (%s)", task.get_name(), type(exc).__name__)
