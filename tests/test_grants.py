"""Grants and limits (shared/grants.py) against a real redis-server and the embedded Redis.

The run slot has one home: it is taken by ``Grants.take_run`` and freed by
``Grants.free_run`` exactly once however the run ends.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import AsyncIterator
from typing import Any

import pytest

from tests.procs import seconds
from thoughtwire.api.auth import Principal
from thoughtwire.api.frontend import Frontend
from thoughtwire.api.guard import Guard, LimitError
from thoughtwire.api.runs import Runs
from thoughtwire.shared import grants as grants_module
from thoughtwire.shared.bus import Bus
from thoughtwire.shared.grants import SOCKET_SLOT_MS, Grants
from thoughtwire.shared.keys import Keys
from thoughtwire.shared.protocol import Job, Thought
from thoughtwire.shared.settings import Settings
from thoughtwire.worker.attempt import RunLimits
from thoughtwire.worker.runner import Worker

USER = "u"
LIMITS = RunLimits(lease_ms=10_000, redis_retry_seconds=1.0, disconnect_grace=5.0)
SETTINGS = Settings(jwt_secret="s" * 32, max_runs_per_user=100)


@pytest.fixture
def bus(redis_client, prefix):
    return Bus(redis_client, Keys(prefix), log_maxlen=50, log_ttl=60)


@pytest.fixture
def frees(monkeypatch) -> collections.Counter[str]:
    """Every run slot freed, by run: the one function that frees them counts."""
    counted: collections.Counter[str] = collections.Counter()
    free = Grants.free_run

    async def counting(self: Grants, user: str | None, run: str) -> None:
        counted[run] += 1
        await free(self, user, run)

    monkeypatch.setattr(Grants, "free_run", counting)
    return counted


class Ends:
    """An agent that ends its run as its prompt says: ``done`` or ``error``."""

    async def run(self, turn: Any) -> AsyncIterator[Thought]:
        yield Thought("answer", "a")
        if turn.prompt == "error":
            yield Thought("error", "the agent failed")


async def submitted(bus: Bus, run: str, prompt: str = "done") -> Job:
    assert await bus.grants.take_run(USER, run, 100)
    job = Job(run=run, session=f"s-{run}", prompt=prompt, user=USER)
    await bus.submit(job)
    return job


async def worked(bus: Bus, frees: collections.Counter[str], runs: int, **options: Any) -> None:
    """Run a worker in this process until ``runs`` run slots were freed."""
    worker = Worker(bus, {"t": Ends()}, "t", concurrency=10, limits=LIMITS, **options)
    stop = asyncio.Event()
    running = asyncio.create_task(worker.run(stop, drain_timeout=seconds(5)))
    try:
        async with asyncio.timeout(seconds(10)):
            while sum(frees.values()) < runs:
                await asyncio.sleep(0.01)
    finally:
        stop.set()
        await running


async def test_a_run_slot_is_freed_once_when_its_run_is_done_failed_or_cancelled(bus, frees):
    """Measured: each of done, error and cancelled freed its slot once; none left held."""
    await submitted(bus, "done")
    await submitted(bus, "error", prompt="error")
    await submitted(bus, "cancelled")
    assert await bus.cancel("s-cancelled", "cancelled") == ["cancelled"]
    await worked(bus, frees, 3, max_attempts=3)
    statuses = [(await bus.run_state(run) or {}).get("status") for run in frees]
    print(f"\nfrees by run: {dict(frees)}; statuses: {statuses}")
    assert frees == {"done": 1, "error": 1, "cancelled": 1}, dict(frees)
    assert sorted(statuses) == ["cancelled", "done", "failed"]
    assert await bus.grants.runs_held(USER) == 0


async def test_a_dead_lettered_run_frees_its_slot_once(bus, frees):
    await submitted(bus, "dead")
    await worked(bus, frees, 1, max_attempts=0)  # every attempt is one too many
    assert frees == {"dead": 1}, dict(frees)
    assert await bus.redis.xlen(bus.keys.dead_letters) == 1
    assert await bus.grants.runs_held(USER) == 0


async def test_a_run_ended_as_lost_frees_its_slot(bus, frees):
    """A queued run whose state Redis lost is ended by its frontend, and its slot freed.

    Measured: the user held 1 run slot after such a run was ended before (it lapsed only
    after RUN_SLOT_MS, an hour), 0 after.
    """
    job = await submitted(bus, "lost")
    runs = Runs(bus, limit=10, lease_seconds=1.0)
    runs.follow(job.session, job.run, USER)
    session_keys = [bus.keys.session_meta(job.session), bus.keys.session_runs(job.session)]
    await bus.redis.delete(*session_keys, bus.keys.run(job.session, job.run), bus.keys.jobs)
    await runs.check(now=0.0)
    await runs.check(now=2.0)
    held = await bus.grants.runs_held(USER)
    print(f"\nrun slots held after a lost run was ended: {held}")
    assert runs.ended == 1
    assert frees == {"lost": 1} and held == 0, f"{held} run slots held"


def frontend_over(bus: Bus) -> Frontend:
    """A frontend with only what queueing a run needs."""
    guard = Guard(SETTINGS, bus)
    runs = Runs(bus, limit=10, lease_seconds=1.0)
    return Frontend(SETTINGS, bus.redis, bus, None, "n", None, guard, runs)  # type: ignore[arg-type]


async def test_an_idempotent_repeat_takes_no_slot_and_keeps_the_first(bus, frees):
    frontend = frontend_over(bus)
    caller = Principal(USER)
    first, session, created = await frontend.start_run(caller, "s", "p", idempotency_key="k")
    again = await frontend.start_run(caller, "s", "p", idempotency_key="k")
    assert created and again == (first, session, False)
    assert sum(frees.values()) == 0  # the repeat made no run, so it took no slot
    assert await bus.grants.runs_held(USER) == 1  # the first run's, until it ends


async def test_a_submit_that_fails_frees_the_slot_it_took(bus, frees, monkeypatch):
    frontend = frontend_over(bus)

    async def refused(*args: Any, **kwargs: Any) -> tuple[str, str, bool]:
        raise ValueError("refused")

    monkeypatch.setattr(bus, "submit", refused)
    with pytest.raises(ValueError):
        await frontend.start_run(Principal(USER), "s", "p")
    assert sum(frees.values()) == 1 and await bus.grants.runs_held(USER) == 0


async def test_a_user_at_the_run_limit_is_refused_until_a_run_ends(bus):
    guard = Guard(SETTINGS.model_copy(update={"max_runs_per_user": 2}), bus)
    caller = Principal(USER)
    assert await guard.take_run(caller, "r1") == USER
    assert await guard.take_run(caller, "r2") == USER
    with pytest.raises(LimitError):
        await guard.take_run(caller, "r3")
    await bus.grants.free_run(USER, "r1")
    await bus.grants.free_run(USER, "r1")  # freeing twice frees nothing more
    assert await guard.take_run(caller, "r3") == USER
    assert await bus.grants.runs_held(USER) == 2


async def test_a_session_belongs_to_its_first_user(bus):
    assert await bus.grants.session_owner("s") is None
    assert await bus.grants.claim_session("s", "a") == "a"
    assert await bus.grants.claim_session("s", "b") == "a"
    assert await bus.grants.session_owner("s") == "a"


SKEW_MS = 7_000  # more than a connection slot lives (SOCKET_SLOT_MS)


async def test_a_frontend_whose_clock_runs_ahead_neither_drops_nor_outlives_live_slots(
    redis_client, prefix, monkeypatch
):
    """Connection slots are timed on Redis' clock, not each frontend's.

    Two frontends' grants on one Redis; a user holds both of 2 slots on A; B's clock runs
    7 s ahead (a slot lives 6 s). Measured: B admitted a third connection before (A's
    live slots looked expired to it, so it dropped them) and refused it after; a slot B
    refreshed lived 13 s before, 6 s after.
    """
    keys = Keys(prefix)
    a = Bus(redis_client, keys, log_maxlen=50, log_ttl=60).grants
    b = Bus(redis_client, keys, log_maxlen=50, log_ttl=60).grants
    assert await a.take_socket("full", "a1", 2)
    assert await a.take_socket("full", "a2", 2)
    real = grants_module._now_ms
    monkeypatch.setattr(grants_module, "_now_ms", lambda: real() + SKEW_MS)
    admitted = await b.take_socket("full", "b1", 2)
    assert await b.take_socket("other", "b2", 2)
    await b.refresh_sockets("other", ["b2"])
    monkeypatch.setattr(grants_module, "_now_ms", real)
    await a.refresh_sockets("full", ["a1", "a2"])
    held = await redis_client.zcard(keys.user_sockets("full"))
    now_s, micros = await redis_client.time()
    lives = (await redis_client.zscore(keys.user_sockets("other"), "b2")) - (
        now_s * 1000 + micros // 1000
    )
    print(f"\nB, 7 s ahead: admitted a third slot: {admitted}; slots held: {held}; ", end="")
    print(f"a slot B refreshed lives {lives / 1000:.1f} s")
    assert not admitted and held == 2, f"B admitted a third slot; {held} held of 2"
    assert lives <= SOCKET_SLOT_MS + 1_000, f"a slot B refreshed lives {lives / 1000:.1f} s"
