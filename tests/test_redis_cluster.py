"""Thoughtwire on a real Redis Cluster: three masters, three replicas, sharded pub/sub."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, cast

import pytest
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisClusterException

from tests.conftest import Cluster, sim_run, start_cluster
from tests.procs import RedisServer, free_port, seconds, wait_until
from tests.redis_cluster import RedisCluster
from tests.wsclient import check_stream, connect, greeting, run_events
from thoughtwire.api.hub import Hub, Run
from thoughtwire.shared.bus import Bus, JobsQueue, KeyReused
from thoughtwire.shared.keys import Keys
from thoughtwire.shared.protocol import Job, Thought, decode_event
from thoughtwire.shared.redis import RedisFactory
from thoughtwire.shared.redis.cluster import PROBE_TAGS
from thoughtwire.shared.redis.pipeline import Batcher
from thoughtwire.shared.redis.pubsub import ShardedLink, open_link
from thoughtwire.shared.settings import Settings


def test_the_fixture_serves_every_slot_from_three_masters(redis_cluster: RedisCluster) -> None:
    masters = redis_cluster.masters()
    assert len(masters) == 3
    shards = redis_cluster.shards()
    assert all(len(s.replicas) == 1 for s in shards.values())
    port = redis_cluster.master_of("tw:s:{abc}:log")
    assert redis_cluster.slot_of("tw:s:{abc}:log") == redis_cluster.slot_of("abc")
    assert port in masters


def test_the_fixture_moves_a_slot_and_promotes_a_replica(redis_cluster: RedisCluster) -> None:
    key = "fixture:{moving}"
    source = redis_cluster.master_of(key)
    redis_cluster.node(source).call("SET", key, "v")
    target = next(p for p in redis_cluster.masters() if p != source)
    redis_cluster.move_slot(redis_cluster.slot_of(key), target)
    assert redis_cluster.master_of(key) == target
    assert redis_cluster.node(target).call("GET", key) == "v"
    promoted = redis_cluster.kill_master(target)
    assert promoted != target and redis_cluster.master_of(key) == promoted
    redis_cluster.restart(target)
    assert target not in redis_cluster.masters()


async def test_a_session_is_appended_and_published_on_its_master_through_sharded_pub_sub(
    redis_cluster: RedisCluster, prefix: str
) -> None:
    factory = RedisFactory(Settings(redis_url=redis_cluster.url, redis_pool_size=8))
    bus = Bus(factory.commands(), Keys(prefix), log_maxlen=100, log_ttl=60)
    got: list[tuple[bytes, bytes, bytes | None]] = []
    confirmed = asyncio.Event()

    def on_message(kind: bytes, channel: bytes, data: bytes | None) -> None:
        got.append((kind, channel, data))
        if kind == b"subscribe" and channel == bus.session_channel("s1").encode():
            confirmed.set()

    link = await open_link(factory, on_message)
    try:
        await link.subscribe(bus.runs_ended.encode(), bus.session_channel("s1").encode())
        async with asyncio.timeout(seconds(5)):
            await confirmed.wait()
        job = Job(run="r1", session="s1", prompt="p")
        await bus.submit(job)
        attempt = await bus.start(job, "w1", 10_000, 3)
        heads = [bus.encode(job, Thought("answer", f"t{i}")) for i in range(5)]
        assert await bus.submit_encoded(job, heads, fence=attempt.fence, first=1) == 5
        done = [bus.encode(job, Thought("done", "ok"))]
        await bus.submit_encoded(job, done, fence=attempt.fence, first=6, status="done")
        channel = bus.session_channel("s1")
        assert await bus.subscribers([channel]) == {channel: 1}
        async with asyncio.timeout(seconds(5)):
            while not any(k == b"message" and c == bus.runs_ended.encode() for k, c, _ in got):
                await asyncio.sleep(0.01)
        events = [
            decode_event(d or b"") for k, c, d in got if c == channel.encode() and k == b"message"
        ]
        assert [e.seq for e in events] == [1, 2, 3, 4, 5, 6]
        assert [decode_event(e).seq for e in await bus.history("s1")] == [1, 2, 3, 4, 5, 6]
        master = redis_cluster.node(redis_cluster.master_of(channel))
        assert master.call("PUBSUB", "SHARDNUMSUB", channel) == [channel, 1]
        # the personal channel of a client is sharded too: SPUBLISH counts the cluster's
        assert await bus.publish(bus.client_channel("nobody"), "x") == 0
        await bus.dead_letter("0-1", job, "test")  # two streams, two slots
        await bus.requeue("0-1", job)
    finally:
        await link.close()
        await bus.redis.aclose()


@pytest.fixture
async def cluster_bus(redis_cluster: RedisCluster, prefix: str) -> AsyncIterator[Bus]:
    """A bus on the cluster (eight connections per node), closed after the test."""
    factory = RedisFactory(Settings(redis_url=redis_cluster.url, redis_pool_size=8))
    bus = Bus(factory.commands(), Keys(prefix), log_maxlen=100, log_ttl=60)
    yield bus
    await bus.redis.aclose()


async def test_an_idempotency_key_and_its_prompts_digest_are_taken_in_one_slot(cluster_bus):
    """One script takes a key and writes its prompt's digest beside it, in the key's slot:
    on a cluster too, a resend names its run and another prompt under the key is refused."""
    bus = cluster_bus
    for n in range(20):  # keys all over the slots
        run, session = f"r{n}", f"s{n}"
        job = Job(run=run, session=session, prompt="p")
        assert await bus.submit(job, f"k{n}", user="u") == (run, session, True)
        again = Job(run=f"{run}-again", session=session, prompt="p")
        assert await bus.submit(again, f"k{n}", user="u") == (run, session, False)
        with pytest.raises(KeyReused):
            await bus.submit(
                Job(run=f"{run}-other", session=session, prompt="q"), f"k{n}", user="u"
            )


async def _started(bus: Bus, sessions: list[str]) -> list[tuple[Job, Any]]:
    """A run of each session, started."""
    started = []
    for session in sessions:
        job = Job(run=f"r-{session}", session=session, prompt="p")
        await bus.submit(job)
        started.append((job, await bus.start(job, "w1", 10_000, 3)))
    return started


async def _append(bus: Bus, started: list[tuple[Job, Any]]) -> list[Any]:
    """One three-event call of each run, all queued in one tick."""
    calls = [
        bus.submit_encoded(
            job,
            [bus.encode(job, Thought("answer", f"{job.session}-{i}")) for i in range(3)],
            fence=attempt.fence,
            first=1,
        )
        for job, attempt in started
    ]
    return list(await asyncio.gather(*calls))


def _script_runs(redis_cluster: RedisCluster) -> dict[int, int]:
    """EVALSHA calls each master ran since its stats were reset, by port; then reset.
    (A first call of a script the master has not loaded yet is refused: not counted.)"""
    runs = {}
    for port in redis_cluster.masters():
        node = redis_cluster.node(port)
        stats = cast(dict[str, Any], node.call("INFO", "commandstats"))
        errors = cast(dict[str, Any], node.call("INFO", "errorstats"))
        unknown = int(errors.get("errorstat_NOSCRIPT", {}).get("count", 0))
        runs[port] = int(stats.get("cmdstat_evalsha", {}).get("calls", 0)) - unknown
        node.call("CONFIG", "RESETSTAT")
    return runs


async def _check_logs(bus: Bus, sessions: list[str]) -> None:
    for session in sessions:
        contents = [json.loads(e)["content"] for e in await bus.history(session)]
        assert contents == [f"{session}-{i}" for i in range(3)]


async def test_appends_of_many_sessions_share_a_script_run_per_master(
    redis_cluster: RedisCluster, cluster_bus: Bus
) -> None:
    """Calls of sessions on one master, queued in one tick, go as one script run there,
    though their keys are of many slots; every session gets its own events."""
    bus = cluster_bus
    sessions = [f"b{n}" for n in range(30)]
    started = await _started(bus, sessions)
    _script_runs(redis_cluster)
    assert await _append(bus, started) == [3] * 30
    assert _script_runs(redis_cluster) == dict.fromkeys(redis_cluster.masters(), 1)
    await _check_logs(bus, sessions)


async def test_a_bundle_sent_to_a_master_that_does_not_hold_its_slots_runs_call_by_call(
    redis_cluster: RedisCluster, cluster_bus: Bus, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bundle's calls whose slots are elsewhere (a slot moved after they were grouped):
    each fails on the bundle's master at its first read, and goes again alone, on its
    own slot's master; the others run in the bundle."""
    bus = cluster_bus
    sessions = [f"m{n}" for n in range(12)]
    started = await _started(bus, sessions)
    _script_runs(redis_cluster)
    monkeypatch.setattr(Batcher, "_master_of", lambda self, key: "one")  # one bundle
    assert await _append(bus, started) == [3] * 12
    owner = {s: redis_cluster.master_of(bus.session_channel(s)) for s in sessions}
    first = owner[sessions[0]]
    elsewhere = [s for s in sessions if owner[s] != first]
    assert elsewhere  # the bundle held slots of other masters
    runs = _script_runs(redis_cluster)
    assert runs[first] == 1, runs  # the bundle
    assert sum(runs.values()) == 1 + len(elsewhere)  # and each call elsewhere, alone
    await _check_logs(bus, sessions)


async def test_a_bundles_call_sent_again_alone_to_a_master_that_forgot_the_script_runs(
    redis_cluster: RedisCluster, cluster_bus: Bus, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bundle's call sent again alone on its own slot's master, which has not the
    bundle script (a promoted replica, a restarted or new master): the script is loaded
    there and the call runs, instead of its caller getting NOSCRIPT."""
    bus = cluster_bus
    sessions = [f"n{n}" for n in range(12)]
    started = await _started(bus, sessions)
    owner = {s: redis_cluster.master_of(bus.session_channel(s)) for s in sessions}
    first = owner[sessions[0]]
    for port in redis_cluster.masters():
        # the bundle's master knows the script; the others have forgotten it
        redis_cluster.node(port).call("SCRIPT", "FLUSH")
    redis_cluster.node(first).call("SCRIPT", "LOAD", bus._append_many.script)
    monkeypatch.setattr(Batcher, "_master_of", lambda self, key: "one")  # one bundle
    assert await _append(bus, started) == [3] * 12
    assert any(owner[s] != first for s in sessions)
    await _check_logs(bus, sessions)


def _half_moved(redis_cluster: RedisCluster, keys: Keys, session: str) -> tuple[int, int]:
    """Start moving ``session``'s slot to another master, and move its meta alone there
    (its log and run not yet): the slot and the master it goes to."""
    slot = redis_cluster.slot_of(keys.session_meta(session))
    source = redis_cluster.master_of(keys.session_meta(session))
    target = next(p for p in redis_cluster.masters() if p != source)
    src, dst = redis_cluster.node(source), redis_cluster.node(target)
    dst.call("CLUSTER", "SETSLOT", slot, "IMPORTING", str(src.call("CLUSTER", "MYID")))
    src.call("CLUSTER", "SETSLOT", slot, "MIGRATING", str(dst.call("CLUSTER", "MYID")))
    src.call("MIGRATE", "127.0.0.1", target, "", 0, 5000, "KEYS", keys.session_meta(session))
    return slot, target


def _three(bus: Bus, job: Job, fence: str, first: int, status: str = "") -> asyncio.Future[Any]:
    """Events ``first`` to ``first + 2`` of ``job``'s run, appended after ``first - 1``."""
    heads = [
        bus.encode(job, Thought("answer", f"{job.session}-{n}")) for n in range(first, first + 3)
    ]
    return bus.submit_encoded(
        job, heads, fence=fence, first=first, min_seq=first - 1, status=status
    )


async def test_a_call_of_a_session_whose_slot_is_being_moved_fails_as_redis_away(
    redis_cluster: RedisCluster, cluster_bus: Bus
) -> None:
    """While a session's keys are half moved, its calls are answered TRYAGAIN until the
    move ends: past redis-py's redirections that is a connection error, which a writer
    retries, not an error it takes as final (which failed the run)."""
    bus, keys = cluster_bus, cluster_bus.keys
    [(job, attempt)] = await _started(bus, ["away"])
    assert await _three(bus, job, attempt.fence, 1) == 3
    slot, target = _half_moved(redis_cluster, keys, "away")
    with pytest.raises(RedisConnectionError):
        await _three(bus, job, attempt.fence, 4, status="done")
    await asyncio.to_thread(redis_cluster.move_slot, slot, target)  # the rest moves
    assert await _three(bus, job, attempt.fence, 4, status="done") == 6
    contents = [json.loads(e)["content"] for e in await bus.history("away")]
    assert contents == [f"away-{n}" for n in range(1, 7)]


async def test_a_bundle_whose_session_is_half_moved_writes_nothing_on_the_slots_new_master(
    redis_cluster: RedisCluster, cluster_bus: Bus
) -> None:
    """A slot being moved, its session's meta already on the new master but its log and
    run not yet: a bundle of that session's call, sent to the old master by the slot map,
    must not run on the new one (redirected with ASK) against keys that are not there
    yet, which the rest of the move then overwrites (or refuses to move): the call waits
    for the move, as a call of its own does, and the log keeps every event once."""
    bus, keys = cluster_bus, cluster_bus.keys
    [(job, attempt)] = await _started(bus, ["half"])
    assert await _three(bus, job, attempt.fence, 1) == 3
    slot, target = _half_moved(redis_cluster, keys, "half")
    second = _three(bus, job, attempt.fence, 4)
    await asyncio.wait([second], timeout=seconds(2))  # it ran, or waits for the move
    await asyncio.to_thread(redis_cluster.move_slot, slot, target)  # the rest moves
    try:
        assert await second == 6
    except RedisConnectionError:  # the move was under way: a writer tries again
        assert await _three(bus, job, attempt.fence, 4) == 6
    contents = [json.loads(e)["content"] for e in await bus.history("half")]
    assert contents == [f"half-{n}" for n in range(1, 7)]


TOKENS = 60  # a run's answer: two seconds at 30 tokens a second


@dataclass
class ClusterUrl:
    """What start_cluster reads of a Redis: its URL."""

    url: str


@pytest.fixture(scope="module")
def deployment(redis_cluster: RedisCluster, logdir: Path) -> Iterator[Cluster]:
    """Two frontends and two workers, real processes, on the Redis Cluster."""
    c = start_cluster(
        cast(RedisServer, ClusterUrl(redis_cluster.url)),
        logdir,
        frontends=2,
        workers=2,
        THOUGHTWIRE_SIM_ANSWER_TOKENS=str(TOKENS),
        # paced, so that a master can be killed or a slot moved while a run streams
        THOUGHTWIRE_SIM_TOKENS_PER_SECOND="30",
    )
    yield c
    c.stop()


async def prompt_and_follow(url: str) -> tuple[str, list[dict[str, Any]]]:
    """Open a session on ``url``, send one prompt, and return the run's events."""
    async with connect(url + "/ws/agent-thoughts") as ws:
        session = await greeting(ws)
        await ws.send("hello")
        return session, await run_events(ws, timeout=60)


def shard_subscribers(redis_cluster: RedisCluster, channels: list[str]) -> int:
    """PUBSUB SHARDNUMSUB of each channel, asked of the master of its slot, summed."""
    total = 0
    for channel in channels:
        reply = redis_cluster.node(redis_cluster.master_of(channel)).call(
            "PUBSUB", "SHARDNUMSUB", channel
        )
        total += int(cast(list[Any], reply)[1])
    return total


async def test_thirty_sessions_stream_through_two_frontends_over_a_cluster(
    redis_cluster: RedisCluster, deployment: Cluster
) -> None:
    urls = [f.ws for f in deployment.frontends]
    keys = Keys(deployment.prefix)
    async with connect(urls[1] + "/ws/agent-thoughts") as ws:
        watched = [keys.session_channel(await greeting(ws))]
        # the frontend follows the session with SSUBSCRIBE on the master of its slot
        wait_until(lambda: shard_subscribers(redis_cluster, watched) == 1, 10, "an SSUBSCRIBE")
    results = await asyncio.gather(*(prompt_and_follow(urls[i % 2]) for i in range(30)))
    channels = [keys.session_channel(session) for session, _ in results] + watched
    assert {redis_cluster.master_of(c) for c in channels} == set(redis_cluster.masters())
    for _session, events in results:
        assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
        assert [e["type"] for e in events] == sim_run(TOKENS)
    # every socket closed: each frontend has let go of every session's channel
    wait_until(lambda: shard_subscribers(redis_cluster, channels) == 0, 10, "SSUBSCRIBEs to end")


async def until_end(ws: Any, count: int | None = None) -> list[dict[str, Any]]:
    """Events and gaps until a run's end (or ``count`` events), in the order they came."""
    frames: list[dict[str, Any]] = []
    async with asyncio.timeout(seconds(60)):
        while count is None or len(frames) < count:  # bounded by the timeout
            frame = json.loads(await ws.recv())
            if "seq" in frame or frame["type"] == "gap":
                frames.append(frame)
            if "seq" in frame and frame["type"] in ("done", "error", "cancelled"):
                break
    return frames


def check_one_history(*streams: list[dict[str, Any]]) -> None:
    """No (epoch, seq) names two different events, across every client's stream."""
    seen: dict[tuple[str, int], dict[str, Any]] = {}
    for stream in streams:
        for frame in stream:
            if "seq" in frame:
                event = seen.setdefault((frame["epoch"], frame["seq"]), frame)
                assert event == frame, f"two events at one position: {event} {frame}"


async def test_a_master_killed_mid_stream_hands_its_sessions_over_to_its_replica(
    redis_cluster: RedisCluster, deployment: Cluster
) -> None:
    a, b = (f.ws for f in deployment.frontends)
    keys = Keys(deployment.prefix)
    async with connect(a + "/ws/agent-thoughts") as prompter:
        session = await greeting(prompter)
        master = redis_cluster.master_of(keys.session_channel(session))
        async with connect(f"{b}/ws/agent-thoughts?session={session}") as viewer:
            assert await greeting(viewer) == session
            await prompter.send("hello")
            head = await until_end(prompter, 12)  # the run is streaming
            kill = asyncio.create_task(asyncio.to_thread(redis_cluster.kill_master, master))
            try:
                mine, theirs = await asyncio.gather(until_end(prompter), until_end(viewer))
                promoted = await kill
            finally:
                await asyncio.gather(kill, return_exceptions=True)
            mine = head + mine
            check_stream(mine)
            check_stream(theirs)
            check_one_history(mine, theirs)
            assert mine[-1]["type"] == theirs[-1]["type"] == "done"
            assert redis_cluster.master_of(keys.session_channel(session)) == promoted
            await prompter.send("and again")  # a new prompt, on the promoted replica
            again = await until_end(prompter)
            check_one_history(mine, theirs, again)
            assert again[-1]["type"] == "done"
    await asyncio.to_thread(redis_cluster.restart, master)


async def test_a_streaming_sessions_slot_moved_to_another_master_loses_and_repeats_no_event(
    redis_cluster: RedisCluster, deployment: Cluster
) -> None:
    a, b = (f.ws for f in deployment.frontends)
    keys = Keys(deployment.prefix)
    async with connect(a + "/ws/agent-thoughts") as prompter:
        session = await greeting(prompter)
        channel = keys.session_channel(session)
        source = redis_cluster.master_of(channel)
        target = next(p for p in redis_cluster.masters() if p != source)
        async with connect(f"{b}/ws/agent-thoughts?session={session}") as viewer:
            assert await greeting(viewer) == session
            await prompter.send("hello")
            head = await until_end(prompter, 12)  # the run is streaming
            slot = redis_cluster.slot_of(channel)
            move = asyncio.create_task(asyncio.to_thread(redis_cluster.move_slot, slot, target))
            try:
                mine, theirs = await asyncio.gather(until_end(prompter), until_end(viewer))
                await move
            finally:
                await asyncio.gather(move, return_exceptions=True)
        mine = head + mine
        # Every event once and in order, in one epoch, with no gap: the log's meta reaches
        # the new master whole (MIGRATE), with the old master's replication id, and the
        # append script adopts that id (a server up since before it was written, and no
        # promoted replica of its writer: shared/scripts.py) instead of starting a new epoch.
        for stream in (mine, theirs):
            assert check_stream(stream) == 0
            assert [e["type"] for e in stream] == sim_run(TOKENS)
            assert {e["epoch"] for e in stream} == {mine[0]["epoch"]}
        check_one_history(mine, theirs)
        # A viewer joining after the move gets the whole log from seq 1 of that epoch (no
        # gap): the same events, none lost to the move.
        epoch = mine[0]["epoch"]
        join = f"{b}/ws/agent-thoughts?session={session}&after=0&epoch={epoch}"
        async with connect(join) as late:
            assert await greeting(late) == session
            joined = await until_end(late)
        assert check_stream(joined) == 0
        assert joined == mine
    assert redis_cluster.master_of(channel) == target
    wait_until(lambda: shard_subscribers(redis_cluster, [channel]) == 0, 10, "SSUBSCRIBEs to end")


async def until(check: Any, timeout: float, what: str) -> None:
    """Poll ``check`` on the event loop until it is true, for at most ``timeout`` seconds."""
    try:
        async with asyncio.timeout(seconds(timeout)):
            while not check():  # bounded by the timeout
                await asyncio.sleep(0.02)
    except TimeoutError:
        raise TimeoutError(f"timed out waiting for {what}") from None


async def test_the_link_follows_a_moved_slot_and_a_failed_master_channel_by_channel(
    redis_cluster: RedisCluster, prefix: str
) -> None:
    factory = RedisFactory(Settings(redis_url=redis_cluster.url))
    got: list[tuple[bytes, bytes, bytes | None]] = []
    link = await open_link(factory, lambda kind, c, data: got.append((kind, c, data)))
    home = f"{prefix}:home".encode()
    by_master: dict[int, bytes] = {}
    for i in range(200):  # one session channel per master
        channel = Keys(prefix).session_channel(f"s{i}")
        by_master.setdefault(redis_cluster.master_of(channel), channel.encode())
    channels = list(by_master.values())
    try:
        await link.subscribe(home, *channels)
        await until(
            lambda: {c for k, c, _ in got if k == b"subscribe"} >= {home, *channels},
            5,
            "the subscriptions",
        )

        # a slot moved: the master unsubscribes; the link subscribes it where it went
        source, moved = next(iter(by_master.items()))
        target = next(p for p in redis_cluster.masters() if p != source)
        await asyncio.to_thread(
            redis_cluster.move_slot, redis_cluster.slot_of(moved.decode()), target
        )
        await until(lambda: (b"resync", moved, None) in got, 10, "a resync of the moved channel")
        redis_cluster.node(target).call("SPUBLISH", moved, "after the move")
        await until(lambda: (b"message", moved, b"after the move") in got, 5, "a message")
        assert [c for k, c, _ in got if k == b"resync"] == [moved]

        # a master killed: its channel is subscribed on the replica promoted in its place
        def global_subscribers(port: int) -> int:
            reply = redis_cluster.node(port).call("PUBSUB", "NUMSUB", home)
            return int(cast(list[Any], reply)[1])

        serving = {redis_cluster.master_of(c.decode()) for c in channels}
        victim_master = next(p for p in sorted(serving) if global_subscribers(p) == 0)
        victims = [c for c in channels if redis_cluster.master_of(c.decode()) == victim_master]
        promoted = await asyncio.to_thread(redis_cluster.kill_master, victim_master)
        await until(
            lambda: all((b"resync", v, None) in got for v in victims), 30, "resyncs after failover"
        )
        for victim in victims:
            redis_cluster.node(promoted).call("SPUBLISH", victim, "after the failover")
        await until(
            lambda: all((b"message", v, b"after the failover") in got for v in victims), 5, "news"
        )
        resynced = [c for k, c, _ in got if k == b"resync"]
        assert resynced[0] == moved and sorted(resynced[1:]) == sorted(victims)
        with pytest.raises(TimeoutError):  # the link as a whole lived on
            await asyncio.wait_for(link.wait_closed(), 0.1)
    finally:
        await link.close()
    await asyncio.to_thread(redis_cluster.restart, victim_master)


async def test_what_a_scrape_and_a_worker_ask_of_the_jobs_stream_works_on_a_cluster(
    redis_cluster: RedisCluster, prefix: str
) -> None:
    factory = RedisFactory(Settings(redis_url=redis_cluster.url, redis_pool_size=8))
    bus = Bus(factory.commands(), Keys(prefix), log_maxlen=100, log_ttl=60)
    try:
        await bus.ensure_group()
        assert await bus.jobs_queue() == JobsQueue(0, 0, 0)
        jobs = [Job(run=f"r{i}", session=f"s{i}", prompt="p", user="u") for i in range(3)]
        for job in jobs:
            await bus.submit(job)
        assert await bus.jobs_queue() == JobsQueue(3, 0, 3)
        claimed = await bus.claim("w1", 2, 10)
        assert [job.run for _id, job in claimed] == ["r0", "r1"]
        assert await bus.jobs_queue() == JobsQueue(3, 2, 1)
        # what a worker's attempts send through the shared pipeline, all at once
        attempts = [await bus.start(job, "w1", 10_000, 3) for _id, job in claimed]
        await asyncio.gather(
            *(bus.touch("w1", entry_id) for entry_id, _job in claimed),
            *(bus.renew(j, a.fence, 10_000) for (_, j), a in zip(claimed, attempts, strict=True)),
            bus.jobs_queue(),
        )
        assert await bus.queued_jobs(["r0", "r2", "nope"]) == [True, True, False]
        assert await bus.run_statuses([("s0", "r0"), ("s2", "r2")]) == ["running", "queued"]
        channels = [bus.session_channel("s0"), bus.runs_ended, bus.worker_control]
        assert await bus.subscribers(channels) == dict.fromkeys(channels, 0)
        assert await bus.reclaim("w2", 5, 60_000) == []
        for entry_id, job in claimed:
            await bus.finish(entry_id, job)
        assert await bus.jobs_queue() == JobsQueue(1, 0, 1)
    finally:
        await bus.redis.aclose()


async def test_a_call_a_cluster_cannot_route_fails_alone_in_its_batch(
    redis_cluster: RedisCluster, prefix: str
) -> None:
    factory = RedisFactory(Settings(redis_url=redis_cluster.url, redis_pool_size=4))
    redis = factory.commands()
    batcher = Batcher(redis)
    keys = [f"{prefix}:{{k{i}}}" for i in range(6)]  # of several slots, on every master
    try:
        await redis.xadd(f"{prefix}:stream", {"f": "v"})
        # queued in one tick: they leave as one pipeline
        calls = [batcher.commands(("SET", key, "v")) for key in keys[:3]]
        unroutable = batcher.commands(("XINFO", "GROUPS", f"{prefix}:stream"))
        calls += [batcher.commands(("GET", key)) for key in keys[:3]]
        calls.append(batcher.commands(("SET", keys[3], "w"), ("GET", keys[3])))
        replies = await asyncio.gather(*calls)
        assert replies == [[b"OK"]] * 3 + [[b"v"]] * 3 + [[b"OK", b"w"]]
        with pytest.raises(RedisClusterException):
            await unroutable
        # and the batcher carries on
        assert await batcher.commands(("GET", keys[0])) == [b"v"]
    finally:
        await redis.aclose()


async def test_many_calls_on_a_small_cluster_pool_wait_for_a_connection_instead_of_failing(
    redis_cluster: RedisCluster, prefix: str
) -> None:
    settings = Settings(redis_url=redis_cluster.url, redis_pool_size=2, redis_pool_timeout=10)
    redis: Any = RedisFactory(settings).commands()
    try:
        # The slot map first: redis-py 8.1 leaves a connection it cannot close behind a
        # transaction that is the client's very first command.
        assert await redis.get(f"{prefix}:{{one}}:k0") is None
        # each holds its connection for 50 ms, all on one master, ten times the pool
        waits = [redis.blpop([f"{prefix}:{{one}}:empty"], timeout=0.05) for _ in range(20)]
        pipes = []
        for i in range(10):  # pipelines, transactions among them, take turns too
            pipe = redis.pipeline(transaction=i % 2 == 0)
            pipe.set(f"{prefix}:{{one}}:k{i}", i)
            pipe.get(f"{prefix}:{{one}}:k{i}")
            pipes.append(pipe.execute())
        results = await asyncio.gather(*waits, *pipes)
        assert results[:20] == [None] * 20
        assert results[20:] == [[True, str(i).encode()] for i in range(10)]
    finally:
        await redis.aclose()

    hurried = Settings(redis_url=redis_cluster.url, redis_pool_size=2, redis_pool_timeout=0.2)
    redis = RedisFactory(hurried).commands()
    try:
        assert await redis.get(f"{prefix}:{{one}}:k0") == b"0"
        held = [redis.blpop([f"{prefix}:{{one}}:empty"], timeout=2) for _ in range(2)]
        tasks = [asyncio.ensure_future(call) for call in held]
        await asyncio.sleep(0)  # the two take the pool's two turns
        with pytest.raises(RedisConnectionError, match="no connection free"):
            await redis.get(f"{prefix}:{{one}}:k0")
        assert await asyncio.gather(*tasks) == [None, None]
    finally:
        await redis.aclose()


async def test_a_deaf_connection_to_one_master_is_found_by_its_probe_and_its_channels_resync(
    redis_cluster: RedisCluster, prefix: str
) -> None:
    factory = RedisFactory(Settings(redis_url=redis_cluster.url))
    keys = Keys(prefix)
    got: list[tuple[bytes, bytes, bytes | None]] = []
    link = await open_link(factory, lambda kind, c, data: got.append((kind, c, data)))
    assert isinstance(link, ShardedLink)
    by_master: dict[int, bytes] = {}
    for i in range(200):  # one session channel per master
        channel = keys.session_channel(f"s{i}")
        by_master.setdefault(redis_cluster.master_of(channel), channel.encode())
    channels = list(by_master.values())

    def probe_channel(tag: str) -> str:
        return keys.probe_channel("n1", tag)

    try:
        await link.subscribe(f"{prefix}:home".encode(), *channels)
        await until(lambda: sum(k == b"subscribe" for k, _c, _d in got) == 4, 5, "subscriptions")
        assert await link.probe_shards(b"probe 1", seconds(1), probe_channel) == 0  # subscribes
        probes = [probe_channel(str(i)) for i in range(PROBE_TAGS)]
        await until(lambda: shard_subscribers(redis_cluster, probes[:50]) == 3, 5, "probes")
        assert await link.probe_shards(b"probe 2", seconds(1), probe_channel) == 0
        assert not [c for _k, c, _d in got if b":probe:" in c]  # the hub hears no probe

        # One master's connection goes deaf (a proxy that stopped forwarding, say): it
        # stays open, and only the probe tells.
        victim_port, victim = next(iter(by_master.items()))
        shard = cast(Any, link)._shards[f"127.0.0.1:{victim_port}"]
        shard._transport.pause_reading()
        redis_cluster.node(victim_port).call("SPUBLISH", victim, "unheard")
        assert await link.probe_shards(b"probe 3", seconds(1), probe_channel) == 1
        await until(lambda: (b"resync", victim, None) in got, 10, "the deaf master's resync")
        assert [c for k, c, _d in got if k == b"resync"] == [victim]  # its channels only
        redis_cluster.node(victim_port).call("SPUBLISH", victim, "heard")
        await until(lambda: (b"message", victim, b"heard") in got, 5, "a message after")
        assert (b"message", victim, b"unheard") not in got
        # probed again on its new connection, and heard
        assert await link.probe_shards(b"probe 4", seconds(1), probe_channel) == 0
        await until(lambda: shard_subscribers(redis_cluster, probes[:50]) == 3, 5, "probes")
        assert await link.probe_shards(b"probe 5", seconds(1), probe_channel) == 0
    finally:
        await link.close()


class Watcher:
    """A viewer that keeps what the hub hands it."""

    def __init__(self) -> None:
        self.frames: list[str] = []
        self.resyncs = 0

    def deliver(self, frame: str, position: tuple[int, str] | None, wire: bytes) -> None:
        self.frames.append(frame)

    def deliver_run(self, run: Run) -> None:
        self.frames.extend(run.frames)

    def resync(self) -> None:
        self.resyncs += 1

    def close(self, code: int, reason: str) -> None:
        raise AssertionError("not closed here")


async def test_the_hub_probes_each_masters_connection_and_resyncs_the_deaf_ones_viewers(
    redis_cluster: RedisCluster, prefix: str
) -> None:
    factory = RedisFactory(Settings(redis_url=redis_cluster.url))
    bus = Bus(factory.commands(), Keys(prefix), log_maxlen=100, log_ttl=60)
    hub = Hub(
        partial(open_link, factory),
        bus.node_channel("n1"),
        publish=bus.publish,
        probe_interval=0.5,
        probe_channel=partial(bus.probe_channel, "n1"),
    )
    by_master: dict[int, str] = {}
    for i in range(200):  # one session per master
        by_master.setdefault(redis_cluster.master_of(bus.session_channel(f"s{i}")), f"s{i}")
    watchers = {port: Watcher() for port in by_master}
    await hub.start()
    try:
        for port, session in by_master.items():
            await hub.join(bus.session_channel(session), watchers[port])
        victim = next(iter(by_master))
        probes = [bus.probe_channel("n1", str(i)) for i in range(50)]
        # Asked from a thread: 150 blocking calls a poll would stall the hub's probes.
        subscribed = partial(shard_subscribers, redis_cluster, probes)
        await asyncio.to_thread(wait_until, lambda: subscribed() == 3, 10, "probe channels")
        await asyncio.sleep(seconds(2))  # probe rounds that are heard: none drops a thing
        assert hub.deaf_links == 0 and not any(w.resyncs for w in watchers.values())
        link: Any = hub._link
        link._shards[f"127.0.0.1:{victim}"]._transport.pause_reading()
        await until(lambda: watchers[victim].resyncs == 1, 5, "the deaf master's viewers")
        assert hub.deaf_links == 1
        assert [w.resyncs for p, w in watchers.items() if p != victim] == [0, 0]
        channel = bus.session_channel(by_master[victim])
        subscribed = partial(shard_subscribers, redis_cluster, [channel])
        await asyncio.to_thread(wait_until, lambda: subscribed() == 1, 10, "SSUBSCRIBE")
        redis_cluster.node(victim).call("SPUBLISH", channel, "after")
        await until(lambda: "after" in watchers[victim].frames, 5, "a message after")
    finally:
        await hub.close()
        await bus.redis.aclose()


def one_node_cluster(workdir: Path) -> RedisServer:
    """A Redis Cluster of one master serving every slot; restarted, it serves them again."""
    bus = ("--cluster-port", str(free_port()))  # not the client port + 10,000 (past 65535)
    server = RedisServer(workdir, "--cluster-enabled", "yes", *bus).start()
    with server.client() as admin:
        admin.execute_command("CLUSTER", "ADDSLOTSRANGE", 0, 16383)
    served(server)
    return server


def served(server: RedisServer) -> None:
    with server.client() as admin:
        info = partial(admin.execute_command, "CLUSTER", "INFO")
        wait_until(lambda: b"cluster_state:ok" in info(), 10, "a one-node cluster to serve")


async def test_a_cluster_with_no_node_answering_is_a_lost_connection_to_every_caller(
    tmp_path: Path, prefix: str
) -> None:
    server = one_node_cluster(tmp_path)
    url = f"redis+cluster://127.0.0.1:{server.port}"
    redis: Any = RedisFactory(Settings(redis_url=url)).commands()
    try:
        assert await redis.set(f"{prefix}:{{a}}", 1)
        server.stop()  # every node gone (a whole cluster restarting): redis-py reads no slot map
        with pytest.raises(RedisConnectionError):
            await redis.set(f"{prefix}:{{a}}", 2)
        pipe = redis.pipeline(transaction=False)
        pipe.set(f"{prefix}:{{a}}", 3)
        with pytest.raises(RedisConnectionError):
            await pipe.execute()
        with pytest.raises(RedisConnectionError):  # the hub's reconnect retries on that
            await open_link(RedisFactory(Settings(redis_url=url)), lambda *message: None)
    finally:
        await redis.aclose()


async def test_the_hub_comes_back_after_every_node_of_the_cluster_was_gone(
    tmp_path: Path, prefix: str
) -> None:
    server = one_node_cluster(tmp_path)
    factory = RedisFactory(Settings(redis_url=f"redis+cluster://127.0.0.1:{server.port}"))
    opened = 0

    async def open_counted(on_message: Any, on_run: Any) -> Any:
        nonlocal opened
        opened += 1
        return await open_link(factory, on_message, on_run)

    hub = Hub(open_counted, f"{prefix}:node")
    await hub.start()
    try:
        viewer = Watcher()
        await hub.join(f"{prefix}:{{s}}:events", viewer)
        server.stop()  # the whole cluster restarts
        await until(lambda: opened >= 3, 10, "the hub to try again while no node answers")
        server.proc.start()  # the same node, its slots kept in nodes.conf
        served(server)
        await until(lambda: viewer.resyncs >= 1, 15, "the hub to reconnect and resync its viewer")
        assert hub.healthy and hub.reconnects == 1
    finally:
        await hub.close()
        server.stop()
