"""The one place that decides how to reach Redis: pools sized explicitly, and the embedded Redis.

Every Redis connection a process opens comes from a :class:`RedisFactory`. It
reaches one server (``REDIS_URL``), the in-process one of the embedded mode, or the
master of a Sentinel service (:mod:`thoughtwire.shared.redis.sentinel`, which builds
those clients and follows failovers while :meth:`RedisFactory.following`). A topology
plugs in at :meth:`RedisFactory.url`, which answers "where is the Redis that serves
this key's slot", and at the clients built from it; nothing outside this folder knows
which.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING, Any

from redis.asyncio import BlockingConnectionPool, Redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from thoughtwire.shared.redis import fast
from thoughtwire.shared.redis.sentinel import SentinelMaster
from thoughtwire.shared.redis.topology import Kind, Topology, parse
from thoughtwire.shared.settings import Settings

if TYPE_CHECKING:
    import fakeredis


@dataclass
class RedisFactory:
    """Opens the clients a process needs, against a real Redis or the embedded one.

    Embedded mode (no ``REDIS_URL``) uses one in-process fakeredis server shared
    by every client the factory opens, so frontends and workers in one process
    talk to each other as they would through a real Redis.
    """

    settings: Settings
    _server: fakeredis.FakeServer | None = field(default=None, init=False)
    _next_node: int = field(default=-1, init=False)  # Redis Cluster: the last pub/sub node

    def __post_init__(self) -> None:
        # The batcher is handed a client, not the settings: the switch goes with the factory.
        fast.set_switch(self.settings.fast_paths)

    @property
    def embedded(self) -> bool:
        """No server to reach: every client talks to the in-process Redis."""
        return self.settings.redis_url is None

    def url(self, key: str | None = None) -> str | None:
        """The URL of the Redis that serves ``key``'s slot (any key: None); None when embedded.

        One server serves every slot today. A Cluster topology answers here, per slot.
        Behind Sentinel this is the sentinels' URL: the master's address changes with
        failovers, so it is asked for when connecting (:meth:`link_url`, and redis-py's
        Sentinel pools).
        """
        return self.settings.redis_url

    @cached_property
    def cluster(self) -> Topology | None:
        """The Redis Cluster's topology, with a ``redis+cluster://`` URL (shared/redis/cluster.py)."""
        url = self.settings.redis_url
        if url is None or (topology := parse(url)).kind is not Kind.CLUSTER:
            return None
        return topology

    @cached_property
    def sentinel(self) -> SentinelMaster | None:
        """The Sentinel service's master and its follower, with a ``redis+sentinel://`` URL."""
        url = self.settings.redis_url
        if url is None or (topology := parse(url)).kind is not Kind.SENTINEL:
            return None
        return SentinelMaster(topology, self.settings)

    async def link_url(self) -> str | None:
        """The URL of the server for a connection of our own (the hub's raw link): the one
        server, or the master the sentinels name now; None when embedded. Hand that
        connection to :meth:`watch`."""
        if self.sentinel is not None:
            return await self.sentinel.master_url()
        return self.url()

    def watch(self, connection: Any) -> None:
        """Abort ``connection`` (of our own, with an ``abort()``) when the master switches."""
        if self.sentinel is not None:
            self.sentinel.watch(connection)

    @contextlib.asynccontextmanager
    async def following(self) -> AsyncIterator[None]:
        """Follow the master across failovers while inside (Sentinel); one server: nothing."""
        if self.sentinel is None:
            yield
            return
        async with self.sentinel.following():
            yield

    def commands(self) -> Redis:
        """The client for commands: a blocking pool of ``redis_pool_size`` connections.

        A blocking pool waits up to ``redis_pool_timeout`` for a free connection;
        the default pool raises ``MaxConnectionsError`` at once, which under load
        turns into lost events.
        """
        url = self.url()
        if url is None:
            return self._fake()
        if self.sentinel is not None:
            return self.sentinel.commands()
        if self.cluster is not None:
            from thoughtwire.shared.redis.cluster import ClusterClient  # it imports this module

            client: Any = ClusterClient(self.cluster, self.settings)
            return client  # a RedisCluster: the same commands, routed per slot
        pool = BlockingConnectionPool.from_url(
            url,
            max_connections=self.settings.redis_pool_size,
            timeout=self.settings.redis_pool_timeout,
            socket_keepalive=True,
        )
        return Redis.from_pool(pool)  # the client owns the pool and closes it

    def pubsub(self) -> Redis:
        """A client for one pub/sub connection, with redis-py's own retries off.

        redis-py would otherwise reconnect and resubscribe silently inside
        ``get_message``; whatever was published meanwhile would be lost without
        anyone knowing. The hub reconnects itself, so it can catch sockets up.
        """
        url = self.url()
        if url is None:
            return self._fake()
        if self.sentinel is not None:
            return self.sentinel.pubsub()
        if self.cluster is not None:
            # Global channels only (a worker's control channel): any node hears every
            # PUBLISH. Each new client tries the next node, so a lost one is left behind.
            self._next_node = (self._next_node + 1) % len(self.cluster.nodes)
            host, port = self.cluster.nodes[self._next_node]
            url = self.cluster.node_url(host, port)
        return Redis.from_url(
            url,
            max_connections=2,
            retry=Retry(NoBackoff(), 0),
            health_check_interval=15,
            socket_keepalive=True,
        )

    def _fake(self) -> Redis:
        # Imported here: fakeredis (with Lua and numpy) costs a process about 15 MB,
        # which only the embedded mode needs.
        import fakeredis

        if self._server is None:
            self._server = fakeredis.FakeServer()
        client: Any = fakeredis.FakeAsyncRedis(server=self._server)
        return client
