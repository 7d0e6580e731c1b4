"""The one place that decides how to reach Redis: pools sized explicitly, and the embedded Redis.

Every Redis connection a process opens comes from a :class:`RedisFactory`. Today it
reaches one server (``REDIS_URL``) or the in-process one of the embedded mode. A
topology with more than one server (Redis Cluster, Sentinel) plugs in at
:meth:`RedisFactory.url`, which answers "where is the Redis that serves this key's
slot", and at the clients built from it; nothing outside this folder knows which.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from redis.asyncio import BlockingConnectionPool, Redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from thoughtwire.shared.redis import fast
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

    def __post_init__(self) -> None:
        # The batcher is handed a client, not the settings: the switch goes with the factory.
        fast.set_switch(self.settings.fast_paths)

    @property
    def embedded(self) -> bool:
        """No server to reach: every client talks to the in-process Redis."""
        return self.settings.redis_url is None

    def url(self, key: str | None = None) -> str | None:
        """The URL of the Redis that serves ``key``'s slot (any key: None); None when embedded.

        One server serves every slot today. A Cluster or Sentinel topology answers
        here, per slot or per failover, and only here.
        """
        return self.settings.redis_url

    def commands(self) -> Redis:
        """The client for commands: a blocking pool of ``redis_pool_size`` connections.

        A blocking pool waits up to ``redis_pool_timeout`` for a free connection;
        the default pool raises ``MaxConnectionsError`` at once, which under load
        turns into lost events.
        """
        url = self.url()
        if url is None:
            return self._fake()
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
