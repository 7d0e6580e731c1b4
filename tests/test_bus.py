"""The bus against a real redis-server, and the same checks on the embedded fakeredis."""

import asyncio

import orjson
import pytest
from redis.asyncio import Redis

from shared.bus import Bus
from shared.connections import RedisFactory
from shared.keys import Keys
from shared.protocol import Job, Thought, decode_event
from shared.settings import Settings


@pytest.fixture(params=["redis-server", "embedded"])
async def bus(request, prefix):
    if request.param == "redis-server":
        server = request.getfixturevalue("redis_server")
        redis = RedisFactory(Settings(redis_url=server.url, redis_pool_size=4)).commands()
    else:
        redis = RedisFactory(Settings()).commands()
    yield Bus(redis, Keys(prefix), log_maxlen=50, log_ttl=60)
    await redis.aclose()


async def test_seq_is_gap_free_across_concurrent_writers(bus):
    async def writer(n):
        for i in range(20):
            await bus.append("s", f"run{n}", [Thought("answer", f"{n}-{i}")])

    await asyncio.gather(*(writer(n) for n in range(3)))
    events = [decode_event(e) for e in await bus.history("s")]
    assert [e.seq for e in events] == list(range(1, 61))
    assert len({e.epoch for e in events}) == 1
    for n in range(3):
        assert [e.content for e in events if e.run == f"run{n}"] == [f"{n}-{i}" for i in range(20)]


async def test_log_and_channel_carry_identical_bytes(bus):
    pubsub = bus.redis.pubsub()
    await pubsub.subscribe(bus.keys.session_channel("s"))
    await pubsub.get_message(timeout=1)  # the subscribe confirmation
    await bus.append("s", "r", [Thought("thinking", "a"), Thought("answer", "b")])
    published = []
    async with asyncio.timeout(5):
        while len(published) < 2:
            message = await pubsub.get_message(timeout=1)
            if message and message["type"] == "message":
                published.append(message["data"])
    await pubsub.aclose()
    assert published == await bus.history("s")
    assert [orjson.loads(p)["seq"] for p in published] == [1, 2]


async def test_history_after_a_seq(bus):
    await bus.append("s", "r", [Thought("answer", str(i)) for i in range(5)])
    assert [decode_event(e).seq for e in await bus.history("s", after=3)] == [4, 5]
    assert await bus.history("s", after=5) == []


async def test_log_is_bounded_and_expires(bus):
    for i in range(30):
        await bus.append("s", "r", [Thought("answer", str(i))] * 10)
    log = bus.keys.session_log("s")
    assert await bus.redis.xlen(log) < 300
    assert 0 < await bus.redis.ttl(log) <= 60
    assert 0 < await bus.redis.ttl(bus.keys.session_meta("s")) <= 60


async def test_a_job_goes_to_one_worker_and_leaves_the_stream_when_finished(bus):
    await bus.ensure_group()
    await bus.ensure_group()  # idempotent
    job = Job(run="r1", session="s", prompt="hi")
    await bus.submit(job)
    first = await bus.claim("w1", 10, 100)
    second = await bus.claim("w2", 10, 100)
    assert [j for _, j in first] == [job]
    assert second == []
    await bus.finish(first[0][0])
    assert await bus.redis.xlen(bus.keys.jobs) == 0


async def test_pool_is_sized_explicitly(redis_server):
    redis: Redis = RedisFactory(Settings(redis_url=redis_server.url, redis_pool_size=3)).commands()
    try:
        # Far more concurrent commands than connections: they queue, none fails.
        results = await asyncio.gather(*(redis.ping() for _ in range(200)))
        assert all(results)
        assert redis.connection_pool.max_connections == 3
    finally:
        await redis.aclose()
