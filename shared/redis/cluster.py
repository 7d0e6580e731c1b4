"""Redis Cluster: the commands client, which channels are sharded, and the hub's link.

With a ``redis+cluster://`` URL every command goes through redis-py's ``RedisCluster``,
which learns the slot map from the listed nodes, sends each command to the master of
its key's slot and follows ``MOVED``/``ASK`` redirections. Every script's keys are of
one slot (``{session}`` or ``{user digest}`` hash tags, :mod:`thoughtwire.shared.keys`),
so a script runs on one master.

Channels come in two kinds. A channel whose name has a hash tag (a session's events
and presence frames, a client's personal channel) is *sharded*: it is published with
SPUBLISH, from the script that writes the session's log on the master of that slot,
and followed with SSUBSCRIBE on that master, so an event crosses no cluster bus. The
other channels (the broadcast, a frontend's node channel, runs ended, worker control)
are global: PUBLISH and SUBSCRIBE on any node, which the cluster bus carries to all.

The hub's link (:class:`ClusterLink`) holds one connection for the global channels and
one per master that serves a sharded channel it follows. When a master goes (a
failover) or a slot moves (the master unsubscribes its channels: ``sunsubscribe``), the
link subscribes the channels concerned on the master that serves them now, and has the
hub catch up their viewers, and theirs only, from the log (a ``resync``,
:mod:`thoughtwire.api.hub`). When the global channels' connection goes, or a
subscription is redirected (``MOVED``), the whole link ends and the hub reconnects.

redis-py's asyncio ``ClusterPubSub`` was not taken for it: it reads its shards' messages
by asking each connection in turn with a timeout, and on a lost node it resubscribes by
itself, so nobody learns which channels may have missed messages. The link here hands
each message on from the read callback, as the one-server link does.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import itertools
import logging
import random
from collections import defaultdict
from collections.abc import AsyncIterator, Callable, Coroutine, Iterable, Iterator
from typing import Any, cast

from redis.asyncio.cluster import ClusterNode, ClusterPipeline, RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff
from redis.commands.core import AsyncScript
from redis.exceptions import (
    ClusterDownError,
    ClusterError,
    RedisClusterException,
    RedisError,
    SlotNotCoveredError,
    TryAgainError,
)
from redis.exceptions import ConnectionError as RedisConnectionError

from thoughtwire.shared import backoff  # the module: it imports this package's errors
from thoughtwire.shared.redis.pubsub import OnMessage, OnRun, RawLink
from thoughtwire.shared.redis.topology import Topology
from thoughtwire.shared.settings import Settings

logger = logging.getLogger("thoughtwire.redis.cluster")

# How long the hub's link tries to subscribe a moved slot's channels where it is now (a
# failover takes ``cluster-node-timeout`` and an election) before it ends as a whole.
RELOCATE_SECONDS = 30.0

# How many tags a probe channel tries to find one in a slot of a given master: with
# 16,384 slots over a few masters, the first few tags do.
PROBE_TAGS = 10_000

# A master that cuts its sharded connection again within this many seconds of the last
# time has its channels subscribed again after a growing pause (up to the cap), not at
# once: each time costs a slot map read, a connection, SSUBSCRIBEs and viewers' resyncs.
CUT_WINDOW = 5.0
CUT_BACKOFF_CAP = 5.0

# Commands that find the cluster's shape: their replies are parsed even on the raw
# client (:meth:`ClusterClient.raw`), since redis-py reads its slot map through them.
_DISCOVERY = ("CLUSTER", "COMMAND")


# Replies that say the cluster cannot serve a slot right now (a master failed and its
# replica is not promoted yet, a slot being moved): to a caller, Redis is not there right
# now, as with a lost connection, and a write is retried as it would be then. redis-py
# gives up on a command redirected more than 16 times (``ClusterError``, "TTL exhausted"):
# TRYAGAIN for as long as a slot's keys are half moved, which lasts as long as the move.
TRANSIENT = (ClusterDownError, ClusterError, SlotNotCoveredError, TryAgainError)


def unavailable(error: Exception) -> Exception:
    """``error`` as a connection error if it is :data:`TRANSIENT`, else as it is."""
    if isinstance(error, TRANSIENT):
        unreachable = RedisConnectionError(f"the cluster cannot serve now: {error}")
        unreachable.__cause__ = error
        return unreachable
    return error


def is_cluster(redis: Any) -> bool:
    """Whether ``redis`` is a Redis Cluster client (then tagged channels are sharded)."""
    return isinstance(redis, RedisCluster)


def sharded(channel: str | bytes) -> bool:
    """Whether ``channel`` is a sharded channel in a cluster: its name has a hash tag."""
    name = channel.encode() if isinstance(channel, str) else channel
    start = name.find(b"{")
    return start >= 0 and name.find(b"}", start + 2) > start  # a non-empty ``{tag}``


def register_script(redis: Any, lua: str, *, cross_slot: bool = False) -> AsyncScript:
    """``lua`` as a script of ``redis``. On a cluster, a channel the script is given as a
    key (``redis.call('PUBLISH', KEYS[n], ...)``: a session's, in its slot) is published
    with SPUBLISH on that slot's master; channels given as arguments stay global. Only on
    a cluster can a session's keys come whole from another master (a slot migration):
    ``SLOTS_MOVE`` tells the scripts so (shared/scripts.py, ``_INCARNATION``).
    ``cross_slot``: the script may be given keys of many slots of one master (a bundle,
    :meth:`~thoughtwire.shared.redis.pipeline.Batcher.bundle`), which a cluster runs only
    for a script declared ``allow-cross-slot-keys`` (Redis 7)."""
    if is_cluster(redis):
        lua = lua.replace("redis.call('PUBLISH', KEYS[", "redis.call('SPUBLISH', KEYS[")
        lua = lua.replace("local SLOTS_MOVE = false", "local SLOTS_MOVE = true")
        if cross_slot:
            lua = "#!lua flags=allow-cross-slot-keys\n" + lua
    script: AsyncScript = redis.register_script(lua)
    return script


# Set while a task holds a permit of a client's gate: what it runs meanwhile (redis-py
# sends a pipeline's redirected commands one by one through the client) passes through.
_GATED: contextvars.ContextVar[ClusterClient | None] = contextvars.ContextVar(
    "thoughtwire_cluster_gated", default=None
)


class ClusterClient(RedisCluster):
    """redis-py's ``RedisCluster``, built from a topology and the settings.

    Each node's pool holds ``redis_pool_size`` connections (redis-py's cap is 100 per
    node); a command that meets a lost node, ``CLUSTERDOWN`` or a slot not served is
    retried three times with jittered backoff after reading the slot map again, which
    rides out a replica's promotion (``cluster-node-timeout`` plus a second or so).

    redis-py's cluster pools raise ``MaxConnectionsError`` when a node's pool is full
    (there is no blocking pool for a cluster), so this client waits instead: at most
    ``redis_pool_size`` commands and pipelines are under way at once, each holding at
    most one connection per node, and the others wait for a turn up to
    ``redis_pool_timeout`` (then: a connection error, as a blocking pool's). A node's
    pool is therefore never full.
    """

    def __init__(self, topology: Topology, settings: Settings, *, raw: bool = False) -> None:
        self.topology = topology
        self.settings = settings
        self._twins: list[ClusterClient] = []
        self._gate = asyncio.Semaphore(settings.redis_pool_size)
        super().__init__(
            startup_nodes=[ClusterNode(host, port) for host, port in topology.nodes],
            username=topology.username,
            password=topology.password,
            ssl=topology.tls,
            **topology.tls_options,
            max_connections=settings.redis_pool_size,
            retry=Retry(ExponentialWithJitterBackoff(base=0.1, cap=1.0), 3),
            socket_keepalive=True,
        )
        if raw:
            # Every node shares this one dict (redis-py hands it to each ClusterNode).
            kept = {k: v for k, v in self.response_callbacks.items() if k.startswith(_DISCOVERY)}
            self.response_callbacks.clear()
            self.response_callbacks.update(kept)

    def raw(self) -> ClusterClient:
        """A twin whose data commands' replies are as Redis sent them (the batcher's); it
        is closed with this client."""
        twin = ClusterClient(self.topology, self.settings, raw=True)
        self._twins.append(twin)
        return twin

    async def initialize(self, *args: Any, **kwargs: Any) -> ClusterClient:
        """Read the slot map (first, or again after a lost node). No node answering, or the
        slots not all served, is raised as a connection error: Redis is not there right now,
        which every caller handles, where redis-py's ``RedisClusterException`` is no
        ``RedisError`` and reached a worker's or the hub's retries as a crash."""
        try:
            await super().initialize(*args, **kwargs)
        except SlotNotCoveredError:
            raise  # TRANSIENT already: its callers make it a connection error
        except RedisClusterException as exc:
            raise RedisConnectionError(f"the cluster cannot be reached now: {exc}") from exc
        return self

    async def execute_command(self, *args: Any, **kwargs: Any) -> Any:
        """Run one command, routed by its key; a :data:`TRANSIENT` refusal that outlasted
        the retries is raised as a connection error."""
        try:
            async with self.turn():
                return await super().execute_command(*args, **kwargs)
        except TRANSIENT as exc:
            raise unavailable(exc) from exc

    def pipeline(self, transaction: Any | None = None, shard_hint: Any | None = None) -> Any:
        """A pipeline that waits for a turn of this client's (see the class) to run."""
        if shard_hint:
            return super().pipeline(transaction, shard_hint)  # which refuses it
        # redis-py declares an attribute its pipeline sets at run time as abstract
        return _GatedPipeline(self, transaction)  # type: ignore[abstract]

    @contextlib.asynccontextmanager
    async def turn(self) -> AsyncIterator[None]:
        """Hold one of the ``redis_pool_size`` turns while inside (see the class)."""
        if _GATED.get() is self:
            yield  # inside a turn of this client's already
            return
        try:
            async with asyncio.timeout(self.settings.redis_pool_timeout):
                await self._gate.acquire()
        except TimeoutError:
            raise RedisConnectionError(
                f"no connection free within {self.settings.redis_pool_timeout} s"
            ) from None
        token = _GATED.set(self)
        try:
            yield
        finally:
            _GATED.reset(token)
            self._gate.release()

    async def aclose(self) -> None:
        """Close this client's connections and its twins'."""
        twins, self._twins = self._twins, []
        for twin in twins:
            await twin.aclose()
        await super().aclose()


class _GatedPipeline(ClusterPipeline):
    """redis-py's cluster pipeline, run in a turn of its client's (:meth:`ClusterClient.turn`)."""

    async def execute(self, raise_on_error: bool = True, allow_redirections: bool = True) -> Any:
        """Run the queued commands, one pipeline per node, once a turn is free."""
        client = cast(ClusterClient, self.cluster_client)
        async with client.turn():
            return await super().execute(raise_on_error, allow_redirections)


class ClusterLink:
    """The hub's link over a cluster: global channels on one node, sharded on their master.

    Sharded channels follow their slot. When a master unsubscribes channels the hub did
    not leave (``sunsubscribe``: their slot moved) or its connection is lost (it failed,
    and its replica takes over), the link reads the slot map again and subscribes those
    channels on the master that serves them now, retrying with backoff for up to
    ``RELOCATE_SECONDS``. Once each is confirmed it hands the hub a ``resync`` for it
    (what was published meanwhile was not heard: its viewers catch up from the log).
    A master that cuts its connection again soon after (``CUT_WINDOW``) has its channels
    subscribed again after a growing pause, not at once.
    The link as a whole ends (:meth:`wait_closed` raises, and the hub reconnects, reads
    the slot map and resyncs every viewer) when the global channels' connection is lost,
    a subscription is refused (``MOVED``), or channels find no master in time.
    """

    def __init__(self, client: ClusterClient, on_message: OnMessage, on_run: OnRun | None) -> None:
        self._client = client
        self._on_message = on_message
        self._on_run = on_run
        self._global: RawLink | None = None
        self._shards: dict[str, RawLink] = {}  # a master's name (host:port): its link
        self._where: dict[bytes, str] = {}  # a sharded channel: the master it is on
        self._wanted: set[bytes] = set()  # the sharded channels the hub follows
        # Each channel's SUNSUBSCRIBEs not confirmed yet: the master each went to.
        self._leaving: dict[bytes, list[str]] = defaultdict(list)
        self._moved: set[bytes] = set()  # to subscribe again where their slot is now
        self._relocated: set[bytes] = set()  # subscribed again, not confirmed yet
        self._mover: asyncio.Task[None] | None = None
        self._pause = 0.0  # how long the mover waits before its next round
        # Each master whose connection was cut: when last, and the backoff since.
        self._cuts: dict[str, tuple[float, Iterator[float]]] = {}
        # Each master's probe channel, and the connection it was subscribed on.
        self._probing: dict[str, tuple[RawLink, bytes]] = {}
        self._probes: dict[bytes, asyncio.Future[bytes]] = {}  # probe channels: what came
        self._tags: dict[str, bytes] = {}  # each master's probe channel found, while it holds
        self._closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._tasks: set[asyncio.Task[None]] = set()  # each connection's watcher, and such

    @classmethod
    async def open(
        cls, topology: Topology, settings: Settings, on_message: OnMessage, on_run: OnRun | None
    ) -> ClusterLink:
        """Read the slot map and connect the global channels' link to one of the masters."""
        client = ClusterClient(topology, settings)
        link = cls(client, on_message, on_run)
        try:
            await client.initialize()
            node = random.choice(client.get_primaries())
            link._global = await link._connect(node.name, sharded=False)
        except BaseException:
            await link.close()
            raise
        return link

    async def subscribe(self, *channels: bytes) -> None:
        """Subscribe: global channels on the global link, sharded ones on their master.

        A sharded channel whose master cannot be reached now is subscribed where its slot
        is once it can (its confirmation comes then), as if its slot had moved.
        """
        assert self._global is not None
        plain = [c for c in channels if not sharded(c)]
        if plain:
            await self._global.subscribe(*plain)
        tagged = [c for c in channels if sharded(c)]
        self._wanted.update(tagged)
        try:
            await self._subscribe_sharded(tagged)
        except (RedisError, OSError):
            self._relocate(tagged)  # SSUBSCRIBE again where one went out is harmless

    async def unsubscribe(self, *channels: bytes) -> None:
        """Unsubscribe, each channel where it was subscribed."""
        assert self._global is not None
        plain = [c for c in channels if not sharded(c)]
        if plain:
            await self._global.unsubscribe(*plain)
        by_link: dict[tuple[str, int], list[bytes]] = defaultdict(list)
        for channel in channels:
            self._wanted.discard(channel)
            self._moved.discard(channel)
            name = self._where.pop(channel, None) if sharded(channel) else None
            if name is not None and name in self._shards:
                by_link[(name, self._client.keyslot(channel))].append(channel)
        for (name, _slot), group in by_link.items():
            for channel in group:
                self._leaving[channel].append(name)
            try:
                await self._shards[name].unsubscribe(*group)
            except BaseException:
                for channel in group:  # not sent: no confirmation will come
                    self._left(channel, name)
                raise

    async def probe_shards(
        self, token: bytes, within: float, channel_of: Callable[[str], str]
    ) -> int:
        """Probe each master's connection: SPUBLISH ``token`` on a channel of a slot that
        master serves (``channel_of(tag)``), through the commands client, and drop the
        connection it does not come back on within ``within`` seconds (its channels are then
        subscribed again and their viewers resync, as when a master is lost). Returns how
        many connections were dropped.

        A connection's probe channel is subscribed at its first probe, and probed from
        the next; a probe that could not be published says nothing of the connection.
        """
        ready: dict[str, tuple[RawLink, bytes]] = {}
        owners = self._owners()
        for name, link in list(self._shards.items()):
            channel = self._probe_channel(name, channel_of) if name in owners else None
            if link.closed or channel is None:
                continue
            if self._probing.get(name) == (link, channel):
                ready[name] = (link, channel)
                continue
            self._probing[name] = (link, channel)
            self._probes[channel] = asyncio.get_running_loop().create_future()
            with contextlib.suppress(RedisConnectionError, OSError):
                await link.subscribe(channel)
        published = await self._publish_probes(ready, token, within)
        sent = [name for name, ok in zip(ready, published, strict=True) if ok]
        # A probe channel's slot may have moved meanwhile (``sunsubscribe``): its entry is
        # gone, and the connection it came on is not deaf (it heard that).
        sent = [name for name in sent if ready[name][1] in self._probes]
        if sent:
            await asyncio.wait([self._probes[ready[name][1]] for name in sent], timeout=within)
        deaf = [
            name
            for name in sent
            if ready[name][1] in self._probes and not self._came_back(ready[name][1], token)
        ]
        for name in deaf:
            logger.warning("the pub/sub connection to %s is deaf: a probe did not come back", name)
            self._probing.pop(name, None)
            ready[name][0].abort()  # as a lost master: its channels are subscribed again
        return len(deaf)

    async def wait_closed(self) -> None:
        """Raise once the link as a whole is over (see the class's docstring)."""
        await asyncio.shield(self._closed)

    async def close(self) -> None:
        """Close every connection; idempotent."""
        self._end(RedisConnectionError("pub/sub link closed"), quiet=True)
        tasks = [*self._tasks, *([self._mover] if self._mover is not None else [])]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        links = [self._global, *self._shards.values()]
        self._global, self._shards = None, {}
        for link in links:
            if link is not None:
                with contextlib.suppress(RedisConnectionError, OSError):
                    await link.close()
        with contextlib.suppress(RedisError, OSError):
            await self._client.aclose()

    # --- inside -------------------------------------------------------------

    def _by_slot(self, channels: Iterable[bytes]) -> dict[tuple[str, int], list[bytes]]:
        """Channels grouped by master and slot: one SSUBSCRIBE takes channels of one slot."""
        groups: dict[tuple[str, int], list[bytes]] = defaultdict(list)
        for channel in channels:
            try:
                node = self._client.get_node_from_key(channel.decode())
            except SlotNotCoveredError as exc:
                raise unavailable(exc) from exc
            assert node is not None
            groups[(node.name, self._client.keyslot(channel))].append(channel)
        return groups

    async def _subscribe_sharded(self, channels: Iterable[bytes]) -> None:
        for (name, _slot), group in self._by_slot(channels).items():
            link = self._shards.get(name)
            if link is None or link.closed:
                link = self._shards[name] = await self._connect(name, sharded=True)
            for channel in group:
                self._where[channel] = name
            await link.subscribe(*group)

    async def _connect(self, name: str, *, sharded: bool) -> RawLink:
        host, _, port = name.rpartition(":")
        url = self._client.topology.node_url(host, int(port))
        on_message = self._on_shard if sharded else self._on_message
        link = await RawLink.open(url, on_message, on_run=self._on_run, sharded=sharded)
        self._keep(self._watch(link, name if sharded else None), f"cluster-link-{name}")
        return link

    def _keep(self, work: Coroutine[Any, Any, None], name: str) -> None:
        task = asyncio.create_task(work, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _watch(self, link: RawLink, shard: str | None) -> None:
        """A master's connection ended: subscribe its channels where their slots are now.
        The global channels' connection ended: so does the link (the hub reconnects)."""
        try:
            await link.wait_closed()
            error: Exception = RedisConnectionError(f"pub/sub connection to {shard} closed")
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            error = exc
        if self._closed.done():
            return  # the link is over: nothing to follow
        if shard is None:
            self._end(error)
            return
        if self._shards.get(shard) is link:
            del self._shards[shard]
        lost = [c for c, name in self._where.items() if name == shard]
        for channel in lost:
            del self._where[channel]
        self._forget_leaving(shard)
        logger.info("%s; %d channels to subscribe again", error, len(lost))
        self._pause = max(self._pause, self._backoff_after_cut(shard))
        self._relocate(lost)

    def _forget_leaving(self, shard: str) -> None:
        """The SUNSUBSCRIBEs sent to master ``shard`` will never be confirmed: its
        connection is gone."""
        for channel, names in list(self._leaving.items()):
            names[:] = [name for name in names if name != shard]
            if not names:
                del self._leaving[channel]

    def _left(self, channel: bytes, shard: str | None = None) -> bool:
        """One SUNSUBSCRIBE of ``channel`` is over (to ``shard``, or the oldest): whether
        there was one (else the master let the channel go by itself)."""
        names = self._leaving.get(channel)
        if not names:
            return False
        names.remove(shard if shard is not None and shard in names else names[0])
        if not names:
            del self._leaving[channel]
        return True

    def _backoff_after_cut(self, shard: str) -> float:
        """How long to wait before subscribing master ``shard``'s channels again: nothing
        at its first cut, and a growing backoff while it keeps cutting its connection
        within ``CUT_WINDOW`` of the last time (a master that drops each SSUBSCRIBE)."""
        now = asyncio.get_running_loop().time()
        last = self._cuts.get(shard)
        if last is None or now - last[0] > CUT_WINDOW:
            self._cuts[shard] = (now, backoff.delays(0.1, CUT_BACKOFF_CAP))
            return 0.0
        self._cuts[shard] = (now, last[1])
        return next(last[1])

    def _relocate(self, channels: Iterable[bytes]) -> None:
        """Subscribe ``channels`` again, each where its slot is now (in the background)."""
        self._moved.update(channels)
        if self._mover is None and self._moved and not self._closed.done():
            self._mover = asyncio.create_task(self._move(), name="cluster-link-relocate")

    async def _move(self) -> None:
        """Read the slot map and subscribe the moved channels there, until done or timed out."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + RELOCATE_SECONDS
        delay = 0.05
        try:
            while self._moved:  # bounded by the deadline
                if self._pause > 0:  # a master that keeps cutting its connection
                    pause, self._pause = self._pause, 0.0
                    await asyncio.sleep(pause)
                channels, self._moved = self._moved & self._wanted, set()
                self._relocated |= channels
                try:
                    await self._read_slot_map()
                    await self._subscribe_sharded(channels)
                    continue
                except (RedisError, OSError) as exc:
                    self._moved |= channels
                    if loop.time() + delay > deadline:
                        self._end(unavailable(exc))
                        return
                await asyncio.sleep(delay * random.uniform(0.5, 1.0))
                delay = min(2 * delay, 1.0)
        finally:
            self._mover = None

    async def _read_slot_map(self) -> None:
        """A new client, with the slot map as it is now: the old one serves until it is read."""
        client = ClusterClient(self._client.topology, self._client.settings)
        try:
            await client.initialize()
        except BaseException:
            with contextlib.suppress(RedisError, OSError):
                await client.aclose()
            raise
        old, self._client = self._client, client
        self._tags.clear()  # a new slot map: each master's probe channel is found again
        with contextlib.suppress(RedisError, OSError):
            await old.aclose()

    def _owners(self) -> set[str]:
        """The masters that serve a slot in the slot map (a master may serve none)."""
        slots = self._client.nodes_manager.slots_cache
        return {nodes[0].name for nodes in slots.values() if nodes}

    def _probe_channel(self, name: str, channel_of: Callable[[str], str]) -> bytes | None:
        """The probe channel of master ``name`` (one that serves slots): the one found
        before, while its slot is still that master's, or the first of a tag in one of its
        slots; None if none is found."""
        known = self._tags.get(name)
        found = [known.decode()] if known is not None else []
        tried = (channel_of(str(i)) for i in range(PROBE_TAGS))  # named only when tried
        for channel in itertools.chain(found, tried):  # bounded: PROBE_TAGS and one
            try:
                node = self._client.get_node_from_key(channel)
            except SlotNotCoveredError:
                return None
            if node is not None and node.name == name:
                self._tags[name] = channel.encode()
                return self._tags[name]
        return None

    async def _publish_probes(
        self, ready: dict[str, tuple[RawLink, bytes]], token: bytes, within: float
    ) -> list[bool]:
        """SPUBLISH ``token`` on each ready probe channel; whether each went out."""
        for _link, channel in ready.values():
            self._probes[channel] = asyncio.get_running_loop().create_future()

        async def publish(channel: bytes) -> bool:
            try:
                async with asyncio.timeout(within):
                    await self._client.spublish(channel, token)
            except (RedisError, OSError, TimeoutError):
                return False
            return True

        return list(await asyncio.gather(*(publish(c) for _link, c in ready.values())))

    def _came_back(self, channel: bytes, token: bytes) -> bool:
        heard = self._probes.get(channel)
        return heard is not None and heard.done() and heard.result() == token

    def _on_probe(self, kind: bytes, channel: bytes, data: bytes | None) -> None:
        """A probe channel's message or confirmation: the hub hears nothing of it."""
        heard = self._probes.get(channel)
        if kind == b"message" and heard is not None and not heard.done() and data is not None:
            heard.set_result(data)
        elif kind == b"sunsubscribe":  # its slot moved: another tag at the next probe
            for name, (_link, probing) in list(self._probing.items()):
                if probing == channel:
                    del self._probing[name]
                    self._tags.pop(name, None)
            self._probes.pop(channel, None)

    def _on_shard(self, kind: bytes, channel: bytes, data: bytes | None) -> None:
        """What a master's connection hands on: a probe's, or the hub's channels'."""
        if channel in self._probes:
            self._on_probe(kind, channel, data)
        else:
            self._on_shard_message(kind, channel, data)

    def _on_shard_message(self, kind: bytes, channel: bytes, data: bytes | None) -> None:
        """A master's message or confirmation, as the hub takes it; a moved slot's channels
        are subscribed again where it is now."""
        if kind == b"message":
            self._on_message(kind, channel, data)
        elif kind == b"ssubscribe":
            if channel not in self._wanted:  # left while it was being subscribed again
                self._keep(self._drop(channel), "cluster-link-drop")
                return
            self._on_message(b"subscribe", channel, None)
            if channel in self._relocated:
                self._relocated.discard(channel)
                self._on_message(b"resync", channel, None)
        elif kind == b"sunsubscribe":
            if self._left(channel):
                self._on_message(b"unsubscribe", channel, None)
            elif channel in self._wanted:  # the master let it go: its slot moved
                self._where.pop(channel, None)
                self._relocate([channel])
        elif kind == b"error":
            self._end(RedisConnectionError(f"subscription refused: {data!r}"))

    async def _drop(self, channel: bytes) -> None:
        name = self._where.pop(channel, None)
        link = self._shards.get(name or "")
        if link is not None and name is not None:
            self._leaving[channel].append(name)
            try:
                await link.unsubscribe(channel)
            except RedisConnectionError:
                self._left(channel, name)  # not sent: no confirmation will come

    def _end(self, error: Exception, *, quiet: bool = False) -> None:
        if not self._closed.done():
            if not quiet:
                logger.info("cluster pub/sub link ends: %s", error)
            self._closed.set_exception(error)
            self._closed.exception()  # retrieved: an unawaited end is not logged
