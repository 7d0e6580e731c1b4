"""Resuming a session: by query, by message, over SSE; gaps; deploys; Redis restarts."""

import json

import httpx
import pytest
import websockets

from tests.conftest import start_cluster
from tests.procs import seconds
from tests.wsclient import connect, greeting, recv_json, run_events


@pytest.fixture(scope="module")
def cluster(redis_server, logdir):
    """Runs of 40 tokens at 400/s; a log that keeps about the last 100 events."""
    c = start_cluster(
        redis_server,
        logdir,
        THOUGHTWIRE_SIM_ANSWER_TOKENS="40",
        THOUGHTWIRE_SIM_TOKENS_PER_SECOND="400",
        THOUGHTWIRE_LOG_MAXLEN="100",
    )
    yield c
    c.stop()


async def one_run(cluster, frontend=0):
    async with connect(cluster.frontends[frontend].ws + "/ws/agent-thoughts") as ws:
        session = await greeting(ws)
        await ws.send("remember this")
        return session, await run_events(ws)


async def test_resume_by_query_on_another_frontend_after_the_run_ended(cluster):
    session, events = await one_run(cluster, 0)
    url = f"{cluster.frontends[1].ws}/ws/agent-thoughts?session={session}&after=30&epoch={events[0]['epoch']}"
    async with connect(url) as ws:
        await greeting(ws)
        replay = await run_events(ws)
    assert replay == events[30:]


async def test_resume_by_message_on_an_open_socket(cluster):
    session, events = await one_run(cluster, 0)
    epoch = events[0]["epoch"]
    async with connect(cluster.frontends[1].ws + "/ws/agent-thoughts") as ws:
        await greeting(ws)
        resume = {"type": "resume", "session": session, "after": 3, "epoch": epoch}
        await ws.send(json.dumps(resume))
        assert (await recv_json(ws)) == {"type": "session", "session": session}
        assert (await recv_json(ws)) == events[3]  # no gap: the position is confirmed
        assert await run_events(ws) == events[4:]


async def test_a_resume_without_an_epoch_is_told_which_epoch_it_continues_in(cluster):
    """The seq of a position without an epoch may be of a log that restarted since: the
    client is told, by a gap, the epoch the stream continues in, then gets what follows."""
    session, events = await one_run(cluster, 0)
    async with connect(cluster.frontends[1].ws + "/ws/agent-thoughts") as ws:
        await greeting(ws)
        await ws.send(json.dumps({"type": "resume", "session": session, "after": 3}))
        assert (await recv_json(ws)) == {"type": "session", "session": session}
        gap = await recv_json(ws)
        assert (gap["type"], gap["reason"], gap["after"], gap["next"]) == (
            "gap",
            "unconfirmed",
            3,
            4,
        )
        assert gap["epoch"] == events[0]["epoch"]
        assert await run_events(ws) == events[3:]


async def test_sse_resumes_from_last_event_id(cluster):
    session, events = await one_run(cluster, 1)
    received = []
    async with (
        httpx.AsyncClient(timeout=seconds(10)) as http,
        http.stream(
            "GET",
            f"{cluster.frontends[0].http}/v1/sessions/{session}/events",
            headers={"Last-Event-ID": f"{events[0]['epoch']}-40"},
        ) as response,
    ):
        assert response.headers["content-type"].startswith("text/event-stream")
        ids = []
        async for line in response.aiter_lines():
            if line.startswith("id: "):
                ids.append(line[4:])
            elif line.startswith("data: "):
                received.append(json.loads(line[6:]))
                if received[-1]["type"] == "done":
                    break
    assert received == events[40:]
    assert ids == [f"{e['epoch']}-{e['seq']}" for e in events[40:]]


async def test_a_trimmed_log_gives_an_explicit_gap_then_what_it_holds(cluster):
    session = None
    async with connect(cluster.frontends[0].ws + "/ws/agent-thoughts") as ws:
        session = await greeting(ws)
        for _ in range(6):  # 6 runs x 50 events: well past the log's length
            await ws.send("again")
            events = await run_events(ws)
    last, epoch = events[-1]["seq"], events[-1]["epoch"]
    async with connect(
        f"{cluster.frontends[1].ws}/ws/agent-thoughts?session={session}&after=2&epoch={epoch}"
        "&replay=raw"  # the gap itself; by default a snapshot repairs it (test_snapshots.py)
    ) as ws:
        await greeting(ws)
        gap = await recv_json(ws)
        assert (gap["type"], gap["reason"], gap["after"]) == ("gap", "trimmed", 2)
        first = await recv_json(ws)
        assert first["seq"] == gap["next"] > 3
        rest = [first]
        while rest[-1]["seq"] < last:
            rest.append(await recv_json(ws))
    assert [e["seq"] for e in rest] == list(range(gap["next"], last + 1))


async def test_a_bad_resume_is_refused_clearly(cluster):
    async with connect(cluster.frontends[0].ws + "/ws/agent-thoughts") as ws:
        await greeting(ws)
        await ws.send(json.dumps({"type": "resume", "session": "x", "after": -1}))
        assert (await recv_json(ws))["code"] == "bad_message"
    async with connect(cluster.frontends[0].ws + "/ws/agent-thoughts?session=s&after=nope") as ws:
        with pytest.raises(websockets.ConnectionClosed) as info:
            await recv_json(ws)
    assert info.value.rcvd.code == 1008
    assert "after" in info.value.rcvd.reason
