"""Real faults against real processes: kill -9, SIGSTOP, rolling SIGTERM, cancel, idempotency.

Every loop here is bounded in count and time; every process is signalled by its PID.
"""

import asyncio
import contextlib
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


class FrontendKiller:
    """Kills -9 the frontend a follower is on, and has a fresh one take its place.

    The victim is found by the follower's URL among the listed frontends that still run.
    Right after a kill the follower may go on reading what its dead socket had buffered,
    and its URL names a frontend killed already (or already replaced, so no longer
    listed): that is no victim, and the next kill waits for the follower to move on.
    Whether a frontend was killed is asked of its process, not of an id() kept aside:
    CPython hands a freed object's id to the next object made, and a fresh frontend that
    inherited its victim's id was never killed, so the follower stayed on it for good.
    """

    def __init__(self, cluster, follower):
        self.cluster = cluster
        self.follower = follower
        self.kills = 0
        self.replacing = set()

    def victim(self):
        """The running frontend the follower is on, or None while it is not on one."""
        url = self.follower.url_in_use or ""
        return next(
            (f for f in self.cluster.frontends if url.startswith(f.ws + "/") and f.proc.alive()),
            None,
        )

    def kill(self):
        """Kill -9 the follower's frontend and start replacing it; False if there is none."""
        victim = self.victim()
        if victim is None:
            return False
        index = self.cluster.frontends.index(victim)
        victim.proc.kill()
        self.kills += 1
        task = asyncio.create_task(self._replace(index))
        self.replacing.add(task)
        task.add_done_callback(self.replacing.discard)
        return True

    async def _replace(self, index):
        fresh = await asyncio.to_thread(self.cluster.add_frontend)
        self.cluster.frontends.remove(fresh)
        self.cluster.frontends[index] = fresh
        self.follower.urls[index] = fresh.ws

    async def finish(self):
        """Wait for the replacements: the module's later tests need three live frontends."""
        async with asyncio.timeout(seconds(35)):
            await asyncio.gather(*self.replacing, return_exceptions=True)


async def test_kill_9_frontends_mid_stream_20_times_loses_and_duplicates_nothing(faulty):
    rng = random.Random(20261123)
    follower = Follower([f.ws for f in faulty.frontends], max_reconnects=400)
    killer = FrontendKiller(faulty, follower)
    events = []
    countdown = rng.randint(5, 60)
    try:
        # Shorter than the test's own timeout, so that a stall says where it stalled.
        async with (
            asyncio.timeout(seconds(75)),
            httpx.AsyncClient() as http,
            contextlib.aclosing(follower.events("first run")) as stream,
        ):
            async for event in stream:
                events.append(event)
                if event["type"] == "done":
                    if killer.kills >= 20:
                        break
                    body = {"prompt": "next run", "session": follower.session}
                    await submit_somewhere(http, faulty, body)
                countdown -= 1
                if countdown <= 0 and killer.kills < 20 and killer.kill():
                    countdown = rng.randint(5, 60)
    except TimeoutError:
        last = events[-1] if events else None
        raise AssertionError(
            f"stalled after {killer.kills} kills and {len(events)} events (last: {last}); "
            f"follower {follower.state} on {follower.url_in_use}"
        ) from None
    finally:
        await killer.finish()
    assert killer.kills == 20
    # A kill finds its victim only once the follower is on a live frontend again, so
    # every kill but the last was followed by a reconnect; the last may come after the
    # end of the final run had already reached the follower, which then stops reading.
    assert follower.reconnects >= killer.kills - 1
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


async def test_a_job_whose_frontend_went_before_queueing_it_runs_when_posted_again(cluster):
    """A frontend killed between admitting a job's run and queueing it leaves the run
    admitted and its key taken (written here as it would have). Posted again with its
    key to another frontend, without a session, the job is that run, and it runs once."""
    from thoughtwire.api.auth import ANONYMOUS
    from thoughtwire.shared.bus import Bus
    from thoughtwire.shared.protocol import Job
    from thoughtwire.shared.redis import RedisFactory
    from thoughtwire.shared.settings import Settings

    key, lost, session = "lost-" + cluster.prefix, "r" + cluster.prefix, "s" + cluster.prefix
    redis = RedisFactory(Settings(redis_url=cluster.redis.url, redis_pool_size=2)).commands()
    try:
        bus = Bus(redis, Keys(cluster.prefix), log_maxlen=100, log_ttl=600)
        await redis.set(Keys(cluster.prefix).idempotency(ANONYMOUS.user, key), f"{lost} {session}")
        await bus._admit_run(Job(run=lost, session=session, prompt="background work"))
    finally:
        await redis.aclose()
    async with httpx.AsyncClient(timeout=10) as http:
        body = {"prompt": "background work", "idempotency_key": key}
        again = await http.post(cluster.frontends[1].http + "/v1/jobs", json=body)
        assert again.status_code == 202
        assert again.json() == {"job": lost, "session": session, "created": False}
        async with asyncio.timeout(seconds(20)):
            while (state := (await http.get(f"{cluster.frontends[0].http}/v1/jobs/{lost}")).json())[
                "status"
            ] not in ("done", "failed", "cancelled"):
                await asyncio.sleep(0.1)
    assert state["status"] == "done" and state["attempts"] == 1


async def test_jobs_run_in_the_background_and_an_idempotency_key_runs_once(faulty):
    a, b = faulty.frontends[0].http, faulty.frontends[1].http
    async with httpx.AsyncClient(timeout=10) as http:
        body = {"prompt": "background work", "idempotency_key": "once-only-" + faulty.prefix}
        first = await http.post(a + "/v1/jobs", json=body)
        again = await http.post(b + "/v1/jobs", json=body)
        assert first.status_code == again.status_code == 202
        job = first.json()
        assert again.json() == {**job, "created": False}
        reused = await http.post(b + "/v1/jobs", json={**body, "prompt": "other work"})
        assert reused.status_code == 422 and reused.json()["code"] == "bad_message"
        assert "new key" in reused.json()["detail"]

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
