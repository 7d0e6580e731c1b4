"""An attempt's write path, in process, against a real redis-server and the embedded Redis.

The agent's events are queued and written one call in flight at a time; these tests
pin what that must never change: every event once, in order, within the fence.
"""

import asyncio

import pytest

from tests.procs import seconds
from thoughtwire.shared.bus import Bus
from thoughtwire.shared.keys import Keys
from thoughtwire.shared.protocol import Job, Thought, decode_event
from thoughtwire.worker.attempt import RunAttempt, RunLimits
from thoughtwire.worker.runner import CLAIM_BATCH, Worker
from thoughtwire.worker.writer import MAX_BATCH

LIMITS = RunLimits(lease_ms=10_000, redis_retry_seconds=1.0, disconnect_grace=5.0)


@pytest.fixture
def bus(redis_client, prefix):
    return Bus(redis_client, Keys(prefix), log_maxlen=10_000, log_ttl=60)


class Tokens:
    """An agent that streams ``count`` answer tokens, ``pause`` seconds apart (0: unpaced)."""

    def __init__(self, count: int | None, pause: float = 0.0) -> None:
        self.count, self.pause, self.sent = count, pause, 0

    async def run(self, turn):
        while self.count is None or self.sent < self.count:
            yield Thought("answer", f"t{self.sent} ")
            self.sent += 1
            await asyncio.sleep(self.pause)


async def produced(agent, count):
    """Wait (bounded) until the agent has yielded ``count`` tokens."""
    async with asyncio.timeout(seconds(5)):
        while agent.sent < count:
            await asyncio.sleep(0.001)


async def attempt_for(bus, session="s"):
    job = Job(run=f"r-{session}", session=session, prompt="p")
    await bus.submit(job)
    start = await bus.start(job, "w1", LIMITS.lease_ms, 3)
    return RunAttempt(bus, job, "0-1", start.fence, "w1", LIMITS)


def counting_calls(bus, monkeypatch):
    calls = []
    submit = bus.submit_encoded

    def counted(job, heads, **kwargs):
        calls.append(len(heads))
        return submit(job, heads, **kwargs)

    monkeypatch.setattr(bus, "submit_encoded", counted)
    return calls


async def test_a_fast_agent_fills_few_calls_and_every_event_lands_once_in_order(bus, monkeypatch):
    calls = counting_calls(bus, monkeypatch)
    attempt = await attempt_for(bus)
    await attempt.execute(Tokens(2000))
    events = [decode_event(e) for e in await bus.history("s")]
    assert [e.seq for e in events] == list(range(1, 2002))
    assert [e.content for e in events[:-1]] == [f"t{i} " for i in range(2000)]
    assert events[-1].type == "done"
    # Whatever the agent produced while a call was away went into the next one.
    assert len(calls) < 2000 / 4
    assert max(calls) <= MAX_BATCH


async def test_a_slow_agent_gets_each_event_out_at_once(bus, monkeypatch):
    calls = counting_calls(bus, monkeypatch)
    attempt = await attempt_for(bus)
    await attempt.execute(Tokens(5, pause=0.2))  # far longer than a write takes
    assert calls == [1] * 6  # each token alone, then `done`: nothing waits for company
    assert [decode_event(e).type for e in await bus.history("s")] == ["answer"] * 5 + ["done"]


async def test_a_cancel_writes_what_was_queued_then_cancelled(bus):
    attempt = await attempt_for(bus)
    agent = Tokens(None)
    running = asyncio.create_task(attempt.execute(agent))
    await produced(agent, 500)
    attempt.stop("cancel")
    await running
    events = [decode_event(e) for e in await bus.history("s")]
    assert [e.seq for e in events] == list(range(1, len(events) + 1))
    assert [e.type for e in events[:-1]] == ["answer"] * (len(events) - 1)
    assert events[-1].type == "cancelled"
    assert len(events) - 1 == agent.sent  # every token the agent gave was written


async def test_a_lost_lease_stops_the_agent_and_nothing_more_is_written(bus):
    attempt = await attempt_for(bus)
    agent = Tokens(None)
    running = asyncio.create_task(attempt.execute(agent))
    await produced(agent, 300)
    # Another attempt takes the run over: the fence changes under the writer's feet.
    await bus.redis.hset(bus.keys.run("s", attempt.job.run), "fence", "someone-else")
    await asyncio.wait_for(running, 5)
    written = len(await bus.history("s"))
    await asyncio.sleep(0.05)
    assert len(await bus.history("s")) == written
    assert written <= agent.sent
    assert all(decode_event(e).type == "answer" for e in await bus.history("s"))


async def test_a_burst_of_jobs_is_claimed_in_steps_and_every_one_runs(bus, monkeypatch):
    jobs = [Job(run=f"r{i}", session=f"s{i}", prompt="p") for i in range(40)]
    for job in jobs:
        await bus.submit(job)
    asked = []
    claim = bus.claim

    async def counted(consumer, count, block_ms):
        asked.append(count)
        return await claim(consumer, count, block_ms)

    monkeypatch.setattr(bus, "claim", counted)
    agent = Tokens(1)
    worker = Worker(bus, {"t": agent}, "t", concurrency=100, limits=LIMITS, max_attempts=3)
    stop = asyncio.Event()
    running = asyncio.create_task(worker.run(stop, drain_timeout=seconds(5)))
    try:
        async with asyncio.timeout(seconds(10)):
            while await bus.redis.xlen(bus.keys.jobs):  # a job leaves when its run ends
                await asyncio.sleep(0.01)
    finally:
        stop.set()
        await running
    assert max(asked) == CLAIM_BATCH < len(jobs)
    states = [await bus.run_state(job.run) for job in jobs]
    assert [state["status"] for state in states] == ["done"] * len(jobs)
