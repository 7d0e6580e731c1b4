"""No silent loss on a failover: a master and a replica of our own, real processes.

Replication is asynchronous: a replica promoted to master may lack events that clients
already got from the old master. Whoever writes next (the run's own writer, another
attempt, a new run of the session, the frontend ending a lost run) must not hand out
those seqs again in the same epoch: clients would drop the new events as duplicates.

The replica is made to fall behind by promoting it (``REPLICAOF NO ONE``) while the
old master still takes writes, which then never reach it; the processes under test
follow the failover through a proxy (tests/tcp_proxy.py) that is switched to the new
master.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import redis

from tests.procs import RedisServer, wait_until
from tests.tcp_proxy import TcpProxy
from thoughtwire.shared.bus import Bus, Meta
from thoughtwire.shared.keys import Keys
from thoughtwire.shared.protocol import Job, Thought
from thoughtwire.shared.redis import RedisFactory
from thoughtwire.shared.settings import Settings


class Pair:
    """A master and its replica, each a redis-server of this test's own."""

    def __init__(self, workdir: Path) -> None:
        (workdir / "master").mkdir()
        (workdir / "replica").mkdir()
        # A replica's first sync starts at once, not after the default 5 s.
        self.master = RedisServer(workdir / "master", "--repl-diskless-sync-delay", "0").start()
        try:
            self.replica = RedisServer(
                workdir / "replica", "--replicaof", "127.0.0.1", str(self.master.port)
            ).start()
        except BaseException:
            self.master.stop()
            raise
        wait_until(self.in_sync, 10, "the replica to sync")

    def in_sync(self) -> bool:
        with self.master.client() as master:
            info = master.info("replication")
        return bool(info.get("connected_slaves")) and "online" in str(info.get("slave0"))

    def caught_up(self) -> bool:
        """Every write the master took so far is on the replica."""
        with self.master.client() as master:
            return int(master.execute_command("WAIT", 1, 5000)) >= 1

    def promote(self) -> None:
        """The replica becomes a master with what it has; the old one goes on alone."""
        with self.replica.client() as replica:
            replica.execute_command("REPLICAOF", "NO", "ONE")

    def stop(self) -> None:
        self.replica.stop()
        self.master.stop()


@pytest.fixture
def pair(tmp_path: Path) -> Iterator[Pair]:
    servers = Pair(tmp_path)
    yield servers
    servers.stop()


def bus_on(server: RedisServer, prefix: str) -> Bus:
    redis = RedisFactory(Settings(redis_url=server.url, redis_pool_size=4)).commands()
    return Bus(redis, Keys(prefix), log_maxlen=1000, log_ttl=600)


@pytest.fixture
async def buses(pair: Pair, prefix: str) -> AsyncIterator[tuple[Bus, Bus]]:
    old, new = bus_on(pair.master, prefix), bus_on(pair.replica, prefix)
    yield old, new
    await old.redis.aclose()
    await new.redis.aclose()


async def write(bus: Bus, job: Job, fence: str, first: int, count: int, min_seq: int = 0) -> int:
    heads = [bus.encode(job, Thought("answer", f"{job.run}-{first + i}")) for i in range(count)]
    return int(await bus.submit_encoded(job, heads, fence=fence, first=first, min_seq=min_seq))


async def start(bus: Bus, run: str) -> tuple[Job, str]:
    job = Job(run=run, session="s", prompt="p")
    await bus.submit(job)
    attempt = await bus.start(job, "w", 60_000, 3)
    assert attempt.verdict == "run", attempt
    return job, attempt.fence


async def test_a_new_writer_after_a_failover_starts_a_new_epoch(pair, buses):
    old, new = buses
    job, fence = await start(old, "r1")
    assert await write(old, job, fence, 1, 4) == 4
    assert pair.caught_up()
    pair.promote()
    # Events 5..10 reach clients through the old master, never the new one.
    assert await write(old, job, fence, 5, 6) == 10
    epoch = (await old.meta("s")).epoch
    assert await new.meta("s") == Meta(epoch, 4)
    # Another writer (here an attempt whose run state the new master lacks) does not
    # know of seq 10: its events must not become seqs 5, 6, ... of the old epoch.
    other = Job(run="r2", session="s", prompt="p")
    assert await write(new, other, "f2", 1, 3) == 3
    meta = await new.meta("s")
    assert meta.epoch != epoch and meta.last_seq == 3
    log = [json.loads(e) for e in await new.history("s")]
    assert [(e["seq"], e["epoch"], e["content"]) for e in log] == [
        (1, meta.epoch, "r2-1"),
        (2, meta.epoch, "r2-2"),
        (3, meta.epoch, "r2-3"),
    ]
    # Within one incarnation the epoch holds.
    assert await write(new, other, "f2", 4, 1) == 4
    assert (await new.meta("s")).epoch == meta.epoch


async def test_ending_a_lost_run_after_a_failover_starts_a_new_epoch(pair, buses):
    old, new = buses
    job, fence = await start(old, "r1")
    await write(old, job, fence, 1, 2)
    assert pair.caught_up()
    pair.promote()
    await write(old, job, fence, 3, 5)
    epoch = (await old.meta("s")).epoch
    lost = Thought("error", "lost", {"code": "unavailable"})
    assert await new.end_lost("s", "gone", lost, "failed")
    meta = await new.meta("s")
    assert meta.epoch != epoch and meta.last_seq == 1


async def test_the_run_own_writer_after_a_failover_starts_a_new_epoch(pair, buses):
    old, new = buses
    job, fence = await start(old, "r1")
    await write(old, job, fence, 1, 3)
    assert pair.caught_up()
    pair.promote()
    last = await write(old, job, fence, 4, 3)
    epoch = (await old.meta("s")).epoch
    assert await write(new, job, fence, 7, 2, min_seq=last) == 2
    assert (await new.meta("s")).epoch != epoch


async def test_a_meta_written_before_incarnations_were_kept_is_adopted(pair, buses):
    old, _new = buses
    job, fence = await start(old, "r1")
    await write(old, job, fence, 1, 2)
    meta_key = old.keys.session_meta("s")
    before = await old.meta("s")
    assert await old.redis.hget(meta_key, "replid")
    await old.redis.hdel(meta_key, "replid")
    assert await write(old, job, fence, 3, 1) == 3
    assert (await old.meta("s")).epoch == before.epoch
    assert await old.redis.hget(meta_key, "replid")


def test_the_proxy_forwards_switches_and_silences(pair):
    proxy = TcpProxy(pair.master.port).start()
    try:
        with redis.Redis.from_url(proxy.url, socket_timeout=2) as client:
            assert client.info("server")["tcp_port"] == pair.master.port
            proxy.switch(pair.replica.port)
            wait_until(
                lambda: client.info("server")["tcp_port"] == pair.replica.port, 5, "the switch"
            )
            listener = client.pubsub()
            listener.subscribe("c")
            assert listener.get_message(timeout=2)["type"] == "subscribe"
            assert proxy.silence_subscribers() == 1
            with pair.replica.client() as direct:
                assert direct.publish("c", "hello") == 1
            assert listener.get_message(timeout=0.5) is None
            assert client.ping()  # a command connection still forwards
            listener.close()
    finally:
        proxy.stop()
