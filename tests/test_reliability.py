"""Real faults against real processes: kill -9, SIGSTOP, rolling SIGTERM, cancel, idempotency.

Every loop here is bounded in count and time; every process is signalled by its PID.
"""

import asyncio
import json
import random
import signal
import time

import httpx
import pytest

from tests.conftest import SIM_STEPS, sim_run, start_cluster
from tests.procs import seconds, wait_until
from tests.wsclient import connect, greeting, recv_json, run_events
from thoughtwire.client import Follower
from thoughtwire.shared.keys import Keys

TOKENS = 60


@pytest.fixture(scope="module")
def faulty(redis_server, logdir):
    """Three frontends, two workers, 1 s leases; runs of about 1.2 s."""
    c = start_cluster(
        redis_server,
        logdir,
        frontends=3,
        workers=2,
        THOUGHTWIRE_LEASE_SECONDS="1",
        THOUGHTWIRE_SIM_STEP_DELAY="0.05",
        THOUGHTWIRE_SIM_ANSWER_TOKENS=str(TOKENS),
        THOUGHTWIRE_SIM_TOKENS_PER_SECOND="60",
    )
    yield c
    c.stop()


def assert_clean_runs(events, tokens=TOKENS):
    """Seqs 1..N once each and in order; every run is whole; no gap, no retry."""
    assert [e["type"] for e in events if "seq" not in e] == []
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
    runs = {}
    for e in events:
        runs.setdefault(e["run"], []).append(e["type"])
    for types in runs.values():
        assert types == sim_run(tokens)
    return runs


async def test_kill_9_frontends_mid_stream_20_times_loses_and_duplicates_nothing(faulty):
    rng = random.Random(20261123)
    follower = Follower([f.ws for f in faulty.frontends], max_reconnects=400)
    events, kills, replacing = [], 0, set()

    async def replace(frontend):
        index = faulty.frontends.index(frontend)
        frontend.proc.kill()
        fresh = await asyncio.to_thread(faulty.add_frontend)
        faulty.frontends.remove(fresh)
        faulty.frontends[index] = fresh
        follower.urls[index] = fresh.ws

    countdown = rng.randint(5, 60)
    try:
        async with asyncio.timeout(seconds(120)), httpx.AsyncClient() as http:
            async for event in follower.events("first run"):
                events.append(event)
                if event["type"] == "done":
                    if kills >= 20:
                        break
                    await submit_somewhere(
                        http, faulty, {"prompt": "next run", "session": follower.session}
                    )
                countdown -= 1
                if countdown == 0 and kills < 20:
                    countdown = rng.randint(5, 60)
                    victim = faulty.frontend_at(follower.url_in_use)
                    kills += 1
                    task = asyncio.create_task(replace(victim))
                    replacing.add(task)
                    task.add_done_callback(replacing.discard)
    finally:
        # Whatever happened, the replacements finish: the module's later tests need
        # three live frontends, not the ones killed here.
        async with asyncio.timeout(seconds(60)):
            await asyncio.gather(*replacing, return_exceptions=True)
    assert kills == 20
    assert follower.reconnects >= 20
    runs = assert_clean_runs(events)
    assert len(runs) >= 2


async def submit_somewhere(http, cluster, body):
    """POST a job to whichever frontend takes it; some are being killed meanwhile."""
    deadline = time.monotonic() + seconds(30)
    while time.monotonic() < deadline:
        for frontend in list(cluster.frontends):
            try:
                response = await http.post(frontend.http + "/v1/jobs", json=body)
                if response.status_code == 202:
                    return response.json()
            except httpx.TransportError:
                pass
        await asyncio.sleep(0.1)
    raise AssertionError("no frontend took the job")


def run_owner_pid(cluster, session, run):
    with cluster.redis.client() as r:
        owner = r.hget(Keys(cluster.prefix).run(session, run), "owner")
    return int(owner.decode().split("-")[-2])


async def first_events_of_a_run(ws, count):
    events = []
    while len(events) < count:
        message = await recv_json(ws)
        if "seq" in message:
            events.append(message)
    return events


async def test_kill_9_a_worker_mid_run_and_another_finishes_it_with_a_retry(faulty):
    async with connect(faulty.frontends[1].ws + "/ws/agent-thoughts") as ws:
        session = await greeting(ws)
        await ws.send("survive a crash")
        before = await first_events_of_a_run(ws, 10)
        pid = run_owner_pid(faulty, session, before[0]["run"])
        victim = faulty.worker_with_pid(pid)
        victim.kill()
        after = await run_events(ws, timeout=30)
    events = before + after
    retry = next(i for i, e in enumerate(events) if e["type"] == "retry")
    assert events[retry]["attempt"] == 2
    assert [e["type"] for e in events[retry + 1 :]][: len(SIM_STEPS)] == SIM_STEPS
    assert [e["type"] for e in events[retry + 1 :]].count("answer") == TOKENS
    assert events[-1]["type"] == "done"
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
    faulty.workers.remove(victim)
    faulty.add_worker()


async def test_a_paused_worker_never_writes_after_another_took_over(faulty):
    async with connect(faulty.frontends[2].ws + "/ws/agent-thoughts") as ws:
        session = await greeting(ws)
        await ws.send("survive a pause")
        before = await first_events_of_a_run(ws, 8)
        run = before[0]["run"]
        paused = faulty.worker_with_pid(run_owner_pid(faulty, session, run))
        paused.signal(signal.SIGSTOP)
        try:
            after = await run_events(ws, timeout=30)
        finally:
            paused.signal(signal.SIGCONT)
    # The paused attempt wakes up, tries to write, and is fenced out.
    wait_until(lambda: "lease lost" in paused.output(), 10, "the stale attempt to notice")
    with faulty.redis.client() as r:
        log = [json.loads(f[b"e"]) for _id, f in r.xrange(Keys(faulty.prefix).session_log(session))]
    assert log == before + after
    retry = next(i for i, e in enumerate(log) if e["type"] == "retry")
    assert [e["type"] for e in log[retry + 1 :]].count("answer") == TOKENS
    assert [e["type"] for e in log].count("done") == 1
    assert log[-1]["type"] == "done"


async def test_cancel_from_another_frontend_stops_the_run_within_a_second(faulty):
    a, b = faulty.frontends[0], faulty.frontends[1]
    async with connect(a.ws + "/ws/agent-thoughts") as owner:
        session = await greeting(owner)
        async with connect(f"{b.ws}/ws/agent-thoughts?session={session}") as other:
            await greeting(other)
            await owner.send("a run to cancel")
            await first_events_of_a_run(owner, 8)
            sent = time.monotonic()
            await other.send(json.dumps({"type": "cancel"}))
            events = await run_events(owner, timeout=10)
            elapsed = time.monotonic() - sent
    assert events[-1]["type"] == "cancelled"
    assert elapsed < 1.0, f"cancel took {elapsed:.2f} s"
    assert len([e for e in events if e["type"] == "answer"]) < TOKENS


async def test_jobs_run_in_the_background_and_an_idempotency_key_runs_once(faulty):
    a, b = faulty.frontends[0].http, faulty.frontends[1].http
    async with httpx.AsyncClient(timeout=10) as http:
        body = {"prompt": "background work", "idempotency_key": "once-only-" + faulty.prefix}
        first = await http.post(a + "/v1/jobs", json=body)
        again = await http.post(b + "/v1/jobs", json=body)
        assert first.status_code == again.status_code == 202
        job = first.json()
        assert again.json() == {**job, "created": False}

        async def finished():
            state = (await http.get(f"{b}/v1/jobs/{job['job']}")).json()
            return state if state["status"] in ("done", "failed", "cancelled") else None

        async with asyncio.timeout(seconds(20)):
            while not (state := await finished()):
                await asyncio.sleep(0.1)
        assert state["status"] == "done" and state["attempts"] == 1
        assert state["result"].startswith("Based on my research")
        assert (await http.delete(f"{a}/v1/jobs/{job['job']}")).status_code == 409
        assert (await http.get(f"{a}/v1/jobs/nope")).status_code == 404
        assert (await http.post(a + "/v1/jobs", json={"prompt": ""})).status_code == 422
    with faulty.redis.client() as r:
        log = [
            json.loads(f[b"e"])
            for _id, f in r.xrange(Keys(faulty.prefix).session_log(job["session"]))
        ]
    assert_clean_runs(log)
