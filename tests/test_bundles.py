"""Bundles: calls of many sessions in one script run (``Batcher.bundle``, ``APPEND_MANY``).

Each call of a bundle must read as if it were a script run of its own: its own reply or
error, its events fenced, numbered and skipped on a retry as ``APPEND`` does, and calls
run in the order they were made, bundled or not. On a real redis-server and on the
embedded Redis.
"""

from __future__ import annotations

import asyncio

import pytest

from tests.procs import RedisServer
from tests.test_bus import append, started
from thoughtwire.shared.bus import FENCED, Bus
from thoughtwire.shared.keys import Keys
from thoughtwire.shared.protocol import Job, Thought, decode_event
from thoughtwire.shared.redis import (
    Batcher,
    Redis,
    RedisConnectionError,
    RedisFactory,
    ResponseError,
)
from thoughtwire.shared.settings import Settings

# A bundle script of the Batcher's shape: KEYS and ARGV are each call's in order after
# the common arguments; each call appends its argument to its list, and one fails.
PUSH_MANY = """
local replies = {}
for i = 1, #KEYS do
  local ok, reply = pcall(function()
    if ARGV[i + 1] == 'boom' then
      error('boom')
    end
    return redis.call('RPUSH', KEYS[i], ARGV[1] .. ARGV[i + 1])
  end)
  replies[i] = ok and reply or {err = tostring(reply)}
end
return replies
"""


@pytest.fixture
def bus(redis_client: Redis, prefix: str) -> Bus:
    return Bus(redis_client, Keys(prefix), log_maxlen=50, log_ttl=60)


async def evalsha_calls(redis: Redis) -> int:
    stats = await redis.info("commandstats")
    return int(stats.get("cmdstat_evalsha", {}).get("calls", 0))


async def test_calls_of_a_tick_share_one_script_run_and_each_gets_its_reply(redis_server, prefix):
    redis = Redis(port=redis_server.port)
    batcher = Batcher(redis)
    script = redis.register_script(PUSH_MANY)
    try:
        assert batcher.bundles
        await script(keys=[f"{prefix}:warm"], args=["", "x"])  # loaded: no NOSCRIPT retry
        before = await evalsha_calls(redis)
        calls = [
            batcher.bundle(script, ("v",), [f"{prefix}:l{i % 3}"], [str(i)]) for i in range(10)
        ]
        assert await asyncio.gather(*calls) == [1, 1, 1, 2, 2, 2, 3, 3, 3, 4]
        assert await evalsha_calls(redis) == before + 1
        assert await redis.lrange(f"{prefix}:l1", 0, -1) == [b"v1", b"v4", b"v7"]
    finally:
        await redis.aclose()


async def test_a_failing_call_gets_its_error_and_the_others_their_replies(redis_client, prefix):
    batcher = Batcher(redis_client)
    script = redis_client.register_script(PUSH_MANY)
    calls = [
        batcher.bundle(script, ("",), [f"{prefix}:l"], [value]) for value in ("a", "boom", "b")
    ]
    first, failed, last = await asyncio.gather(*calls, return_exceptions=True)
    assert (first, last) == (1, 2)
    assert isinstance(failed, ResponseError) and "boom" in str(failed)


async def test_bundled_and_plain_calls_run_in_the_order_they_were_made(redis_client, prefix):
    batcher = Batcher(redis_client)
    script = redis_client.register_script(PUSH_MANY)
    await redis_client.script_load(PUSH_MANY)  # a script Redis lacks runs again, later
    key = f"{prefix}:order"
    calls = [
        batcher.bundle(script, ("",), [key], ["1"]),
        batcher.bundle(script, ("",), [key], ["2"]),
        batcher.commands(("RPUSH", key, "3")),
        batcher.bundle(script, ("",), [key], ["4"]),
        batcher.bundle(script, ("other:",), [key], ["5"]),  # other common args: a new run
    ]
    await asyncio.gather(*calls)
    assert await redis_client.lrange(key, 0, -1) == [b"1", b"2", b"3", b"4", b"other:5"]


async def test_bundled_appends_of_many_sessions_land_in_order_fenced_and_once(bus):
    runs = [await started(bus, run=f"r{i}", session=f"s{i}") for i in range(5)]
    assert bus._batch.bundles  # on one server, and on the embedded Redis

    def tick(n: int, *, fence_of=None) -> list[asyncio.Future[object]]:
        """One event of every run, all in one tick: one bundle."""
        return [
            bus.submit_encoded(
                job,
                [bus.encode(job, Thought("answer", f"{job.session}-{n}"))],
                fence=fence if fence_of is None else fence_of(job, fence),
                first=n,
            )
            for job, fence in runs
        ]

    for n in range(1, 4):
        assert [int(seq) for seq in await asyncio.gather(*tick(n))] == [n] * 5
    # A retry of a call that landed writes nothing again; a stale fence writes nothing.
    stale = await asyncio.gather(*tick(3, fence_of=lambda job, f: "x" if job.run == "r2" else f))
    assert [int(seq) for seq in stale] == [3, 3, FENCED, 3, 3]
    for job, fence in runs:
        events = [decode_event(e) for e in await bus.history(job.session)]
        assert [(e.seq, e.content) for e in events] == [
            (n, f"{job.session}-{n}") for n in (1, 2, 3)
        ]
        assert len({e.epoch for e in events}) == 1
        # The call that ends the run goes alone, through APPEND, after the bundled ones.
        done = Thought("done", "")
        assert await append(bus, job, [done], fence=fence, first=4) == 4
    assert all(
        status == "done" for status in await bus.run_statuses([(j.session, j.run) for j, _ in runs])
    )


async def test_a_bundle_on_a_demoted_master_is_a_lost_connection_not_an_answer(tmp_path, prefix):
    for name in ("master", "replica"):
        (tmp_path / name).mkdir()
    master = RedisServer(tmp_path / "master").start()
    replica = RedisServer(tmp_path / "replica", "--replicaof", "127.0.0.1", str(master.port))
    replica.start()
    redis = RedisFactory(Settings(redis_url=replica.url, redis_pool_size=2)).commands()
    bus = Bus(redis, Keys(prefix), log_maxlen=50, log_ttl=60)
    job = Job(run="r", session="s", prompt="p")
    try:
        assert bus._batch.bundles
        head = bus.encode(job, Thought("answer", "a"))
        calls = [bus.submit_encoded(job, [head], fence="f", first=n) for n in (1, 2)]
        # As a script run of one call is (tests/test_redis_sentinel.py): the line drops the
        # connection, so the writer tries again on whichever server is the master then.
        for call in calls:
            with pytest.raises(RedisConnectionError, match="replica"):
                await call
    finally:
        await redis.aclose()
        replica.stop()
        master.stop()
