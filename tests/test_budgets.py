"""Usage on every ``done``, and per-user token budgets across frontends and workers.

Pure pieces with plain data (the estimator, the meter, the budget's arithmetic); the
charge script and the batched charges against a real redis-server and the embedded
Redis; an attempt in process; then real frontends and two worker processes holding one
user to a budget, and the openai agent against the fake model server.

The step a run may overrun a budget by: a charge is due at ``CHARGE_TOKENS`` pending
tokens, so a charge carries at most ``CHARGE_TOKENS - 1`` tokens plus one thought's.
The simulated agent's largest thought here is under 16 tokens, so ``STEP`` is
``CHARGE_TOKENS + 16``; every run in flight when the budget is crossed can add one.
"""

from __future__ import annotations

import asyncio
import json
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
from thoughtwire.worker.attempt import RunAttempt, RunLimits
from thoughtwire.worker.usage import (
    CHARGE_SECONDS,
    CHARGE_TOKENS,
    BudgetCharge,
    BudgetSpent,
    UsageMeter,
    estimate_tokens,
)

STEP = CHARGE_TOKENS + 16
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


# --- the charge script, against Redis -------------------------------------------


@pytest.fixture
def bus(redis_client, prefix):
    return Bus(redis_client, Keys(prefix), log_maxlen=10_000, log_ttl=60)


async def test_charges_add_up_per_window_and_expire_after_it(bus):
    grants, now = bus.grants, 1_700_000_000.0
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


def test_a_users_budget_counters_share_one_hash_slot():
    keys = Keys("tw")
    names = (
        keys.user_budget("u", "minute", 1),
        keys.user_budget("u", "day", 1),
        keys.user_runs("u"),
    )
    assert len({name[name.index("{") : name.index("}")] for name in names}) == 1


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def counting_charges(grants: Grants, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    charged: list[int] = []
    charge = grants.charge

    async def counted(user: str, tokens: int, now: float) -> tuple[int, ...]:
        charged.append(tokens)
        return await charge(user, tokens, now)

    monkeypatch.setattr(grants, "charge", counted)
    return charged


async def test_charges_are_batched_by_tokens_by_time_and_at_step_ends(bus, monkeypatch):
    charged = counting_charges(bus.grants, monkeypatch)
    clock = Clock()
    charge = BudgetCharge(bus.grants, "u", Budget(per_day=10_000), clock=clock)
    for _ in range(CHARGE_TOKENS * 3):  # a token each, no time passing
        await charge.add(1)
    assert charged == [CHARGE_TOKENS] * 3
    await charge.add(5)
    clock.now += CHARGE_SECONDS  # a slow stream still charges every CHARGE_SECONDS
    await charge.add(1)
    await charge.add(2, step_end=True)
    assert charged[3:] == [6, 2]
    await charge.add(0, step_end=True)  # nothing pending: no call
    assert len(charged) == 5
    assert charge.charged == sum(charged) == (await bus.grants.budget_used("u", time.time()))[1]


async def test_a_charge_that_reaches_the_limit_stops_the_run(bus):
    charge = BudgetCharge(bus.grants, None, Budget(per_day=100), clock=Clock())
    await charge.start(10)  # pending, charged with the first charge
    with pytest.raises(BudgetSpent):
        for _ in range(200):
            await charge.add(1)
    # The charge that crossed carried at most one step past the limit.
    assert 100 <= charge.charged <= 100 + STEP
    assert (await bus.grants.budget_used(ANONYMOUS, time.time()))[1] == charge.charged
    late = BudgetCharge(bus.grants, None, Budget(per_day=100))
    with pytest.raises(BudgetSpent):
        await late.start(1)  # spent before it starts


async def test_the_model_servers_total_replaces_the_estimate_at_the_end(bus):
    charge = BudgetCharge(bus.grants, "u", Budget(per_day=10_000), clock=Clock())
    await charge.add(70)
    await charge.settle(reported_total=100)
    assert charge.charged == 100
    await charge.settle(reported_total=50)  # an estimate above the report is not given back
    assert charge.charged == 100


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
    charged = counting_charges(bus.grants, monkeypatch)
    read = []
    monkeypatch.setattr(bus.grants, "budget_used", lambda *a: read.append(a))
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
    assert charged == [] and read == []


async def test_a_run_that_crosses_the_budget_ends_with_a_budget_error(bus):
    attempt = await attempt_for(bus, Budget(per_day=200))
    agent = Tokens(1000)
    await attempt.execute(agent)
    events = [json.loads(e) for e in await bus.history("s")]
    assert events[-1]["type"] == "error" and events[-1]["code"] == "budget"
    assert agent.sent < 1000
    used = (await bus.grants.budget_used("u", time.time()))[1]
    assert 200 <= used <= 200 + STEP
    # Everything the run wrote was charged: its estimate is the counters' figure.
    assert used == attempt.usage.meter.total_tokens
    # The next run of the same user does not start.
    again = await attempt_for(bus, Budget(per_day=200), session="s2")
    later = Tokens(10)
    await again.execute(later)
    assert later.sent == 0
    assert [decode_event(e).type for e in await bus.history("s2")] == ["error"]


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


async def prompt_until_refused(url: str, limit: int = 40) -> tuple[list[dict[str, Any]], dict]:
    """Prompt one run at a time until the frontend refuses; the runs' events and the refusal."""
    events: list[dict[str, Any]] = []
    async with connect(url) as ws:
        await greeting(ws)
        for i in range(limit):
            await ws.send(json.dumps({"type": "prompt", "content": f"question {i}"}))
            while True:
                frame = await recv_json(ws, timeout=20)
                if frame["type"] == "error" and "seq" not in frame:
                    return events, frame
                if "seq" in frame:
                    events.append(frame)
                    if frame["type"] in ("done", "error", "cancelled"):
                        break
    raise AssertionError(f"no refusal after {limit} runs")


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
    for _events, refusal in results:
        assert refusal["code"] == "budget", refusal
    ends = [e for events, _ in results for e in events if e["type"] in ("done", "error")]
    assert all(e["type"] == "done" or e.get("code") == "budget" for e in ends), ends
    done = [e for e in ends if e["type"] == "done"]
    assert done and all(e["usage"]["estimated"] is True for e in done)
    assert all(e["usage"]["total_tokens"] > 0 for e in done)
    # Every run has ended (each socket saw its last run's end before the refusal).
    report = await budget_of(budgeted, user, frontend=1)
    used = report["day"]["used"]
    assert DAY_BUDGET <= used <= DAY_BUDGET + SESSIONS * STEP, report
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
    print(f"budget {DAY_BUDGET}: charged {used}; {len(ends)} runs, {stopped} stopped by it")


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
def llm() -> Iterator[FakeOpenAI]:
    server = FakeOpenAI().start()
    yield server
    server.stop()


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
