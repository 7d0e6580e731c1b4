"""Deploys and outages: rolling frontend restarts, worker handoff, Redis restarts, absent clients."""

import asyncio
import json
import signal

import httpx
import pytest

from tests.conftest import start_cluster
from tests.procs import RedisServer, seconds, wait_until
from tests.wsclient import check_stream, connect, greeting, run_events
from thoughtwire.client import Follower, ask
from thoughtwire.shared.keys import Keys


async def collect(prompt, urls, started=None, **options):
    """Every message of one run; ``started`` is set when its first event arrives."""
    messages = []
    async for message in ask(prompt, urls, max_reconnects=200, **options):
        messages.append(message)
        if started is not None:
            started.set()
    return messages


@pytest.fixture(scope="module")
def deploy(redis_server, logdir):
    """Two frontends that drain over 1 s; two workers; runs of about 6 s."""
    c = start_cluster(
        redis_server,
        logdir,
        workers=2,
        THOUGHTWIRE_DRAIN_WINDOW="1",
        THOUGHTWIRE_SIM_ANSWER_TOKENS="120",
        THOUGHTWIRE_SIM_TOKENS_PER_SECOND="20",
        THOUGHTWIRE_LEASE_SECONDS="1",
        THOUGHTWIRE_DRAIN_TIMEOUT="0.5",
        THOUGHTWIRE_DISCONNECT_GRACE="2",  # reconnects on a loaded machine take a second
    )
    yield c
    c.stop()


async def test_a_rolling_restart_of_both_frontends_during_50_streams_loses_nothing(deploy):
    urls = [f.ws for f in deploy.frontends]
    started = [asyncio.Event() for _ in range(50)]
    streams = [
        asyncio.create_task(collect(f"stream {i}", urls, started[i], first=i)) for i in range(50)
    ]
    saw_unready = []

    async def restart(index):
        old = deploy.frontends[index]
        old.proc.signal(signal.SIGTERM)
        async with httpx.AsyncClient() as http:
            for _ in range(50):  # /readyz turns 503 as soon as the drain starts
                try:
                    if (await http.get(old.http + "/readyz")).status_code == 503:
                        saw_unready.append(index)
                        break
                except httpx.TransportError:
                    break
                await asyncio.sleep(0.02)
        fresh = await asyncio.to_thread(deploy.add_frontend)
        deploy.frontends.remove(fresh)
        urls[index] = fresh.ws
        assert await asyncio.to_thread(old.proc.stop) in (0, -signal.SIGTERM)
        deploy.frontends[index] = fresh

    async with asyncio.timeout(seconds(60)):
        await asyncio.gather(*(event.wait() for event in started))  # every stream is under way
        await restart(0)
        await restart(1)
        results = await asyncio.gather(*streams)
    assert saw_unready == [0, 1]
    for events in results:
        assert check_stream(events) == 0
        assert [e["type"] for e in events].count("answer") == 120
        assert events[-1]["type"] == "done"


async def test_a_stopping_worker_hands_its_run_to_another(deploy):
    async with connect(deploy.frontends[0].ws + "/ws/agent-thoughts") as ws:
        session = await greeting(ws)
        await ws.send("hand me over")
        first = (await ws.recv(), await ws.recv())
        with deploy.redis.client() as r:
            run = json.loads(first[0])["run"]
            owner = r.hget(Keys(deploy.prefix).run(session, run), "owner").decode()
        victim = deploy.worker_with_pid(int(owner.split("-")[-2]))
        assert await asyncio.to_thread(victim.stop) == 0
        events = await run_events(ws, timeout=30)
    assert "handed back to the queue" in victim.output()
    retry = [e for e in events if e["type"] == "retry"]
    assert [e["attempt"] for e in retry] == [2]
    assert events[-1]["type"] == "done"
    deploy.workers.remove(victim)
    deploy.add_worker()


async def test_an_interactive_run_nobody_watches_is_cancelled_but_a_job_keeps_going(deploy):
    a = deploy.frontends[0]
    async with connect(a.ws + "/ws/agent-thoughts") as ws:
        await greeting(ws)
        await ws.send("nobody will watch this")
        run = json.loads(await ws.recv())["run"]
    async with httpx.AsyncClient(timeout=10) as http:
        job = (await http.post(a.http + "/v1/jobs", json={"prompt": "background"})).json()

        async def status(run_id):
            return (await http.get(f"{a.http}/v1/jobs/{run_id}")).json()["status"]

        async with asyncio.timeout(seconds(10)):
            while await status(run) != "cancelled":
                await asyncio.sleep(0.1)
            assert await status(job["job"]) in ("queued", "running", "done")  # not cancelled


@pytest.mark.parametrize("persistence", ["appendonly", "none"])
async def test_a_redis_restart_mid_stream_recovers_or_says_what_was_lost(
    logdir, tmp_path, persistence
):
    extra = (
        ("--appendonly", "yes", "--appendfsync", "everysec") if persistence == "appendonly" else ()
    )
    server = RedisServer(tmp_path, *extra).start()
    cluster = start_cluster(
        server,
        logdir,
        frontends=1,
        THOUGHTWIRE_SIM_ANSWER_TOKENS="60",
        THOUGHTWIRE_SIM_TOKENS_PER_SECOND="30",
        THOUGHTWIRE_LEASE_SECONDS="2",
    )
    try:
        url = cluster.frontends[0].ws

        def unready():
            return httpx.get(cluster.frontends[0].http + "/readyz", timeout=5).status_code == 503

        follower = Follower(url, max_reconnects=200)
        events = []
        async with asyncio.timeout(seconds(40)):
            async for message in follower.events("through a restart"):
                events.append(message)
                if len(events) == 15:
                    server.proc.kill()  # a crash, not a clean shutdown
                    server.proc.popen = None
                    await asyncio.to_thread(wait_until, unready, 10, "/readyz to report Redis down")
                    await asyncio.to_thread(server.start)
                if message["type"] in ("done", "error", "cancelled"):
                    break
        gaps = check_stream(events)
        if persistence == "none":
            assert gaps >= 1  # everything Redis held is gone, and the client is told so
        assert events[-1]["type"] == "done"
        assert all(p.alive() for p in [cluster.frontends[0].proc, *cluster.workers])
        # Service resumes by itself.
        async with asyncio.timeout(seconds(30)):
            again = await collect("after the restart", url)
        assert check_stream(again) == 0 and again[-1]["type"] == "done"
    finally:
        cluster.stop()
        server.stop()
