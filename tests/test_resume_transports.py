"""Resume over both transports, end to end, against a session whose log restarted.

Real processes: a redis-server of this module's own (so its command counts are this
module's alone), two frontends and a worker. The session ran once under epoch A;
then its log and meta were lost (as when Redis loses its data) and it ran again
under epoch B, long enough for the log to be trimmed. Every client position, over a
socket's query, a ``resume`` message or SSE, gets exactly the events after it, or a
gap and then what the log holds, within a bounded time; SSE ids carry the epoch.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import websockets

from tests.conftest import Cluster, start_cluster
from tests.procs import RedisServer, seconds
from tests.wsclient import connect, greeting, recv_json, run_events
from thoughtwire.shared.keys import Keys
from thoughtwire.shared.protocol import ProtocolError, event_id, parse_event_id


@dataclass(frozen=True)
class Restarted:
    """The session: epoch A's last seq, and epoch B's log, from ``first`` to ``last``."""

    session: str
    old: str
    old_last: int
    epoch: str
    first: int
    last: int


@pytest.fixture(scope="module")
def own_redis(logdir: Path) -> Iterator[RedisServer]:
    workdir = logdir / "redis-resume-transports"
    workdir.mkdir()
    server = RedisServer(workdir).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def cluster(own_redis: RedisServer, logdir: Path) -> Iterator[Cluster]:
    """Runs of about 260 events, into a log that keeps about the last 100."""
    c = start_cluster(
        own_redis,
        logdir,
        THOUGHTWIRE_SIM_ANSWER_TOKENS="250",
        THOUGHTWIRE_LOG_MAXLEN="100",
    )
    yield c
    c.stop()


async def run_once(cluster: Cluster, session: str | None = None) -> tuple[str, list[dict]]:
    url = cluster.frontends[0].ws + "/ws/agent-thoughts"
    async with connect(url if session is None else f"{url}?session={session}") as ws:
        session = await greeting(ws)
        await ws.send("go")
        return session, await run_events(ws, timeout=30)


@pytest.fixture(scope="module")
def restarted(cluster: Cluster, own_redis: RedisServer) -> Restarted:
    session, before = asyncio.run(run_once(cluster))
    keys = Keys(cluster.prefix)
    with own_redis.client() as redis:
        # What Redis losing this session's data leaves: no meta, no log.
        redis.delete(keys.session_meta(session), keys.session_log(session))
    _, after = asyncio.run(run_once(cluster, session))
    assert after[0]["epoch"] != before[0]["epoch"] and after[0]["seq"] == 1
    with own_redis.client() as redis:
        first = int(redis.xrange(keys.session_log(session), count=1)[0][0].split(b"-")[1])
    assert first > 1, "the log was meant to be trimmed"
    return Restarted(
        session,
        before[0]["epoch"],
        before[-1]["seq"],
        after[0]["epoch"],
        first,
        after[-1]["seq"],
    )


# --- reading a resume, over each transport --------------------------------------------


async def until_last(frames: AsyncIterator[dict[str, Any]], r: Restarted) -> list[dict]:
    """Frames until the session's last event: gaps and events, within a bounded time."""
    got = []
    async with asyncio.timeout(seconds(20)):
        async for frame in frames:
            got.append(frame)
            if (frame.get("epoch"), frame.get("seq")) == (r.epoch, r.last):
                return got
    raise AssertionError(f"the stream ended before the last event: {got[-3:]}")


async def ws_query(cluster: Cluster, r: Restarted, epoch: str | None, after: int) -> list[dict]:
    url = f"{cluster.frontends[1].ws}/ws/agent-thoughts?session={r.session}&after={after}"
    async with connect(url + ("" if epoch is None else f"&epoch={epoch}")) as ws:
        await greeting(ws)
        return await until_last(_ws_frames(ws), r)


async def ws_resume(cluster: Cluster, r: Restarted, epoch: str | None, after: int) -> list[dict]:
    async with connect(cluster.frontends[0].ws + "/ws/agent-thoughts") as ws:
        await greeting(ws)
        message = {"type": "resume", "session": r.session, "after": after, "epoch": epoch}
        await ws.send(json.dumps(message))
        assert (await recv_json(ws)) == {"type": "session", "session": r.session}
        return await until_last(_ws_frames(ws), r)


async def _ws_frames(ws: Any) -> AsyncIterator[dict[str, Any]]:
    while True:
        yield await recv_json(ws)


async def sse(cluster: Cluster, r: Restarted, epoch: str | None, after: int) -> list[dict]:
    """Resumed with Last-Event-ID as EventSource sends it: ``E-N``, or a bare seq."""
    last_id = str(after) if epoch is None else f"{epoch}-{after}"
    async with (
        httpx.AsyncClient(timeout=seconds(10)) as http,
        http.stream(
            "GET",
            f"{cluster.frontends[1].http}/v1/sessions/{r.session}/events",
            headers={"Last-Event-ID": last_id},
        ) as response,
    ):
        assert response.status_code == 200
        return await until_last(_sse_frames(response), r)


async def _sse_frames(response: httpx.Response) -> AsyncIterator[dict[str, Any]]:
    event_id = None
    async for line in response.aiter_lines():
        if line.startswith("id: "):
            event_id = line[4:]
        elif line.startswith("data: "):
            frame = json.loads(line[6:])
            if "seq" in frame:
                assert event_id == f"{frame['epoch']}-{frame['seq']}", "an id without its epoch"
            elif frame["type"] == "gap":
                assert event_id == gap_id(frame), "a gap without the position it leaves"
            else:
                assert event_id is None, "only events and gaps have ids"
            event_id = None
            yield frame


def gap_id(gap: dict[str, Any]) -> str:
    """The id a gap's SSE event carries: where it leaves the client (seq 0 of no epoch: "0")."""
    seq = gap["next"] - 1
    return str(seq) if gap["epoch"] is None else f"{gap['epoch']}-{seq}"


TRANSPORTS = {"ws-query": ws_query, "ws-resume": ws_resume, "sse": sse}

# (name, the client's epoch, its seq, the gap reason it must get or None), with
# "A"/"B" for the old and current epochs and F/L for the first and last seq B's log holds.
POSITIONS = [
    ("current epoch mid-log", "B", "mid", None),
    ("current epoch at its first kept event", "B", "F", None),
    ("stale epoch at 0", "A", 0, "epoch"),
    ("stale epoch at N", "A", "A-last", "epoch"),
    ("an epoch the session never had", "0000feedface", 3, "epoch"),
    ("no epoch mid-log", None, "mid", "unconfirmed"),
    ("no epoch at 0", None, 0, "trimmed"),
    ("past the end", "B", "L+20", "epoch"),
    ("before the trimmed start", "B", 5, "trimmed"),
]


def resolve(r: Restarted, epoch: str | None, seq: Any) -> tuple[str | None, int]:
    epoch = {"A": r.old, "B": r.epoch}.get(epoch or "", epoch)
    mid = (r.first + r.last) // 2
    seqs = {"mid": mid, "F": r.first, "A-last": r.old_last, "L+20": r.last + 20}
    return epoch, seqs.get(seq, seq)


def check(frames: list[dict], r: Restarted, epoch: str | None, after: int, reason: str | None):
    """Play the frames as a client: each event follows its position, or a gap moved it."""
    gaps = [f for f in frames if f["type"] == "gap"]
    assert [g["reason"] for g in gaps] == ([] if reason is None else [reason]), gaps
    at = (epoch, after)
    for frame in frames:
        if frame["type"] == "gap":
            assert frame["after"] == at[1] and frame["epoch"] == r.epoch, frame
            at = (r.epoch, frame["next"] - 1)
            continue
        assert (frame["epoch"], frame["seq"]) == (r.epoch, at[1] + 1), f"{frame} after {at}"
        at = (frame["epoch"], frame["seq"])
    events = [f["seq"] for f in frames if f["type"] != "gap"]
    start = after + 1 if reason in (None, "unconfirmed") else r.first
    assert events == list(range(start, r.last + 1))


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("name, epoch, seq, reason", POSITIONS, ids=[p[0] for p in POSITIONS])
async def test_every_position_gets_what_follows_or_a_gap_then_what_exists(
    cluster, restarted, transport, name, epoch, seq, reason
):
    epoch, after = resolve(restarted, epoch, seq)
    frames = await TRANSPORTS[transport](cluster, restarted, epoch, after)
    check(frames, restarted, epoch, after, reason)


# --- defect figure: a stale epoch at seq 0 ----------------------------------------------


def cpu_seconds(pid: int) -> float:
    """User and system CPU time of a process, from /proc/<pid>/stat."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def redis_calls(server: RedisServer) -> int:
    """Commands the redis-server has run so far (INFO's own call not counted)."""
    with server.client() as redis:
        stats = redis.info("commandstats")
    return sum(int(v["calls"]) for k, v in stats.items() if k != "cmdstat_info")


WINDOW = 2.0  # seconds measured from the resume


async def frames_for(ws: Any, window: float) -> list[dict]:
    """Every frame that arrives within ``window`` seconds."""
    got: list[dict] = []
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(window):
            while True:
                got.append(await recv_json(ws, timeout=window))
    return got


async def test_a_stale_epoch_at_seq_0_gets_a_gap_and_leaves_the_frontend_idle(
    cluster, restarted, own_redis
):
    """Resuming at seq 0 of an epoch the log no longer has used to get nothing while the
    frontend re-read the log in a loop: measured over 2 s, 1.95 s of the frontend's CPU
    and 531 Redis calls (0.83 s and 346 on a busier machine). Now: a gap and the log,
    then nothing; under 0.01 s of CPU and 3 Redis calls for the catch-up. The count
    below is every command the Redis server ran, so it also holds the socket's presence
    (a debounced script whose own commands count: 30 to 65 in the window), and the bound
    sits between that and the loop's hundreds."""
    frontend = cluster.frontends[1]
    url = f"{frontend.ws}/ws/agent-thoughts?session={restarted.session}&after=0&epoch=stale0"
    async with connect(url) as ws:
        await greeting(ws)
        cpu, calls = cpu_seconds(frontend.proc.pid), redis_calls(own_redis)
        frames = await frames_for(ws, WINDOW)
        cpu, calls = cpu_seconds(frontend.proc.pid) - cpu, redis_calls(own_redis) - calls
    print(f"\nstale epoch at 0, over {WINDOW:.0f} s: frontend CPU {cpu:.2f} s, Redis calls {calls}")
    assert frames, "nothing came back, not even a gap"
    check(frames, restarted, "stale0", 0, "epoch")
    assert cpu < 0.3, f"the frontend spent {cpu:.2f} s of CPU in {WINDOW} s"
    assert calls < 150, f"{calls} Redis calls in {WINDOW} s"


# --- SSE positions ----------------------------------------------------------------------


def test_an_event_id_carries_the_epoch_and_a_bare_seq_is_still_read():
    assert parse_event_id(event_id(12, "23726b0ea160cf3f8")) == (12, "23726b0ea160cf3f8")
    assert parse_event_id("40") == (40, None)
    for bad in ["", "-3", "e-", "e-x", "e!-3", "a-b-3", "e-" + "9" * 19, "x" * 65 + "-1"]:
        with pytest.raises(ProtocolError):
            parse_event_id(bad)


@pytest.mark.parametrize("query", ["after={epoch}-{after}", "after={after}&epoch={epoch}"])
async def test_sse_takes_the_position_from_the_query_too(cluster, restarted, query):
    after = (restarted.first + restarted.last) // 2
    url = f"{cluster.frontends[0].http}/v1/sessions/{restarted.session}/events?" + query.format(
        epoch=restarted.epoch, after=after
    )
    async with (
        httpx.AsyncClient(timeout=seconds(10)) as http,
        http.stream("GET", url) as response,
    ):
        frames = await until_last(_sse_frames(response), restarted)
    check(frames, restarted, restarted.epoch, after, None)


async def test_sse_refuses_an_id_it_cannot_read(cluster, restarted):
    async with httpx.AsyncClient(timeout=seconds(10)) as http:
        response = await http.get(
            f"{cluster.frontends[0].http}/v1/sessions/{restarted.session}/events",
            headers={"Last-Event-ID": "not an id-3"},
        )
    assert response.status_code == 422
    assert "event id" in response.text


# "²" and "①": str.isdigit() takes them, int() does not. A header is Latin-1: "²" only.
ODD_POSITIONS = [
    ("socket query", "\u00b2"),
    ("socket query", "\u2460"),
    ("sse query", "\u00b2"),
    ("sse query", "\u2460"),
    ("last-event-id", "\u00b2"),
]


@pytest.mark.parametrize(("where", "digit"), ODD_POSITIONS)
async def test_a_position_of_odd_digits_is_refused_not_a_server_error(
    cluster, restarted, where, digit
):
    """A seq of characters that look like digits is refused as a bad position: 1008 on a
    socket, 422 over SSE. Before: 500 and a traceback in the frontend's log, on each."""
    frontend = cluster.frontends[0]
    if where == "socket query":
        url = f"{frontend.ws}/ws/agent-thoughts?session={restarted.session}&after={digit}"
        async with connect(url) as ws:
            with pytest.raises(websockets.ConnectionClosed) as closed:
                await recv_json(ws)
        assert closed.value.rcvd is not None
        print(f"\n{where} {digit!r}: closed {closed.value.rcvd.code}")
        assert closed.value.rcvd.code == 1008
        return
    url = f"{frontend.http}/v1/sessions/{restarted.session}/events"
    async with httpx.AsyncClient(timeout=seconds(10)) as http:
        if where == "sse query":
            response = await http.get(url, params={"after": f"{restarted.epoch}-{digit}"})
        else:
            response = await http.get(
                url, headers={"Last-Event-ID": f"e-{digit}".encode("latin-1")}
            )
    print(f"\n{where} {digit!r}: {response.status_code}")
    assert response.status_code == 422, response.text


async def sse_first(
    cluster: Cluster, session: str, last_id: str, prompt: bool
) -> tuple[str | None, dict]:
    """The first frame of a resumed stream and its id (with ``prompt``, a run is started)."""
    url = f"{cluster.frontends[1].http}/v1/sessions/{session}/events"
    async with (
        httpx.AsyncClient(timeout=seconds(10)) as http,
        http.stream("GET", url, headers={"Last-Event-ID": last_id}) as response,
    ):
        assert response.status_code == 200
        lines = response.aiter_lines()
        prompting = asyncio.create_task(run_once(cluster, session) if prompt else asyncio.sleep(0))
        try:
            async with asyncio.timeout(seconds(20)):
                event_id = None
                async for line in lines:
                    if line.startswith("id: "):
                        event_id = line[4:]
                    elif line.startswith("data: "):
                        return event_id, json.loads(line[6:])
        finally:
            await prompting
    raise AssertionError("the stream ended before its first frame")


async def test_a_stream_resumed_from_a_gaps_id_is_not_told_of_the_loss_again(cluster):
    """A gap's SSE event carries the position it leaves, so EventSource resumes from there.

    A stream resumed on a session whose log is gone gets a gap of reason ``expired``; a
    reconnect with the id it last saw (before the next event came) gets the session's
    events, not that gap again. Measured: the reconnect's first frame was the same gap
    before (the gap had no id, so the stale position was sent again), the event at seq 1
    after.
    """
    session = f"gone-{os.urandom(4).hex()}"
    first_id, first = await sse_first(cluster, session, "0000dead-3", prompt=False)
    assert first["type"] == "gap" and first["reason"] == "expired", first
    _, again = await sse_first(cluster, session, first_id or "0000dead-3", prompt=True)
    print(f"\nfirst frame: {first['type']} (id {first_id}); after reconnecting: {again['type']}")
    assert again["type"] != "gap", f"the reconnect was told of the loss again: {again}"
