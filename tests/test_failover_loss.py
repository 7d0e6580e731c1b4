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

import asyncio
import contextlib
import json
import re
import shutil
import signal
import time
from collections.abc import AsyncIterator, Iterator
from functools import partial
from pathlib import Path

import pytest
import redis

from tests.conftest import Cluster, sim_run, start_cluster
from tests.procs import Frontend, Proc, RedisServer, seconds, wait_until
from tests.tcp_proxy import TcpProxy
from tests.wsclient import check_stream, connect, greeting, recv_json, run_events
from thoughtwire.api.hub import Hub
from thoughtwire.shared.bus import Bus, Meta
from thoughtwire.shared.keys import Keys
from thoughtwire.shared.protocol import Job, Thought
from thoughtwire.shared.redis import RedisConnectionError, RedisFactory
from thoughtwire.shared.redis.pubsub import open_link
from thoughtwire.shared.settings import Settings


class Pair:
    """A master and its replica, each a redis-server of this test's own."""

    def __init__(self, workdir: Path) -> None:
        (workdir / "master").mkdir()
        (workdir / "replica").mkdir()
        # A replica's first sync starts at once, not after the default 5 s.
        self.master = RedisServer(workdir / "master").start()
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


async def test_a_master_restarted_from_its_own_save_starts_a_new_epoch(tmp_path, prefix):
    # What a restarted master loads from disk may be behind what clients got: it is a new
    # incarnation of the writer though its data came from the same server.
    first = RedisServer(tmp_path, "--dbfilename", "saved.rdb").start()
    try:
        bus = bus_on(first, prefix)
        job, fence = await start(bus, "r1")
        await write(bus, job, fence, 1, 3)
        epoch = (await bus.meta("s")).epoch
        with first.client() as client:
            client.execute_command("SAVE")
        await bus.redis.aclose()
    finally:
        first.stop()
    again = RedisServer(tmp_path, "--dbfilename", "saved.rdb").start()
    try:
        bus = bus_on(again, prefix)
        assert await bus.meta("s") == Meta(epoch, 3)  # the save was loaded
        assert await write(bus, Job(run="r2", session="s", prompt="p"), "f2", 1, 2) == 2
        assert (await bus.meta("s")).epoch != epoch
        await bus.redis.aclose()
    finally:
        again.stop()


async def test_off_a_cluster_a_meta_of_another_master_is_never_taken_for_a_move(pair, buses):
    # One server or Sentinel: no slot ever moves, so a meta another master wrote, however
    # recently, means a failover (perhaps two in a row): a new epoch. Adopting it is for
    # a Redis Cluster's reshard only (tests/test_redis_cluster.py, the slot moved mid-run).
    old, _new = buses
    job, fence = await start(old, "r1")
    await write(old, job, fence, 1, 2)
    meta_key = old.keys.session_meta("s")
    before = await old.meta("s")
    with pair.master.client() as client:
        wait_until(lambda: client.info("server")["uptime_in_seconds"] >= 2, 10, "uptime")
        now = int(client.time()[0])
    await old.redis.hset(meta_key, mapping={"replid": "ab" * 20, "replat": now - 1})
    assert await write(old, job, fence, 3, 1) == 1
    assert (await old.meta("s")).epoch != before.epoch


async def test_a_moved_meta_without_a_write_time_starts_a_new_epoch(pair, buses):
    # A meta written before times were kept: any new id is taken for a new incarnation.
    old, _new = buses
    job, fence = await start(old, "r1")
    await write(old, job, fence, 1, 2)
    meta_key = old.keys.session_meta("s")
    before = await old.meta("s")
    await old.redis.hset(meta_key, "replid", "ab" * 20)
    await old.redis.hdel(meta_key, "replat")
    assert await write(old, job, fence, 3, 1) == 1
    assert (await old.meta("s")).epoch != before.epoch


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


# --- through real frontends and workers ---------------------------------------------

TOKENS = 40


@pytest.fixture(params=["fast-paths", "public-paths"])
def failover(
    pair: Pair, logdir: Path, request: pytest.FixtureRequest
) -> Iterator[tuple[Pair, TcpProxy, Cluster]]:
    """One frontend and one worker reaching the pair's master through a proxy."""
    proxy = TcpProxy(pair.master.port).start()
    try:
        cluster = start_cluster(
            pair.master,
            logdir,
            frontends=1,
            REDIS_URL=proxy.url,
            THOUGHTWIRE_LEASE_SECONDS="1",
            THOUGHTWIRE_SIM_ANSWER_TOKENS=str(TOKENS),
            THOUGHTWIRE_SIM_TOKENS_PER_SECOND="40",
            THOUGHTWIRE_FAST_PATHS="1" if request.param == "fast-paths" else "0",
        )
    except BaseException:
        proxy.stop()
        raise
    yield pair, proxy, cluster
    cluster.stop()
    proxy.stop()


def fail_over(pair: Pair, proxy: TcpProxy, cluster: Cluster) -> None:
    """The promoted replica takes over: every process reconnects to it; the old master dies."""
    proxy.switch(pair.replica.port)
    pair.master.proc.kill()
    wait_until(cluster.frontends[0].ready, 30, "the frontend to be ready on the new master")


async def messages_until(ws, done_of: set[str], timeout: float = 30) -> list[dict]:
    """Every frame with a ``type`` until a terminal event of a run not in ``done_of``."""
    messages = []
    async with asyncio.timeout(seconds(timeout)):
        while True:
            message = await recv_json(ws)
            messages.append(message)
            terminal = message.get("type") in ("done", "error", "cancelled") and "seq" in message
            if terminal and message["run"] not in done_of:
                return messages


def positions_hold_one_event(*streams: list[dict]) -> None:
    """No ``(epoch, seq)`` names two different events, across every client's stream."""
    seen: dict[tuple[str, int], dict] = {}
    for message in (m for stream in streams for m in stream if "seq" in m):
        first = seen.setdefault((message["epoch"], message["seq"]), message)
        assert first == message, f"two events at one position: {first} and {message}"


async def test_a_new_run_after_a_failover_never_reuses_a_seq_clients_hold(failover):
    pair, proxy, cluster = failover
    url = cluster.frontends[0].ws
    async with connect(url + "/ws/agent-thoughts") as ws:
        session = await greeting(ws)
        await ws.send("first")
        first = await run_events(ws)
        assert await asyncio.to_thread(pair.caught_up)
        pair.promote()
        # The second run reaches the client through the old master alone.
        await ws.send("second")
        second = await run_events(ws)
        epoch, held = second[-1]["epoch"], second[-1]["seq"]
        assert {e["epoch"] for e in first + second} == {epoch}
        assert held == 2 * len(first)
        await asyncio.to_thread(fail_over, pair, proxy, cluster)
        # A run started after the failover, by a writer that never saw seqs past the
        # replica's: it must not number its events as the lost ones.
        await ws.send("third")
        after = await messages_until(ws, {first[0]["run"], second[0]["run"]})
    third = [m for m in after if m.get("run") == after[-1]["run"] and "seq" in m]
    assert third[-1]["type"] == "done"
    assert all(e["epoch"] != epoch for e in third)
    assert check_stream(first + second + after) >= 1
    # A client that held the second run and comes back later is told, not fed the
    # third run's tail as if it followed what it holds.
    async with connect(
        f"{url}/ws/agent-thoughts?session={session}&after={held}&epoch={epoch}"
    ) as ws:
        await greeting(ws)
        gap = await recv_json(ws)
        assert gap["type"] == "gap" and gap["reason"] == "epoch", gap
        assert gap["epoch"] != epoch
        resumed = await messages_until(ws, set(), timeout=10)
    positions_hold_one_event(first, second, after, resumed)


async def test_the_run_writing_through_a_failover_goes_on_in_a_new_epoch(failover):
    pair, proxy, cluster = failover
    async with connect(cluster.frontends[0].ws + "/ws/agent-thoughts") as ws:
        await greeting(ws)
        await ws.send("through a failover")
        before = await first_events(ws, 12)
        assert await asyncio.to_thread(pair.caught_up)
        pair.promote()
        lost = await first_events(ws, 8)  # on the old master only
        await asyncio.to_thread(fail_over, pair, proxy, cluster)
        after = await messages_until(ws, set())
    epoch = before[0]["epoch"]
    assert check_stream(before + lost + after) >= 1
    assert after[-1]["type"] == "done" and after[-1]["epoch"] != epoch
    positions_hold_one_event(before, lost, after)


async def first_events(ws, count: int) -> list[dict]:
    events: list[dict] = []
    while len(events) < count:
        message = await recv_json(ws)
        if "seq" in message:
            events.append(message)
    return events


# --- a pub/sub connection that stays up and delivers nothing ---------------------------

PROBE_INTERVAL = 1.0
PROBED_TOKENS = 80


@pytest.mark.parametrize("fast_paths", ["1", "0"])
async def test_a_deaf_pubsub_link_is_noticed_within_its_probe_interval_and_viewers_catch_up(
    redis_server, logdir, fast_paths
):
    proxy = TcpProxy(redis_server.port).start()
    cluster = start_cluster(
        redis_server,
        logdir,
        frontends=0,
        THOUGHTWIRE_SIM_ANSWER_TOKENS=str(PROBED_TOKENS),
        THOUGHTWIRE_SIM_TOKENS_PER_SECOND="40",
    )
    try:
        # Only the frontend goes through the proxy: its pub/sub link is the one silenced.
        frontend = cluster.add_frontend(
            REDIS_URL=proxy.url,
            THOUGHTWIRE_PUBSUB_PROBE_INTERVAL=str(PROBE_INTERVAL),
            THOUGHTWIRE_FAST_PATHS=fast_paths,  # the raw link, or redis-py's PubSub
        )
        await deaf_link_case(proxy, frontend)
    finally:
        cluster.stop()
        proxy.stop()


async def deaf_link_case(proxy: TcpProxy, frontend: Frontend) -> None:
    async with contextlib.AsyncExitStack() as stack:
        first = await stack.enter_async_context(connect(frontend.ws + "/ws/agent-thoughts"))
        session = await greeting(first)
        viewers = [first]
        for _ in range(2):
            ws = await stack.enter_async_context(
                connect(f"{frontend.ws}/ws/agent-thoughts?session={session}&after=0")
            )
            await greeting(ws)
            viewers.append(ws)
        await first.send("through a deaf link")
        before = [await first_events(ws, 12) for ws in viewers]
        assert proxy.silence_subscribers() == 1  # the hub's link: it stays open, deaf
        silenced = time.monotonic()
        noticed = await asyncio.to_thread(
            wait_until, lambda: "connection deaf" in frontend.proc.output(), 10, "the probe"
        )
        took = time.monotonic() - silenced
        rest = await asyncio.gather(*(run_events(ws, timeout=20) for ws in viewers))
    assert noticed
    # A probe goes out at most an interval after the silence and is given one interval.
    assert took < 2 * PROBE_INTERVAL + seconds(1.5), took
    for events in (b + r for b, r in zip(before, rest, strict=True)):
        assert [e["type"] for e in events] == sim_run(PROBED_TOKENS)
        assert [e["seq"] for e in events] == list(range(1, len(events) + 1))


# --- waiting for replicas before a job is acknowledged ---------------------------------

WAIT_MS = 1500


class Monitor:
    """``redis-cli monitor`` on a server: every command it runs, with its time and client."""

    def __init__(self, server: RedisServer, log: Path) -> None:
        binary = shutil.which("redis-cli")
        assert binary is not None
        self.proc = Proc("monitor", [binary, "-p", str(server.port), "monitor"], {}, log)

    def __enter__(self) -> Monitor:
        self.proc.start()
        wait_until(lambda: "OK" in self.proc.output(), 10, "MONITOR to start")
        return self

    def __exit__(self, *exc: object) -> None:
        self.proc.stop()

    def lines(self) -> list[tuple[float, str, str]]:
        """``(time, client, command)`` of each command seen."""
        seen = []
        for line in self.proc.output().splitlines():
            match = re.match(r"([\d.]+) \[\d+ ([^\]]+)\] (.*)", line)
            if match:
                seen.append((float(match[1]), match[2], match[3]))
        return seen


async def ended_and_acked(
    pair: Pair, logdir: Path, prefix: str
) -> tuple[list[tuple[float, str, str]], str]:
    """Run one job on a worker that waits for a replica: what the master saw of its end,
    and what the worker logged."""
    cluster = start_cluster(
        pair.master,
        logdir,
        frontends=0,
        THOUGHTWIRE_REDIS_WAIT_REPLICAS="1",
        THOUGHTWIRE_REDIS_WAIT_TIMEOUT_MS=str(WAIT_MS),
    )
    bus = bus_on(pair.master, cluster.prefix)
    try:
        with Monitor(pair.master, logdir / f"monitor-{prefix}.log") as monitor:
            job = Job(run=prefix, session=prefix, prompt="wait for me")
            await bus.submit(job)

            async def acked() -> bool:
                return await bus.redis.xlen(bus.keys.jobs) == 0

            async with asyncio.timeout(seconds(20)):
                while not await acked():
                    await asyncio.sleep(0.05)
                # redis-cli writes what it saw to its file a little later than Redis ran it.
                while not any(s[2].startswith('"XACK"') for s in monitor.lines()):
                    await asyncio.sleep(0.05)
            seen = monitor.lines()
    finally:
        await bus.redis.aclose()
        cluster.stop()
    return seen, cluster.workers[0].output()


def end_wait_ack(seen: list[tuple[float, str, str]]) -> tuple[tuple, tuple, tuple]:
    """The script call that ended the run, the WAIT after it, and the job's XACK."""
    end = next(s for s in seen if s[2].upper().startswith('"EVALSHA"') and ' "done" ' in s[2])
    wait = next(s for s in seen if s[2].startswith('"WAIT"') and s[0] >= end[0])
    ack = next(s for s in seen if s[2].startswith('"XACK"'))
    return end, wait, ack


async def test_the_end_of_a_run_waits_for_a_replica_before_its_job_is_acknowledged(
    pair, logdir, prefix
):
    seen, _ = await ended_and_acked(pair, logdir, prefix)
    end, wait, ack = end_wait_ack(seen)
    assert wait[2] == f'"WAIT" "1" "{WAIT_MS}"'
    assert wait[1] == end[1]  # on the connection that wrote the end
    assert end[0] <= wait[0] <= ack[0]
    assert ack[0] - wait[0] < WAIT_MS / 1000  # the replica answered before the timeout


async def test_with_its_replica_stopped_the_end_waits_the_timeout_then_the_job_is_acked(
    pair, logdir, prefix
):
    pair.replica.proc.signal(signal.SIGSTOP)  # connected, and silent
    try:
        seen, logged = await ended_and_acked(pair, logdir, prefix)
    finally:
        pair.replica.proc.signal(signal.SIGCONT)
    end, wait, ack = end_wait_ack(seen)
    assert wait[1] == end[1]
    # The job is acknowledged once the timeout passed, and the shortfall is logged.
    assert ack[0] - wait[0] >= WAIT_MS / 1000
    assert "a run's end reached 0 of 1 replicas" in logged


class Resyncs:
    """A viewer that counts how often the hub asks it to catch up."""

    def __init__(self) -> None:
        self.resyncs = 0

    def deliver(self, frame, position, wire=None) -> None: ...  # type: ignore[no-untyped-def]

    def deliver_run(self, run) -> None: ...  # type: ignore[no-untyped-def]

    def resync(self) -> None:
        self.resyncs += 1

    def close(self, code: int, reason: str) -> None: ...


@pytest.mark.parametrize("probes", ["come back", "are lost", "cannot be published"])
async def test_only_a_probe_published_and_not_heard_drops_the_link(redis_server, prefix, probes):
    server = redis.Redis(port=redis_server.port)

    async def publish(channel: str, payload: bytes) -> None:
        if probes == "cannot be published":
            raise RedisConnectionError("Redis is away")
        target = channel if probes == "come back" else f"{prefix}:elsewhere"
        await asyncio.to_thread(server.publish, target, payload)

    factory = RedisFactory(Settings(redis_url=redis_server.url))
    hub = Hub(partial(open_link, factory), f"{prefix}:node", publish=publish, probe_interval=0.5)
    viewer = Resyncs()
    await hub.start()
    try:
        await hub.join(f"{prefix}:session", viewer)
        if probes == "are lost":
            async with asyncio.timeout(seconds(5)):
                while not viewer.resyncs:  # bounded by the timeout
                    await asyncio.sleep(0.02)
            assert hub.deaf_links >= 1 and hub.reconnects >= 1
        else:
            await asyncio.sleep(3)  # nothing must happen: watched for six intervals
            assert hub.deaf_links == 0 and hub.reconnects == 0 and viewer.resyncs == 0
    finally:
        await hub.close()
        server.close()
