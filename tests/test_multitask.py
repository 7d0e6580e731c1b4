"""Run control: a prompt while its session has an unfinished run (reject, enqueue, interrupt).

First the scripts against Redis (admission, the order runs start in, a lost run ahead)
and the worker's parked jobs; then the whole system: two frontends, real workers, two
prompts for one session sent through different frontends within a few milliseconds.
"""

from __future__ import annotations

import orjson
import pytest

from thoughtwire.shared.bus import Bus, Busy
from thoughtwire.shared.keys import Keys
from thoughtwire.shared.protocol import (
    Job,
    Prompt,
    ProtocolError,
    Thought,
    parse_client_message,
)
from thoughtwire.shared.vocab import Multitask, Verdict
from thoughtwire.worker.parking import Parking

# --- the scripts, against Redis -------------------------------------------------------


@pytest.fixture
def bus(redis_client, prefix):
    return Bus(redis_client, Keys(prefix), log_maxlen=50, log_ttl=60)


def job(run: str, multitask: Multitask = Multitask.ENQUEUE, session: str = "s") -> Job:
    return Job(run=run, session=session, prompt="p", multitask=multitask)


async def end(bus: Bus, j: Job, fence: str, terminal: str = "done") -> None:
    status = {"done": "done", "cancelled": "cancelled", "error": "failed"}[terminal]
    heads = [bus.encode(j, Thought(terminal, ""))]
    assert await bus.submit_encoded(j, heads, fence=fence, first=1, status=status) > 0


async def order(bus: Bus, run: str, session: str = "s") -> int:
    return int(await bus.redis.hget(bus.keys.run(session, run), "order"))


async def test_enqueued_runs_start_one_at_a_time_in_arrival_order(bus):
    a, b, c = job("a"), job("b"), job("c")
    for j in (a, b, c):
        await bus.submit(j)
    assert [await order(bus, r) for r in "abc"] == [1, 2, 3]
    waiting = await bus.start(c, "w", 10_000, 3)
    assert (waiting.verdict, waiting.waits_for) == (Verdict.WAIT, "a")
    assert (await bus.run_state("c"))["status"] == "queued"  # waiting is not an attempt
    first = await bus.start(a, "w", 10_000, 3)
    assert first.verdict == Verdict.RUN
    assert (await bus.start(b, "w", 10_000, 3)).waits_for == "a"
    await end(bus, a, first.fence)
    assert (await bus.start(c, "w", 10_000, 3)).waits_for == "b"
    second = await bus.start(b, "w", 10_000, 3)
    assert (second.verdict, second.attempt) == (Verdict.RUN, 1)
    await end(bus, b, second.fence, "error")
    assert (await bus.start(c, "w", 10_000, 3)).verdict == Verdict.RUN


async def test_other_sessions_do_not_wait(bus):
    await bus.submit(job("a"))
    other = job("b", session="t")
    await bus.submit(other)
    assert (await bus.start(other, "w", 10_000, 3)).verdict == Verdict.RUN


async def test_reject_refuses_while_a_run_is_unfinished_and_names_it(bus):
    a = job("a")
    await bus.submit(a)
    with pytest.raises(Busy) as refused:
        await bus.submit(job("b", Multitask.REJECT))
    assert refused.value.run == "a"
    assert await bus.run_state("b") is None  # nothing of it was kept
    assert await bus.redis.xlen(bus.keys.jobs) == 1
    attempt = await bus.start(a, "w", 10_000, 3)
    await end(bus, a, attempt.fence)
    assert await bus.submit(job("b", Multitask.REJECT)) == ("b", "s", True)


async def test_a_refused_prompt_leaves_its_idempotency_key_free(bus):
    await bus.submit(job("a"))
    with pytest.raises(Busy):
        await bus.submit(job("b", Multitask.REJECT), "k", user="u")
    assert await bus.redis.get(bus.keys.idempotency("u", "k")) is None


async def test_interrupt_cancels_the_earlier_runs_and_waits_for_them(bus):
    a, b = job("a"), job("b")
    await bus.submit(a)
    await bus.submit(b)
    running = await bus.start(a, "w", 10_000, 3)
    control = bus.redis.pubsub()
    await control.subscribe(bus.worker_control)
    await control.get_message(timeout=1)  # the subscribe confirmation
    try:
        await bus.submit(job("c", Multitask.INTERRUPT))
        message = await control.get_message(timeout=1)
    finally:
        await control.aclose()
    assert orjson.loads(message["data"]) == {"cancel": ["a", "b"], "session": "s"}
    assert await bus.renew(a, running.fence, 10_000) == 1  # the attempt is told to stop
    assert (await bus.start(b, "w", 10_000, 3)).verdict == Verdict.CANCEL  # no wait to end
    assert (await bus.start(job("c"), "w", 10_000, 3)).waits_for == "a"


async def test_a_retried_admission_changes_nothing(bus):
    await bus.submit(job("a"))
    b = job("b", Multitask.INTERRUPT)
    await bus.submit(b)
    await bus.submit(b)  # a retry after a lost reply
    assert await order(bus, "b") == 2
    assert await bus.redis.zcard(bus.keys.session_queue("s")) == 2


async def test_a_run_ended_as_lost_no_longer_holds_the_queue(bus):
    a, b = job("a"), job("b")
    await bus.submit(a)
    await bus.submit(b)
    assert not await bus.dequeue("s", "a")  # queued: it will run
    await bus.redis.delete(bus.keys.run("s", "a"))  # Redis lost it
    assert await bus.end_lost("s", "a", Thought("error", "lost"), "failed")
    assert (await bus.start(b, "w", 10_000, 3)).verdict == Verdict.RUN


async def test_a_run_whose_state_is_gone_can_be_taken_out_of_the_queue(bus):
    await bus.submit(job("a"))
    b = job("b")
    await bus.submit(b)
    await bus.redis.delete(bus.keys.run("s", "a"))
    assert await bus.dequeue("s", "a")
    assert (await bus.start(b, "w", 10_000, 3)).verdict == Verdict.RUN


# --- messages and jobs -----------------------------------------------------------------


def test_a_prompt_may_say_what_to_do_while_a_run_is_unfinished():
    frame = '{"type": "prompt", "content": "hi", "multitask": "interrupt"}'
    assert parse_client_message(frame, max_prompt_chars=10) == Prompt(
        "hi", None, Multitask.INTERRUPT
    )
    assert parse_client_message("hi", max_prompt_chars=10) == Prompt("hi")
    with pytest.raises(ProtocolError) as refused:
        parse_client_message(
            '{"type": "prompt", "content": "hi", "multitask": "x"}', max_prompt_chars=10
        )
    assert refused.value.code == "bad_message"


def test_a_job_carries_its_policy_and_older_jobs_decode_as_enqueued():
    j = job("a", Multitask.REJECT)
    assert Job.decode(j.encode()) == j
    older = orjson.loads(j.encode())
    del older["multitask"]
    assert Job.decode(orjson.dumps(older)).multitask == Multitask.ENQUEUE


# --- parked jobs ---------------------------------------------------------------------


async def test_a_parked_job_is_due_when_the_run_it_waits_for_ends_or_it_is_cancelled(bus):
    calls = []
    parking = Parking(bus, "w", lease_seconds=1.0, on_due=lambda: calls.append(1))
    assert parking.park("1-1", job("b"), "a")
    assert parking.park("1-2", job("c"), "a")
    parking.ended("x")
    assert parking.take_due(10) == [] and not calls
    parking.ended("a")
    assert [j.run for _, j in parking.take_due(1)] == ["b"]  # as far as there is room
    assert [j.run for _, j in parking.take_due(5)] == ["c"]
    assert len(parking) == 0 and calls
    parking.park("1-3", job("d"), "c")
    parking.cancelled(["d"])
    assert [j.run for _, j in parking.take_due(5)] == ["d"]


async def test_a_job_parked_after_its_wait_ended_is_due_at_once(bus):
    parking = Parking(bus, "w", lease_seconds=1.0, on_due=lambda: None)
    parking.ended("a")  # the announcement came before the START that said "wait"
    parking.park("1-1", job("b"), "a")
    assert [j.run for _, j in parking.take_due(5)] == ["b"]


async def test_parking_is_bounded(bus):
    parking = Parking(bus, "w", lease_seconds=1.0, on_due=lambda: None, limit=1)
    assert parking.park("1-1", job("b"), "a")
    assert not parking.park("1-2", job("c"), "a")
    assert parking.park("1-1", job("b"), "a")  # the same job again takes no more room


async def test_a_parked_job_behind_a_lost_run_is_freed_after_a_lease(bus):
    a, b = job("a"), job("b")
    await bus.submit(a)
    await bus.submit(b)
    await bus.ensure_group()
    claimed = await bus.claim("w", 2, 100)
    entry = next(entry_id for entry_id, j in claimed if j.run == "b")
    assert (await bus.start(b, "w", 10_000, 3)).waits_for == "a"
    parking = Parking(bus, "w", lease_seconds=1.0, on_due=lambda: None)
    parking.park(entry, b, "a")
    await bus.redis.delete(bus.keys.run("s", "a"))  # lost, and nobody ends it
    await parking.check(now=100.0)  # first seen missing: an attempt alive would take it back
    assert (await bus.start(b, "w", 10_000, 3)).verdict == Verdict.WAIT
    parking.take_due(5)
    parking.park(entry, b, "a")
    await parking.check(now=100.5)  # checked again, and parked anew: still waiting
    assert (await bus.start(b, "w", 10_000, 3)).verdict == Verdict.WAIT
    parking.take_due(5)
    parking.park(entry, b, "a")
    await parking.check(now=101.0)
    assert [j.run for _, j in parking.take_due(5)] == ["b"]
    assert (await bus.start(b, "w", 10_000, 3)).verdict == Verdict.RUN
