"""The bus against a real redis-server, and the same checks on the embedded fakeredis."""

import asyncio

import orjson
import pytest
from redis.asyncio import Redis
from redis.exceptions import ResponseError

from thoughtwire.shared.bus import FENCED, Bus
from thoughtwire.shared.keys import Keys
from thoughtwire.shared.protocol import TERMINAL_STATUS, Job, Thought, decode_event
from thoughtwire.shared.redis import Batcher, RedisFactory
from thoughtwire.shared.settings import Settings


@pytest.fixture
def bus(redis_client, prefix):
    return Bus(redis_client, Keys(prefix), log_maxlen=50, log_ttl=60)


async def started(bus, run="r", session="s", lease_ms=10_000):
    job = Job(run=run, session=session, prompt="p")
    await bus.submit(job)
    attempt = await bus.start(job, "w1", lease_ms, 3)
    assert attempt.verdict == "run"
    return job, attempt.fence


async def append(bus, job, thoughts, *, fence, first, min_seq=0, **ending):
    """Encode ``thoughts`` and append them as an attempt does; the last may end the run."""
    last = thoughts[-1]
    status = TERMINAL_STATUS[last.type] if last.terminal else ""
    heads = [bus.encode(job, t) for t in thoughts]
    reply = await bus.submit_encoded(
        job, heads, fence=fence, first=first, min_seq=min_seq, status=status, **ending
    )
    return int(reply)


async def test_seq_is_gap_free_across_concurrent_writers(bus):
    # Runs of a session start one at a time (ADMIT, START), but the append script must
    # number writers that overlap gap-free all the same: runs queued before that rule,
    # or after Redis lost the session's queue. Forgetting the queue makes them overlap.
    # Forgotten before any of them starts: a writer's start must not find another's
    # admission still queued, whatever order the three interleave in.
    jobs = [Job(run=f"run{n}", session="s", prompt="p") for n in range(3)]
    for job in jobs:
        await bus.submit(job)
    await bus.redis.delete(bus.keys.session_queue("s"))

    async def writer(n):
        job = jobs[n]
        attempt = await bus.start(job, "w1", 10_000, 3)
        assert attempt.verdict == "run"
        fence = attempt.fence
        for i in range(20):
            await append(bus, job, [Thought("answer", f"{n}-{i}")], fence=fence, first=i + 1)

    await asyncio.gather(*(writer(n) for n in range(3)))
    events = [decode_event(e) for e in await bus.history("s")]
    assert [e.seq for e in events] == list(range(1, 61))
    assert len({e.epoch for e in events}) == 1
    for n in range(3):
        assert [e.content for e in events if e.run == f"run{n}"] == [f"{n}-{i}" for i in range(20)]


async def test_log_and_channel_carry_identical_bytes(bus):
    job, fence = await started(bus)
    pubsub = bus.redis.pubsub()
    await pubsub.subscribe(bus.keys.session_channel("s"))
    await pubsub.get_message(timeout=1)  # the subscribe confirmation
    await append(bus, job, [Thought("thinking", "a"), Thought("answer", "b")], fence=fence, first=1)
    published = []
    async with asyncio.timeout(5):
        while len(published) < 2:
            message = await pubsub.get_message(timeout=1)
            if message and message["type"] == "message":
                published.append(message["data"].decode())
    await pubsub.aclose()
    assert published == await bus.history("s")
    assert [orjson.loads(p)["seq"] for p in published] == [1, 2]


async def test_history_after_a_seq_and_meta(bus):
    job, fence = await started(bus)
    await append(bus, job, [Thought("answer", str(i)) for i in range(5)], fence=fence, first=1)
    assert [decode_event(e).seq for e in await bus.history("s", after=3)] == [4, 5]
    assert await bus.history("s", after=5) == []
    meta = await bus.meta("s")
    assert meta.last_seq == 5 and meta.epoch == decode_event((await bus.history("s"))[0]).epoch
    assert (await bus.meta("nobody")).epoch is None


async def test_a_retried_append_writes_nothing_twice(bus):
    job, fence = await started(bus)
    batch = [Thought("answer", "a"), Thought("answer", "b")]
    assert await append(bus, job, batch, fence=fence, first=1) == 2
    assert await append(bus, job, batch, fence=fence, first=1) == 2  # the reply was "lost"
    assert await append(bus, job, [Thought("answer", "c")], fence=fence, first=3) == 3
    assert [decode_event(e).content for e in await bus.history("s")] == ["a", "b", "c"]


async def test_a_stale_attempt_is_fenced_out(bus):
    job, old_fence = await started(bus, lease_ms=1)
    await asyncio.sleep(0.01)  # let the 1 ms lease lapse
    takeover = await bus.start(job, "w2", 10_000, 3)
    assert (takeover.verdict, takeover.attempt) == ("run", 2)
    assert await append(bus, job, [Thought("answer", "stale")], fence=old_fence, first=1) == FENCED
    assert await bus.renew(job, old_fence, 1000) == -1
    assert await append(bus, job, [Thought("answer", "fresh")], fence=takeover.fence, first=1) == 1
    assert [decode_event(e).content for e in await bus.history("s")] == ["fresh"]


# Connection slots on Redis' clock: tests/test_grants.py.


async def test_a_live_lease_is_not_taken_over(bus):
    job, _fence = await started(bus)
    assert (await bus.start(job, "w2", 10_000, 3)).verdict == "busy"


async def test_a_terminal_event_ends_the_run_and_keeps_its_result(bus):
    job, fence = await started(bus)
    await append(bus, job, [Thought("done", "")], fence=fence, first=1, result="the answer")
    state = await bus.run_state(job.run)
    assert (state["status"], state["result"], state["session"]) == ("done", "the answer", "s")
    assert (await bus.start(job, "w2", 10_000, 3)).verdict == "finished"
    assert await append(bus, job, [Thought("answer", "late")], fence=fence, first=2) == FENCED


async def test_the_turn_that_ends_a_run_is_remembered_and_the_next_start_gets_it(bus):
    history: list = []
    for i in range(3):
        job = Job(run=f"r{i}", session="s", prompt=f"q{i}")
        await bus.submit(job)
        attempt = await bus.start(job, "w1", 10_000, 3)
        assert (attempt.verdict, attempt.history) == ("run", history)
        turn = [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]
        seqs = [
            await append(
                bus,
                job,
                [Thought("done", "")],
                fence=attempt.fence,
                first=1,
                remember=orjson.dumps(turn),
                turns=2,
            )
            for _ in range(2)  # the second is a retry whose reply was lost
        ]
        assert seqs == [i + 1, i + 1]  # the retry learns where the log stands, and adds nothing
        history = (history + turn)[-4:]  # whole turns, the last two
    assert await bus.memory("s") == history


async def test_plain_commands_share_the_pipeline_and_get_their_own_replies(redis_client, prefix):
    batcher = Batcher(redis_client)
    counter, text = f"{prefix}:counter", f"{prefix}:text"
    good, bad = await asyncio.gather(
        batcher.commands(("SET", counter, 41), ("INCR", counter)),
        batcher.commands(("SET", text, "x"), ("INCR", text), ("GET", text)),
    )
    assert good[1] == 42
    assert isinstance(bad[1], ResponseError) and bad[2] == b"x"


async def test_a_retried_submit_queues_its_job_and_never_resets_a_started_run(bus):
    job = Job(run="r", session="s", prompt="p")
    # A first try that claimed the key and was cut off before queueing the job.
    await bus.redis.set(bus.keys.idempotency("u", "k"), "r s")
    assert await bus.submit(job, "k", user="u") == ("r", "s", True)
    assert await bus.redis.xlen(bus.keys.jobs) == 1
    attempt = await bus.start(job, "w1", 10_000, 3)
    assert await bus.submit(job, "k", user="u") == ("r", "s", True)  # a retry after a lost reply
    state = await bus.run_state("r")
    assert (state["status"], state["attempt"]) == ("running", "1")
    assert await bus.renew(job, attempt.fence, 10_000) == 0
    other = Job(run="r2", session="s", prompt="p")
    assert await bus.submit(other, "k", user="u") == ("r", "s", False)


async def test_a_script_that_cannot_be_loaded_again_fails_only_its_own_calls(
    redis_client, prefix, monkeypatch
):
    batcher = Batcher(redis_client)
    script = redis_client.register_script("return 7")
    assert await batcher.script(script, (), ()) == 7
    await redis_client.script_flush()  # as after a Redis restart

    async def refused(_text):
        raise ConnectionError("Redis is loading")

    monkeypatch.setattr(redis_client, "script_load", refused)
    key = f"{prefix}:n"
    ran, failed = await asyncio.gather(
        batcher.commands(("INCR", key)), batcher.script(script, (), ()), return_exceptions=True
    )
    assert ran == [1]  # it ran once, and its caller is told so
    assert isinstance(failed, ConnectionError)


async def test_a_running_job_is_touched_and_its_watchers_counted(bus):
    job = Job(run="r", session="s", prompt="p")
    await bus.submit(job)
    await bus.ensure_group()
    [(entry_id, _claimed)] = await bus.claim("w1", 1, 100)
    await bus.touch("w1", entry_id)  # the job stays with w1, its idle time reset
    channel = bus.keys.session_channel("s")
    pubsub = bus.redis.pubsub()
    try:
        await pubsub.subscribe(channel)
        assert await bus.subscribers([channel, "nobody"]) == {channel: 1, "nobody": 0}
    finally:
        await pubsub.aclose()


async def test_cancel_is_seen_by_the_lease_and_at_start(bus):
    job, fence = await started(bus)
    assert await bus.cancel("s") == ["r"]
    assert await bus.renew(job, fence, 1000) == 1
    queued = Job(run="q", session="s", prompt="p")
    await bus.submit(queued)
    assert await bus.cancel("s", "q") == ["q"]
    assert (await bus.start(queued, "w1", 10_000, 3)).verdict == "cancel"


async def test_too_many_attempts_is_dead(bus):
    job, _ = await started(bus, lease_ms=1)
    for _ in range(2):
        await asyncio.sleep(0.01)
        assert (await bus.start(job, "w", 1, 3)).verdict == "run"
    await asyncio.sleep(0.01)
    assert (await bus.start(job, "w", 1, 3)).verdict == "dead"


async def test_lost_writes_start_a_new_epoch(bus):
    job, fence = await started(bus)
    await append(bus, job, [Thought("answer", "a"), Thought("answer", "b")], fence=fence, first=1)
    first_epoch = (await bus.meta("s")).epoch
    await bus.redis.hset(bus.keys.session_meta("s"), "seq", 1)  # as if Redis lost a write
    await append(bus, job, [Thought("answer", "c")], fence=fence, first=3, min_seq=2)
    meta = await bus.meta("s")
    assert meta.epoch != first_epoch and meta.last_seq == 1
    assert [decode_event(e).content for e in await bus.history("s")] == ["c"]


async def test_log_is_bounded_and_expires(bus):
    job, fence = await started(bus)
    for i in range(30):
        await append(bus, job, [Thought("answer", str(i))] * 10, fence=fence, first=i * 10 + 1)
    log = bus.keys.session_log("s")
    assert 50 <= await bus.redis.xlen(log) < 300
    assert 0 < await bus.redis.ttl(log) <= 60
    assert 0 < await bus.redis.ttl(bus.keys.session_meta("s")) <= 60


async def test_the_log_expiry_is_refreshed_every_tenth_of_its_ttl_and_when_keys_are_made(bus):
    job, fence = await started(bus)  # the bus keeps logs 60 s
    log, meta = bus.keys.session_log("s"), bus.keys.session_meta("s")
    run = bus.keys.run("s", "r")
    await append(bus, job, [Thought("answer", "a")], fence=fence, first=1)
    assert 55 <= await bus.redis.ttl(log) <= 60  # made by this call: refreshed

    for key in (log, meta, run):
        await bus.redis.expire(key, 57)  # less than a tenth gone: not refreshed
    await append(bus, job, [Thought("answer", "b")], fence=fence, first=2)
    assert all([50 < await bus.redis.ttl(k) <= 57 for k in (log, meta, run)])
    for key in (log, meta, run):
        await bus.redis.expire(key, 50)  # more than a tenth gone: all three refreshed
    await append(bus, job, [Thought("answer", "c")], fence=fence, first=3)
    assert all([55 <= await bus.redis.ttl(k) <= 60 for k in (log, meta, run)])

    await bus.redis.expire(log, 57)
    await bus.redis.hset(meta, "seq", 1)  # lost writes: a new epoch makes a new log
    await append(bus, job, [Thought("answer", "d")], fence=fence, first=4, min_seq=3)
    assert 58 <= await bus.redis.ttl(log) <= 60

    for key in (log, meta, run):
        await bus.redis.expire(key, 57)
    await append(bus, job, [Thought("done", "")], fence=fence, first=5)  # the run's end
    assert all([58 <= await bus.redis.ttl(k) <= 60 for k in (log, meta, run)])


async def test_idempotent_submit_returns_the_first_job(bus):
    first = await bus.submit(Job(run="a", session="s1", prompt="p"), "key-1", user="alice")
    again = await bus.submit(Job(run="b", session="s2", prompt="p"), "key-1", user="alice")
    other = await bus.submit(Job(run="c", session="s3", prompt="p"), "key-1", user="bob")
    assert first == ("a", "s1", True)
    assert again == ("a", "s1", False)
    assert other == ("c", "s3", True)  # keys are per user
    assert await bus.redis.xlen(bus.keys.jobs) == 2


async def test_a_job_goes_to_one_worker_and_leaves_the_stream_when_finished(bus):
    await bus.ensure_group()
    await bus.ensure_group()  # idempotent
    job = Job(run="r1", session="s", prompt="hi")
    await bus.submit(job)
    first = await bus.claim("w1", 10, 100)
    second = await bus.claim("w2", 10, 100)
    assert [j for _, j in first] == [job]
    assert second == []
    assert await bus.reclaim("w2", 10, 60_000) == []  # not idle long enough
    assert [j for _, j in await bus.reclaim("w2", 10, 0)] == [job]
    await bus.finish(first[0][0], job)
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


async def test_appends_in_one_tick_share_a_round_trip_and_survive_a_script_flush(bus):
    jobs = [await started(bus, run=f"r{i}", session=f"s{i}") for i in range(20)]
    await bus.redis.script_flush()  # as after a Redis restart: the script must be loaded again
    seqs = await asyncio.gather(
        *(append(bus, job, [Thought("answer", "x")], fence=fence, first=1) for job, fence in jobs)
    )
    assert seqs == [1] * 20
    for i in range(20):
        assert len(await bus.history(f"s{i}")) == 1


async def test_a_burst_goes_out_in_several_pipelines_and_every_reply_finds_its_caller(bus):
    # 300 calls in one tick: more than one pipeline holds, several are away at once on
    # one connection, and each caller must get its own session's reply.
    jobs = [await started(bus, run=f"r{i}", session=f"s{i}") for i in range(300)]
    for i, (job, fence) in enumerate(jobs[:100]):  # some sessions are further along
        if i % 3:
            await append(bus, job, [Thought("answer", "x")] * (i % 3), fence=fence, first=1)
    seqs = await asyncio.gather(
        *(
            append(
                bus, job, [Thought("answer", "y")], fence=fence, first=1 + (i % 3 if i < 100 else 0)
            )
            for i, (job, fence) in enumerate(jobs)
        )
    )
    assert seqs == [(i % 3 if i < 100 else 0) + 1 for i in range(300)]


async def test_a_run_ends_when_waiting_for_replicas_cannot_be_done(redis_client, prefix, caplog):
    # No replica answers the one server within the wait; the embedded Redis has no WAIT.
    bus = Bus(redis_client, Keys(prefix), log_maxlen=50, log_ttl=60, wait_replicas=1,
              wait_timeout_ms=20)  # fmt: skip
    job, fence = await started(bus)
    assert await append(bus, job, [Thought("done", "")], fence=fence, first=1) == 1
    assert await append(bus, job, [Thought("answer", "late")], fence=fence, first=2) == FENCED
    assert any("replicas" in r.getMessage() for r in caplog.records)


async def test_a_redis_user_that_may_not_read_info_is_warned_of_at_start(tmp_path, caplog):
    # The scripts read INFO to tell a master that lost writes; a common ACL takes it away
    # (-@dangerous), and inside a script the refusal is silent.
    from tests.procs import RedisServer

    server = RedisServer(tmp_path).start()
    try:
        with server.client() as admin:
            admin.acl_setuser("app", enabled=True, passwords=["+s3cret-pw"], keys="*", channels="*",
                              commands=["+@all", "-@dangerous"])  # fmt: skip
        url = f"redis://app:s3cret-pw@127.0.0.1:{server.port}/0"
        for user_url, readable in ((url, False), (server.url, True)):
            redis = RedisFactory(Settings(redis_url=user_url)).commands()
            try:
                bus = Bus(redis, Keys("t"), log_maxlen=50, log_ttl=60)
                assert await bus.check_incarnations() is readable
            finally:
                await redis.aclose()
        assert "may not run INFO" in caplog.text and "s3cret" not in caplog.text
    finally:
        server.stop()
