"""Usage on every ``done``, and per-user token budgets across frontends and workers.

Pure pieces with plain data (the estimator, the meter, the budget's arithmetic); the
reservation scripts and the reservations against a real redis-server and the embedded
Redis, and several runs reserving at once on one budget; an attempt in process; then real
frontends and two worker processes holding one user to a budget, and the openai agent
against the fake model server.

The step a budget may be overrun by, in total whatever the number of runs in flight:
a thought is written only once a reservation covers it, reservations grant nothing past
the limit, and the one grant that takes what remains may carry its thought past the
limit. So a window's count stays at most ``N - 1 + step``, the step being the largest
single thing one reservation covered: one thought, or a run's prompt with its history.
"""

from __future__ import annotations

import asyncio
import json
import random
import secrets
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import jwt
import pytest

from tests.conftest import Cluster, openai_env, start_cluster
from tests.fake_openai import FakeOpenAI, Reply
from tests.procs import RedisServer, seconds
from tests.wsclient import connect, greeting, recv_json, run_events
from thoughtwire.shared.bus import Bus
from thoughtwire.shared.grants import ANONYMOUS, BUDGET_GRACE, Budget, Grants
from thoughtwire.shared.keys import Keys
from thoughtwire.shared.protocol import Job, Thought, decode_event
from thoughtwire.shared.redis import RedisFactory
from thoughtwire.shared.settings import Settings
from thoughtwire.shared.vocab import StopReason
from thoughtwire.worker.attempt import RunAttempt, RunLimits
from thoughtwire.worker.usage import (
    CHARGE_TOKENS,
    RETRY_SECONDS,
    BudgetCharge,
    BudgetSpent,
    UsageMeter,
    estimate_tokens,
)

SECRET = "a-budget-secret-that-is-at-least-32-bytes-long"
DAY_BUDGET = 1000
SESSIONS = 4  # sessions prompting at once, each one run at a time: runs in flight


# --- the estimator and the meter: plain data ------------------------------------


def test_about_four_characters_make_a_token():
    assert [estimate_tokens("x" * n) for n in (0, 1, 4, 5, 8, 400)] == [0, 1, 1, 2, 2, 100]


def test_the_meter_counts_what_is_sent_and_what_is_written():
    history = [
        {"role": "user", "content": "a" * 8},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [{"function": {"arguments": "b" * 4}}],
        },
        {"role": "tool", "content": "c" * 4},
    ]
    meter = UsageMeter("p" * 4, history)
    assert meter.prompt_tokens == 5  # 4 + 8 + 4 + 4 characters
    added = [
        meter.count(Thought("thinking", "t" * 8, {"delta": True})),
        meter.count(Thought("answer", "a" * 2, {"delta": True})),
        meter.count(Thought("answer", "a" * 2, {"delta": True})),  # 4 characters: one token
        meter.count(Thought("tool_input", "{}" * 4, {"delta": True, "call_id": "c1"})),
        meter.count(Thought("action", "calc({})", {"call_id": "c1"})),  # came as tool_input
        meter.count(Thought("action", "Searching: x", {})),  # no tool_input: counted
        meter.count(Thought("observation", "o" * 8, {"call_id": "c1"})),  # back to the model
        meter.count(Thought("block_end", "", {"block": "b1"})),
    ]
    assert added == [2, 1, 0, 2, 0, 3, 2, 0]
    assert sum(added) == meter.total_tokens - 5
    assert meter.usage() == {
        "prompt_tokens": 7,
        "completion_tokens": 8,
        "total_tokens": 15,
        "estimated": True,
    }


def test_the_meter_does_not_depend_on_how_the_text_was_cut():
    whole, pieces = UsageMeter("p"), UsageMeter("p")
    whole.count(Thought("answer", "x" * 100))
    for _ in range(100):
        pieces.count(Thought("answer", "x", {"delta": True}))
    assert whole.usage() == pieces.usage()


def test_counts_the_model_server_reported_are_used_as_they_are():
    meter = UsageMeter("p" * 400)
    reported = {"prompt_tokens": 11, "completion_tokens": 7, "total_tokens": 18}
    assert meter.usage(reported) == {**reported, "estimated": False}
    assert meter.usage(None)["estimated"] is True


def test_a_budget_is_spent_at_its_limit_in_any_window():
    budget = Budget(per_minute=100, per_day=1000)
    assert budget.enabled and not Budget().enabled
    assert not budget.spent((99, 999))
    assert budget.spent((100, 100)) and budget.spent((5, 1000))
    assert not Budget(per_day=10).spent((10**6, 9))  # no minute limit


def test_the_budget_report_names_each_window_and_when_it_resets():
    now = 1_700_000_030.5  # 30.5 s into a minute
    report = Budget(per_day=1000).report((40, 400), now)
    assert report["minute"] == {
        "limit": None,
        "used": 40,
        "remaining": None,
        "resets_at": (int(now) // 60 + 1) * 60_000,
    }
    assert report["day"] == {
        "limit": 1000,
        "used": 400,
        "remaining": 600,
        "resets_at": (int(now) // 86_400 + 1) * 86_400_000,
    }
    assert Budget(per_day=10).report((0, 12), now)["day"]["remaining"] == 0


# --- the reservation scripts and reservations, against Redis ----------------------


@pytest.fixture
def bus(redis_client, prefix):
    return Bus(redis_client, Keys(prefix), log_maxlen=10_000, log_ttl=60)


NOW = 1_700_000_000.0  # 20 s into a minute


async def test_charges_add_up_per_window_and_expire_after_it(bus):
    grants, now = bus.grants, NOW
    assert await grants.budget_used("u", now) == (0, 0)
    assert await grants.charge("u", 30, now) == (30, 30)
    assert await grants.charge("u", 12, now + 1) == (42, 42)
    assert await grants.budget_used("u", now) == (42, 42)
    # The next minute starts from nothing; the day goes on.
    assert await grants.charge("u", 5, now + 60) == (5, 47)
    assert await grants.budget_used("someone else", now) == (0, 0)
    minute_key = bus.keys.user_budget("u", "minute", int(now // 60))
    day_key = bus.keys.user_budget("u", "day", int(now // 86_400))
    assert 0 < await bus.redis.ttl(minute_key) <= 60 + BUDGET_GRACE
    assert 60 + BUDGET_GRACE < await bus.redis.ttl(day_key) <= 86_400 + BUDGET_GRACE


async def test_a_reservation_grants_what_remains_and_nothing_past_the_limit(bus):
    grants, budget = bus.grants, Budget(per_minute=100, per_day=1000)
    assert await grants.reserve("u", budget, 5, 64, NOW) == (64, 0)
    assert await grants.reserve("u", budget, 5, 64, NOW) == (36, 0)  # the minute's rest
    assert await grants.budget_used("u", NOW) == (100, 100)
    assert await grants.reserve("u", budget, 1, 64, NOW) == (0, 0)  # nothing remains
    assert await grants.budget_used("u", NOW) == (100, 100)
    # The next minute has room again; the day holds its count.
    assert await grants.reserve("u", budget, 1, 64, NOW + 60) == (64, 0)
    assert await grants.budget_used("u", NOW + 60) == (64, 164)
    minute_key = bus.keys.user_budget("u", "minute", int(NOW // 60))
    assert 0 < await bus.redis.ttl(minute_key) <= 60 + BUDGET_GRACE


async def test_the_last_grant_carries_its_thought_past_the_limit_once(bus):
    grants, budget = bus.grants, Budget(per_day=100)
    assert await grants.reserve("u", budget, 90, 90, NOW) == (90, 0)
    # 10 remain and the thought needs 30: the grant takes the 10, the thought goes 20 over.
    assert await grants.reserve("u", budget, 30, 64, NOW) == (10, 20)
    assert (await grants.budget_used("u", NOW))[1] == 120
    assert await grants.reserve("u", budget, 1, 64, NOW) == (0, 0)


async def test_giving_back_never_goes_below_zero_nor_revives_a_window(bus):
    grants, budget = bus.grants, Budget(per_day=100)
    await grants.reserve("u", budget, 1, 64, NOW)
    await grants.give_back("u", 40, NOW)
    assert await grants.budget_used("u", NOW) == (24, 24)
    await grants.give_back("u", 40, NOW)
    assert await grants.budget_used("u", NOW) == (0, 0)
    await grants.give_back("u", 5, NOW + 86_400)  # a window nobody charged: nothing made
    assert await bus.redis.exists(bus.keys.user_budget("u", "day", int(NOW // 86_400) + 1)) == 0


def test_a_users_budget_counters_share_one_hash_slot():
    keys = Keys("tw")
    names = (
        keys.user_budget("u", "minute", 1),
        keys.user_budget("u", "day", 1),
        keys.user_runs("u"),
    )
    assert len({name[name.index("{") : name.index("}")] for name in names}) == 1


class Clock:
    """Unix seconds that move only when a test moves them."""

    def __init__(self, now: float = NOW) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def counting_reservations(grants: Grants, monkeypatch: pytest.MonkeyPatch) -> list[tuple]:
    """Every reservation asked for: (need, want, granted, over)."""
    calls: list[tuple] = []
    reserve = grants.reserve

    async def counted(user: str, budget: Budget, need: int, want: int, now: float):
        granted, over = await reserve(user, budget, need, want, now)
        calls.append((need, want, granted, over))
        return granted, over

    monkeypatch.setattr(grants, "reserve", counted)
    return calls


async def day_used(grants: Grants, user: str = "u", now: float = NOW) -> int:
    return (await grants.budget_used(user, now))[1]


async def test_reservations_come_in_chunks_and_unused_goes_back(bus, monkeypatch):
    calls = counting_reservations(bus.grants, monkeypatch)
    charge = BudgetCharge(bus.grants, "u", Budget(per_day=10_000), clock=Clock())
    await charge.start(10)
    for _ in range(CHARGE_TOKENS * 3):  # a token each: a Redis call per chunk
        await charge.cover(1)
    chunk = CHARGE_TOKENS
    assert calls == [(10, chunk, chunk, 0)] + [(1, chunk, chunk, 0)] * 3
    held = charge.held
    assert held == 4 * chunk - 10 - 3 * chunk
    await charge.cover(held + 2 * chunk)  # lacks more than a chunk: what it lacks, whole
    assert calls[-1] == (2 * chunk, 2 * chunk, 2 * chunk, 0) and charge.held == 0
    await charge.cover(1)
    assert charge.written == 10 + chunk * 3 + held + 2 * chunk + 1
    assert await day_used(bus.grants) == charge.charged == charge.written + charge.held
    await charge.settle()
    assert charge.held == 0
    assert await day_used(bus.grants) == charge.charged == charge.written


async def test_nothing_remaining_stops_the_run_before_the_thought(bus):
    charge = BudgetCharge(bus.grants, None, Budget(per_day=100), clock=Clock())
    await charge.start(10)  # 64 reserved
    await charge.cover(50)  # 4 left
    # 36 remain and the thought lacks 41: the last grant takes them, 5 over the limit.
    await charge.cover(45)
    assert (charge.written, charge.held, charge.charged) == (105, 0, 105)
    with pytest.raises(BudgetSpent):
        await charge.cover(1)  # nothing remains: not written
    assert charge.written == 105
    await charge.settle()
    assert (await bus.grants.budget_used(ANONYMOUS, NOW))[1] == 105
    late = BudgetCharge(bus.grants, None, Budget(per_day=100), clock=Clock())
    with pytest.raises(BudgetSpent):
        await late.start(1)  # spent before it starts
    await late.settle()
    assert (await bus.grants.budget_used(ANONYMOUS, NOW))[1] == 105


async def test_the_model_servers_total_replaces_the_estimate_at_the_end(bus):
    charge = BudgetCharge(bus.grants, "u", Budget(per_day=10_000), clock=Clock())
    await charge.cover(70)
    await charge.settle(reported_total=100)
    assert charge.charged == 100 == await day_used(bus.grants)
    second = BudgetCharge(bus.grants, "u", Budget(per_day=10_000), clock=Clock())
    await second.cover(70)
    await second.settle(reported_total=50)  # an estimate above the report is not given back
    assert second.charged == 70
    assert await day_used(bus.grants) == 170


async def test_a_reservation_belongs_to_the_windows_it_was_granted_in(bus):
    clock = Clock(NOW)
    charge = BudgetCharge(bus.grants, "u", Budget(per_minute=1000), clock=clock)
    await charge.cover(10)  # 64 reserved in this minute, 54 unused
    clock.now += 60
    await charge.cover(10)  # the 54 go back to the minute that is over; 64 in the new one
    assert await bus.grants.budget_used("u", NOW) == (10, 74)
    assert await bus.grants.budget_used("u", NOW + 60) == (64, 74)
    await charge.settle()
    assert await bus.grants.budget_used("u", NOW + 60) == (10, 20)


async def test_while_redis_is_away_the_run_goes_on_and_pays_later(bus, monkeypatch):
    clock = Clock(NOW)
    charge = BudgetCharge(bus.grants, "u", Budget(per_day=1000), clock=clock)
    reserve = bus.grants.reserve

    async def away(*args: Any) -> tuple[int, int]:
        raise ConnectionError("redis is away")

    monkeypatch.setattr(bus.grants, "reserve", away)
    await charge.cover(30)  # fails open: owed
    clock.now += RETRY_SECONDS / 2
    await charge.cover(30)  # not asked again yet
    assert (charge.owed, charge.written, charge.charged) == (60, 60, 0)
    monkeypatch.setattr(bus.grants, "reserve", reserve)
    clock.now += RETRY_SECONDS
    await charge.cover(5)  # the owed tokens go with the next reservation
    assert charge.owed == 0 and charge.charged == 65 + charge.held
    await charge.settle()
    assert await day_used(bus.grants) == 65


# --- several runs reserving at once on one budget, real redis-server --------------


@pytest.fixture
async def server_bus(redis_server: RedisServer, prefix: str) -> AsyncIterator[Bus]:
    redis = RedisFactory(Settings(redis_url=redis_server.url, redis_pool_size=8)).commands()
    yield Bus(redis, Keys(prefix), log_maxlen=10_000, log_ttl=60)
    await redis.aclose()


async def spend(charge: BudgetCharge, sizes: list[int]) -> bool:
    """Cover thoughts of ``sizes`` in turn; whether the budget stopped it."""
    try:
        await charge.start(sizes[0])
        for size in sizes[1:]:
            await charge.cover(size)
            await asyncio.sleep(0)  # a thought's write: the other runs go on
    except BudgetSpent:
        return True
    return False


@pytest.mark.parametrize("runs", [4, 16])
async def test_runs_in_flight_overrun_a_budget_by_one_thought_in_total(
    server_bus, monkeypatch, runs
):
    budget, n = Budget(per_day=1000), 1000
    calls = counting_reservations(server_bus.grants, monkeypatch)
    rng = random.Random(runs)
    sizes = [[rng.randint(1, 40) for _ in range(200)] for _ in range(runs)]
    charges = [BudgetCharge(server_bus.grants, "u", budget, clock=Clock()) for _ in sizes]
    stopped = await asyncio.wait_for(
        asyncio.gather(*(spend(c, s) for c, s in zip(charges, sizes, strict=True))),
        seconds(30),
    )
    assert all(stopped)
    # Every run is stopped and none has given anything back yet.
    granted = sum(g for _n, _w, g, _o in calls)
    overs = [o for *_rest, o in calls if o]
    assert granted == n  # the whole budget was granted, and never a token more
    step = max(max(s) for s in sizes)
    assert len(overs) <= 1 and sum(overs) <= step - 1
    for charge in charges:
        await charge.settle()
    used = await day_used(server_bus.grants)
    written = sum(c.written for c in charges)
    print(f"{runs} runs on a budget of {n}: granted {granted}, over {overs}, used {used}")
    assert used == written <= n - 1 + step


async def test_runs_that_end_early_give_back_and_the_bound_holds(server_bus):
    budget, n = Budget(per_day=500), 500
    rng = random.Random(7)
    # Short runs that end (done) and give back among long ones the budget stops.
    runs = [[rng.randint(1, 30) for _ in range(rng.choice((3, 300)))] for _ in range(24)]
    charges = [BudgetCharge(server_bus.grants, "u", budget, clock=Clock()) for _ in runs]

    async def later(charge: BudgetCharge, sizes: list[int], delay: int) -> bool:
        for _ in range(delay):
            await asyncio.sleep(0)
        try:
            return await spend(charge, sizes)
        finally:
            await charge.settle()

    stopped = await asyncio.wait_for(
        asyncio.gather(
            *(later(c, s, i * 3) for i, (c, s) in enumerate(zip(charges, runs, strict=True)))
        ),
        seconds(30),
    )
    used = await day_used(server_bus.grants)
    print(f"{len(runs)} runs, {sum(stopped)} stopped, on a budget of {n}: used {used}")
    assert any(stopped) and not all(stopped)
    assert used == sum(c.written for c in charges) <= n - 1 + max(max(s) for s in runs)


# --- an attempt, in process ------------------------------------------------------


class Tokens:
    """Streams ``count`` answer deltas of ``size`` characters."""

    def __init__(self, count: int, size: int = 8) -> None:
        self.count, self.size, self.sent = count, size, 0

    async def run(self, turn: Any) -> AsyncIterator[Thought]:
        for _ in range(self.count):
            self.sent += 1
            yield Thought("answer", "x" * self.size, {"delta": True})


async def attempt_for(bus: Bus, budget: Budget, session: str = "s", user: str = "u") -> RunAttempt:
    job = Job(run=f"r-{session}", session=session, prompt="p" * 40, user=user)
    await bus.submit(job)
    start = await bus.start(job, "w1", 10_000, 3)
    limits = RunLimits(
        lease_ms=10_000, redis_retry_seconds=1.0, disconnect_grace=5.0, budget=budget
    )
    return RunAttempt(bus, job, "0-1", start.fence, "w1", limits)


async def test_done_carries_estimated_usage_and_no_budget_asks_redis_nothing(bus, monkeypatch):
    asked = []
    for name in ("reserve", "give_back", "charge", "budget_used"):
        monkeypatch.setattr(bus.grants, name, lambda *a, name=name: asked.append(name))
    attempt = await attempt_for(bus, Budget())
    await attempt.execute(Tokens(10))
    done = json.loads((await bus.history("s"))[-1])
    assert done["type"] == "done"
    assert done["usage"] == {
        "prompt_tokens": 10,
        "completion_tokens": 20,
        "total_tokens": 30,
        "estimated": True,
    }
    assert asked == []


async def test_a_run_that_crosses_the_budget_ends_with_a_budget_error(bus):
    attempt = await attempt_for(bus, Budget(per_day=200))
    agent = Tokens(1000)
    await attempt.execute(agent)
    events = [json.loads(e) for e in await bus.history("s")]
    assert events[-1]["type"] == "error" and events[-1]["code"] == "budget"
    assert agent.sent < 1000
    used = (await bus.grants.budget_used("u", time.time()))[1]
    # Thoughts of 2 tokens after a prompt of 10 fill the budget exactly: no step over it.
    assert used == 200
    # What the run wrote was charged, and no more: the thought refused was not counted.
    answered = sum(len(e["content"]) for e in events if e["type"] == "answer")
    assert used == attempt.usage.meter.total_tokens == 10 + estimate_tokens("x" * answered)
    # The next run of the same user does not start.
    again = await attempt_for(bus, Budget(per_day=200), session="s2")
    later = Tokens(10)
    await again.execute(later)
    assert later.sent == 0
    assert [decode_event(e).type for e in await bus.history("s2")] == ["error"]


class AsksHalfway:
    """Writes ``count`` answer deltas, asks to run a tool, then writes ``count`` more;
    a resumed attempt goes on from the question, as a checkpointing agent does."""

    def __init__(self, count: int, size: int = 8) -> None:
        self.count, self.size = count, size

    async def run(self, turn: Any) -> AsyncIterator[Thought]:
        if turn.resume is None:
            for _ in range(self.count):
                yield Thought("answer", "x" * self.size, {"delta": True})
            yield Thought("action", "search", {"tool": "search", "arguments": {}, "call_id": "c1"})
        await turn.ask("c1", "search", {}, {"at": "search"})
        for _ in range(self.count):
            yield Thought("answer", "y" * self.size, {"delta": True})


async def test_a_run_handed_over_while_waiting_gives_back_its_reservation_and_counts_it_all(bus):
    budget = Budget(per_day=10_000)
    attempt = await attempt_for(bus, budget, session="w")
    job = attempt.job
    running = asyncio.create_task(attempt.execute(AsksHalfway(10)))
    async with asyncio.timeout(seconds(5)):
        while await bus.approval(job) is None:
            await asyncio.sleep(0.01)
    attempt.stop(StopReason.SHUTDOWN)  # a draining worker hands the run over
    async with asyncio.timeout(seconds(5)):
        await running
    before = attempt.usage.meter.total_tokens  # the prompt, 80 characters and the action
    assert before == 10 + estimate_tokens("x" * 80 + "search")
    # What it reserved and did not write went back: the counters hold what it wrote.
    assert await day_used(bus.grants, now=time.time()) == before
    # The next attempt goes on from the wait, with the counts so far.
    start = await bus.start(job, "w2", 10_000, 3)
    assert await bus.decide(job.session, job.run, "c1", "allow", None, "user")
    resumed = RunAttempt(
        bus, job, "0-2", start.fence, "w2", attempt.limits, waiting=await bus.approval(job)
    )
    async with asyncio.timeout(seconds(5)):
        await resumed.execute(AsksHalfway(10))
    done = json.loads((await bus.history("w"))[-1])
    assert done["type"] == "done"
    assert done["usage"]["total_tokens"] == before + 20
    assert done["usage"]["prompt_tokens"] == 10
    # The prompt was reserved once: the budget holds what the run wrote, no more.
    assert await day_used(bus.grants, now=time.time()) == before + 20


# --- real frontends, two worker processes ------------------------------------------


def token(user: str) -> str:
    claims = {"sub": user, "exp": int(time.time() + 600)}
    return jwt.encode(claims, SECRET, algorithm="HS256")


@pytest.fixture(scope="module")
def budgeted(redis_server: RedisServer, logdir: Any) -> Iterator[Cluster]:
    """Two frontends and two workers, one day budget per user, authentication on."""
    c = start_cluster(
        redis_server,
        logdir,
        frontends=2,
        workers=2,
        JWT_SECRET=SECRET,
        THOUGHTWIRE_BUDGET_TOKENS_PER_DAY=str(DAY_BUDGET),
        THOUGHTWIRE_SIM_STEP_DELAY="0.01",
        THOUGHTWIRE_SIM_ANSWER_TOKENS="60",
        THOUGHTWIRE_SIM_TOKENS_PER_SECOND="300",
        THOUGHTWIRE_MAX_RUNS_PER_USER="50",
        THOUGHTWIRE_RATE_LIMIT="10000",
    )
    yield c
    c.stop()


Run = tuple[str, list[dict[str, Any]]]  # a prompt and its run's events


async def prompt_until_refused(url: str, limit: int = 40) -> tuple[list[Run], dict]:
    """Prompt one run at a time until the frontend refuses; the runs and the refusal."""
    runs: list[Run] = []
    async with connect(url) as ws:
        await greeting(ws)
        for i in range(limit):
            prompt, events = f"question {i}", []
            await ws.send(json.dumps({"type": "prompt", "content": prompt}))
            while True:
                frame = await recv_json(ws, timeout=20)
                if frame["type"] == "error" and "seq" not in frame:
                    return runs, frame
                if "seq" in frame:
                    events.append(frame)
                    if frame["type"] in ("done", "error", "cancelled"):
                        break
            runs.append((prompt, events))
    raise AssertionError(f"no refusal after {limit} runs")


COUNTED = frozenset({"thinking", "answer", "tool_input", "action", "observation"})


def largest_step(runs: list[Run]) -> int:
    """The most tokens one reservation of a session's runs covered, at most: a thought,
    or a run's prompt with its history (the prompts and answers of the runs before it)."""
    step, history = 0, 0
    for prompt, events in runs:
        thoughts = [str(e.get("content", "")) for e in events if e["type"] in COUNTED]
        step = max(step, estimate_tokens("x" * (len(prompt) + history)))
        step = max([step, *(estimate_tokens(text) for text in thoughts)])
        if events[-1]["type"] == "done":
            answer = "".join(str(e["content"]) for e in events if e["type"] == "answer")
            history += len(prompt) + len(answer)
    return step


async def budget_of(cluster: Cluster, user: str | None, frontend: int = 0) -> dict[str, Any]:
    """``GET /v1/budget`` as ``user`` (None: without a token)."""
    headers = {} if user is None else {"Authorization": f"Bearer {token(user)}"}
    async with httpx.AsyncClient(timeout=5) as client:
        reply = await client.get(cluster.frontends[frontend].http + "/v1/budget", headers=headers)
    assert reply.status_code == 200, reply.text
    body: dict[str, Any] = reply.json()
    return body


async def test_one_budget_holds_across_two_workers_and_frontends(budgeted):
    user = f"spender-{secrets.token_hex(3)}"
    urls = [
        f"{budgeted.frontends[i % 2].ws}/ws/agent-thoughts?token={token(user)}"
        for i in range(SESSIONS)
    ]
    results = await asyncio.wait_for(
        asyncio.gather(*(prompt_until_refused(url) for url in urls)), seconds(120)
    )
    for _runs, refusal in results:
        assert refusal["code"] == "budget", refusal
    events = [e for runs, _ in results for _prompt, run in runs for e in run]
    ends = [e for e in events if e["type"] in ("done", "error")]
    assert all(e["type"] == "done" or e.get("code") == "budget" for e in ends), ends
    done = [e for e in ends if e["type"] == "done"]
    assert done and all(e["usage"]["estimated"] is True for e in done)
    assert all(e["usage"]["total_tokens"] > 0 for e in done)
    # Every run has ended (each socket saw its last run's end before the refusal).
    report = await budget_of(budgeted, user, frontend=1)
    used = report["day"]["used"]
    # One step over the budget at most, in total, for all the runs in flight.
    step = max(largest_step(runs) for runs, _ in results)
    assert DAY_BUDGET <= used <= DAY_BUDGET - 1 + step, (report, step)
    # What the runs wrote and what was charged agree: done's usage plus what the
    # stopped runs counted (not on the wire) cannot exceed the charge.
    assert sum(e["usage"]["total_tokens"] for e in done) <= used
    # Both workers ran some of the user's runs.
    for worker in budgeted.workers:
        assert "run started" in worker.output(), worker.output()[-2000:]
    # Over HTTP too: 429, code budget.
    async with httpx.AsyncClient(timeout=5) as client:
        refused = await client.post(
            budgeted.frontends[1].http + "/v1/jobs",
            json={"prompt": "one more"},
            headers={"Authorization": f"Bearer {token(user)}"},
        )
    assert refused.status_code == 429
    assert refused.json()["code"] == "budget"
    stopped = sum(e["type"] == "error" for e in ends)
    print(
        f"budget {DAY_BUDGET}, {SESSIONS} sessions at once: charged {used} "
        f"(over by {used - DAY_BUDGET}, step {step}); {len(ends)} runs, {stopped} stopped by it"
    )


async def test_the_budget_endpoint_reports_each_window(budgeted):
    user = f"reader-{secrets.token_hex(3)}"
    before = time.time()
    report = await budget_of(budgeted, user)
    assert report["day"]["limit"] == DAY_BUDGET
    assert report["day"]["used"] == 0
    assert report["day"]["remaining"] == DAY_BUDGET
    assert report["day"]["resets_at"] == (int(before) // 86_400 + 1) * 86_400_000
    assert report["minute"]["limit"] is None and report["minute"]["remaining"] is None
    assert report["minute"]["resets_at"] > before * 1000
    async with httpx.AsyncClient(timeout=5) as client:
        no_token = await client.get(budgeted.frontends[0].http + "/v1/budget")
    assert no_token.status_code == 401


async def test_a_user_under_budget_is_not_refused_and_done_carries_usage(budgeted):
    user = f"light-{secrets.token_hex(3)}"
    url = f"{budgeted.frontends[0].ws}/ws/agent-thoughts?token={token(user)}"
    async with connect(url) as ws:
        await greeting(ws)
        await ws.send("hello")
        events = await run_events(ws, timeout=30)
    done = events[-1]
    assert done["type"] == "done"
    assert done["usage"]["estimated"] is True
    assert (await budget_of(budgeted, user))["day"]["used"] == done["usage"]["total_tokens"]


# --- the openai agent: the model server's counts --------------------------------


@pytest.fixture(scope="module")
def modelled(redis_server: RedisServer, logdir: Any, llm: FakeOpenAI) -> Iterator[Cluster]:
    c = start_cluster(
        redis_server,
        logdir,
        frontends=1,
        **openai_env(llm),
        THOUGHTWIRE_OPENAI_MODEL="test-model",
        THOUGHTWIRE_BUDGET_TOKENS_PER_DAY="100000",
    )
    yield c
    c.stop()


async def ask(cluster: Cluster) -> dict[str, Any]:
    async with connect(cluster.frontends[0].ws + "/ws/agent-thoughts") as ws:
        await greeting(ws)
        await ws.send("what is 2 + 2?")
        events = await run_events(ws, timeout=30)
    assert events[-1]["type"] == "done", events[-1]
    return events[-1]


async def test_done_has_the_servers_counts_when_it_reports_them(modelled, llm):
    reported = {"prompt_tokens": 21, "completion_tokens": 3, "total_tokens": 24}
    llm.replies.append(Reply.text("it ", "is ", "4", usage=reported))
    before = (await budget_of(modelled, None))["day"]["used"]
    done = await ask(modelled)
    assert done["usage"] == {**reported, "estimated": False}
    # The counters took the server's total (the estimate was smaller).
    assert (await budget_of(modelled, None))["day"]["used"] - before == 24
    llm.replies.append(Reply.text("four"))  # no usage reported
    done = await ask(modelled)
    assert done["usage"]["estimated"] is True
    assert done["usage"]["completion_tokens"] == 1
