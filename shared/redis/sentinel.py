"""Redis Sentinel: the master of a service, found through the sentinels and followed across failovers.

``REDIS_URL=redis+sentinel://h1:p1,h2:p2,h3:p3/<service>[/db]`` names sentinels, not a
server. Every connection a process opens asks them where the master is
(:class:`SentinelMaster`), and a process follows failovers three ways:

- **Asked on every connect.** redis-py's ``SentinelConnectionPool`` asks the sentinels
  for the master's address whenever a connection (re)connects. Sentinels learn of a
  failover one after the other, so a lagging one may still name the old master: the
  address taken is the one named with the newest ``config-epoch`` (each failover raises
  it), and a connection checks with ``ROLE`` that the server it reached is a master.
- **Told on a switch.** One task per process (:meth:`SentinelMaster.follow`) listens to
  a sentinel's ``+switch-master`` channel. On a switch it drops every connection this
  process holds to Redis: the pools' (in use too, so the batcher's line and a worker's
  control channel as well) and the hub's pub/sub link. Their next use asks the
  sentinels again. The old master is not trusted meanwhile: Sentinel kills its normal
  clients when it demotes it, but not its pub/sub ones, which would stay subscribed to a
  server no longer written to. The hub, whose link dropped, reconnects and has every
  viewer catch up from the log, as after any lost connection. A switch missed while the
  task was not listening (its sentinel restarted) is caught when it listens again: it
  compares the master named then with the last one it knew.
- **Refused writes.** A demoted master answers a write with ``READONLY``. That is taken
  as a lost connection (the command may not have run; its caller knows whether it is
  safe to repeat), never as an answer: redis-py's ``SentinelManagedConnection`` does it
  for commands and the public pipeline, the batcher's line for its own connection
  (:mod:`thoughtwire.shared.redis.pipeline`).

The fast paths work on a Sentinel master: the batcher's line takes over a pooled
``SentinelManagedConnection`` once redis-py has connected it to the master, and the hub's
raw link connects to the address the sentinels name (:meth:`SentinelMaster.master_url`).
What this does not give: writes acknowledged by the old master but not yet replicated are
lost with it (replication is asynchronous); docs/redis.md says what stops them from being
lost silently.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import weakref
from collections.abc import AsyncIterator, Iterator
from typing import Any
from urllib.parse import quote

from redis.asyncio import BlockingConnectionPool, ConnectionPool, Redis
from redis.asyncio.sentinel import (
    MasterNotFoundError,
    Sentinel,
    SentinelConnectionPool,
    SentinelManagedConnection,
    SentinelManagedSSLConnection,
)
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoPermissionError, RedisError
from redis.retry import Retry

from thoughtwire.shared import backoff  # the module: it imports this package's errors
from thoughtwire.shared.redis.topology import Topology
from thoughtwire.shared.settings import Settings

logger = logging.getLogger("thoughtwire.redis")

SWITCH_CHANNEL = "+switch-master"
SENTINEL_TIMEOUT = 1.0  # a sentinel that does not answer within this is skipped
PING_INTERVAL = 5.0  # the follower pings its sentinel when it heard nothing for this long


class _Sentinels(Sentinel):
    """redis-py's ``Sentinel``, taking the master named with the newest config epoch.

    redis-py takes the first sentinel's answer, and a sentinel that has not yet heard of
    a failover names the old master. Every sentinel is asked at once instead (each
    within ``SENTINEL_TIMEOUT``), and of the answers that see the master up, the one with
    the highest ``config-epoch`` wins.
    """

    async def discover_master(self, service_name: str) -> tuple[str, int]:
        """The master's ``(host, port)``; ``MasterNotFoundError`` when no sentinel names one."""
        answers = await asyncio.gather(
            *(sentinel.sentinel_masters() for sentinel in self.sentinels), return_exceptions=True
        )
        best: dict[str, Any] | None = None
        errors = []
        for answer in answers:
            if isinstance(answer, BaseException):
                if not isinstance(answer, (RedisError, OSError)):
                    raise answer
                errors.append(str(answer) or type(answer).__name__)  # redis-py's repr: no address
                continue
            state = answer.get(service_name) if isinstance(answer, dict) else None
            if not state or not self.check_master_state(state, service_name):
                continue
            if best is None or state["config-epoch"] > best["config-epoch"]:
                best = state
        if best is None:
            raise MasterNotFoundError(f"no sentinel names a master for {service_name!r} {errors}")
        return best["ip"], int(best["port"])


async def _check_role(connection: SentinelManagedConnection) -> None:
    """Fail (as a lost connection) unless the server ``connection`` reached is a master.

    ROLE tells. A user that may not run it (an ACL of ``+@all -@dangerous``) asks HELLO,
    whose reply names the role too (Redis 6 on), in the protocol the connection speaks.
    """
    try:
        await connection.send_command("ROLE", check_health=False)
        reply = await connection.read_response()
        role = reply[0] if reply else None
    except NoPermissionError:
        await connection.send_command("HELLO", connection.protocol or 2, check_health=False)
        hello = await connection.read_response()
        fields = (
            hello if isinstance(hello, dict) else dict(zip(hello[::2], hello[1::2], strict=True))
        )
        role = fields.get(b"role", fields.get("role"))
    if role not in (b"master", "master"):
        address = f"{connection.host}:{connection.port}"
        await connection.disconnect()
        raise RedisConnectionError(f"{address} is not the master (a failover under way)")


class _MasterConnection(SentinelManagedConnection):
    """A connection to the service's master, checked with ``ROLE`` once connected."""

    async def connect_to(self, address: tuple[str, int]) -> None:
        """Connect to ``address``, which the sentinels name as the master, and check it."""
        await super().connect_to(address)
        await _check_role(self)


class _MasterSSLConnection(SentinelManagedSSLConnection):
    """The TLS twin of :class:`_MasterConnection`."""

    async def connect_to(self, address: tuple[str, int]) -> None:
        """Connect to ``address``, which the sentinels name as the master, and check it."""
        await super().connect_to(address)
        await _check_role(self)


class _BlockingSentinelPool(SentinelConnectionPool, BlockingConnectionPool):
    """redis-py's Sentinel pool that waits (up to its ``timeout``) for a free connection.

    ``SentinelConnectionPool`` is a plain ``ConnectionPool``, which raises at once when
    all its connections are taken (under load, lost events); the blocking pool's
    ``get_connection`` and ``release`` come in through the method order.
    """


class SentinelMaster:
    """The master of one Sentinel service: the clients that reach it, and the task that
    follows its failovers (see above). One per :class:`RedisFactory`."""

    def __init__(self, topology: Topology, settings: Settings) -> None:
        assert topology.service is not None
        self.topology = topology
        self.service = topology.service
        self._settings = settings
        # Of the sentinels: they answer at once or are skipped, and never retried here.
        # Sentinels without a password of their own get the servers': a chart's sentinels
        # often share it, and one with none takes any (Redis 6 on). Not the servers' user:
        # a sentinel would not know it.
        own = topology.sentinel_password is not None or topology.sentinel_username is not None
        self._sentinel_kwargs: dict[str, Any] = {
            "username": topology.sentinel_username,
            "password": topology.sentinel_password if own else topology.password,
            "ssl": topology.tls,
            **topology.tls_options,
            "socket_timeout": SENTINEL_TIMEOUT,
            "socket_connect_timeout": SENTINEL_TIMEOUT,
            "retry": Retry(NoBackoff(), 0),
        }
        self.sentinels = _Sentinels(
            list(topology.nodes),
            sentinel_kwargs=self._sentinel_kwargs,
            username=topology.username,
            password=topology.password,
            db=topology.db,
            socket_keepalive=True,
            connection_class=_MasterSSLConnection if topology.tls else _MasterConnection,
            **topology.tls_options,
        )
        self._pools: weakref.WeakSet[ConnectionPool] = weakref.WeakSet()
        self._links: weakref.WeakSet[Any] = weakref.WeakSet()
        self._master: tuple[str, int] | None = None  # as last known to the follower
        self._following: asyncio.Task[None] | None = None
        self._followers = 0
        self.switches = 0
        self.listening_to: str | None = None  # the sentinel whose switches it hears now

    # --- clients -------------------------------------------------------------

    def commands(self) -> Redis:
        """A client for commands on the master: a blocking pool of ``redis_pool_size``."""
        client: Redis = self.sentinels.master_for(
            self.service,
            connection_pool_class=_BlockingSentinelPool,
            max_connections=self._settings.redis_pool_size,
            timeout=self._settings.redis_pool_timeout,
        )
        self._pools.add(client.connection_pool)
        return client

    def pubsub(self) -> Redis:
        """A client for one pub/sub connection to the master, redis-py's retries off."""
        client: Redis = self.sentinels.master_for(
            self.service,
            max_connections=2,
            retry=Retry(NoBackoff(), 0),
            health_check_interval=15,
        )
        self._pools.add(client.connection_pool)
        return client

    async def master_url(self) -> str:
        """A ``redis://`` URL of the master the sentinels name now, for a connection of
        our own (the hub's raw link); register that connection with :meth:`watch`."""
        host, port = await self.sentinels.discover_master(self.service)
        user = quote(self.topology.username or "", safe="")
        password = self.topology.password
        auth = f"{user}:{quote(password or '', safe='')}@" if password is not None or user else ""
        host = f"[{host}]" if ":" in host else host
        scheme = "rediss" if self.topology.tls else "redis"
        query = f"?{self.topology.tls_query}" if self.topology.tls_query else ""
        return f"{scheme}://{auth}{host}:{port}/{self.topology.db}{query}"

    def watch(self, link: Any) -> None:
        """Abort ``link`` (a connection of our own to the master) when the master switches."""
        self._links.add(link)

    # --- following failovers -------------------------------------------------

    @contextlib.asynccontextmanager
    async def following(self) -> AsyncIterator[None]:
        """Run :meth:`follow` while inside; nested uses share one task per process."""
        self._followers += 1
        if self._following is None:
            self._following = asyncio.create_task(self.follow(), name="sentinel-follower")
        try:
            yield
        finally:
            self._followers -= 1
            if self._followers == 0 and self._following is not None:
                task, self._following = self._following, None
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
                await self.sentinels.aclose()

    async def follow(self) -> None:
        """Listen for switches of the master until cancelled; reconnect with backoff.

        Each sentinel is tried in turn: any of them publishes ``+switch-master`` once it
        has the new configuration.
        """
        delays: Iterator[float] = backoff.delays()
        turn = 0
        while True:  # until cancelled
            sentinels = self.sentinels.sentinels
            sentinel = sentinels[turn % len(sentinels)]
            turn += 1
            started = time.monotonic()
            try:
                await self._listen(sentinel)  # returns only by raising
            except asyncio.CancelledError:
                raise
            except (RedisError, OSError) as exc:
                self.listening_to = None
                logger.warning("sentinel %s: %s; listening to another", _address(sentinel), exc)
            except Exception:  # a bug here must not end the following silently
                self.listening_to = None
                logger.exception("following sentinel %s failed", _address(sentinel))
            if time.monotonic() - started > 2 * PING_INTERVAL:
                delays = backoff.delays()  # it listened a while: start the backoff afresh
            await asyncio.sleep(next(delays))

    async def _listen(self, sentinel: Redis) -> None:
        """Follow ``sentinel``'s ``+switch-master`` until its connection fails (raises)."""
        kwargs = sentinel.connection_pool.connection_kwargs
        # A connection of its own, with no read timeout: it waits for switches for hours.
        client = Redis(
            host=kwargs["host"],
            port=kwargs["port"],
            **{**self._sentinel_kwargs, "socket_timeout": None},
            socket_keepalive=True,
        )
        pubsub = client.pubsub()
        try:
            await pubsub.subscribe(SWITCH_CHANNEL)
            await self._caught_up()
            self.listening_to = _address(sentinel)
            await self._read_switches(pubsub)
        finally:
            with contextlib.suppress(RedisError, OSError):
                await pubsub.aclose()
            await client.aclose()

    async def _caught_up(self) -> None:
        """Once subscribed: a switch missed while not listening shows as a new master."""
        try:
            master = await self.sentinels.discover_master(self.service)
        except MasterNotFoundError:
            return  # none up now (a failover under way): its switch is still to come
        if self._master is not None and master != self._master:
            await self.switched(f"{_show(self._master)} -> {_show(master)} (while away)")
        self._master = master

    async def _read_switches(self, pubsub: Any) -> None:
        """Handle each ``+switch-master`` of our service; ping a silent sentinel."""
        heard = time.monotonic()
        while True:  # until the connection fails
            message = await pubsub.get_message(timeout=PING_INTERVAL)
            if message is None:
                if time.monotonic() - heard > 2 * PING_INTERVAL:
                    raise RedisConnectionError("the sentinel went silent")
                await pubsub.ping()  # its pong is a message: heard again
                continue
            heard = time.monotonic()
            if message["type"] != "message":
                continue
            # "<service> <old ip> <old port> <new ip> <new port>"
            fields = message["data"].decode(errors="replace").split()
            if len(fields) == 5 and fields[0] == self.service and fields[4].isdigit():
                master = (fields[3], int(fields[4]))
                old, self._master = self._master, master
                await self.switched(f"{_show(old) if old else '?'} -> {_show(master)}")

    async def switched(self, how: str) -> None:
        """The master changed: drop every connection to the old one, in use or not."""
        self.switches += 1
        logger.warning("master of %s switched: %s; reconnecting", self.service, how)
        for link in list(self._links):
            link.abort()
        for pool in list(self._pools):
            # Bounded: closing waits for each socket to close, and the old master may be
            # gone without a word. A connection cut short is marked closed all the same.
            with contextlib.suppress(RedisError, OSError, TimeoutError):
                async with asyncio.timeout(SENTINEL_TIMEOUT):
                    await pool.disconnect(inuse_connections=True)


def _address(client: Redis) -> str:
    kwargs = client.connection_pool.connection_kwargs
    return f"{kwargs.get('host')}:{kwargs.get('port')}"


def _show(address: tuple[str, int]) -> str:
    return f"{address[0]}:{address[1]}"
