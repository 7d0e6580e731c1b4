"""Snapshots for late joiners: a snapshot plus the tail folds to the log's own state.

Pure parts with plain data; the joins against a real redis-server, frontend and workers
(simulated agent): at random points of a run, while it waits for an approval and while
it is retried; a trimmed log repaired by a snapshot; raw replay; a join storm.
"""

from __future__ import annotations

import asyncio
import json
import random
from typing import Any

import httpx
import pytest

from tests.conftest import Cluster, start_cluster
from tests.procs import seconds, wait_until
from tests.wsclient import check_stream, connect, greeting, recv_json
from thoughtwire.api.recovery import (
    Emit,
    Position,
    ReadLog,
    ReadMeta,
    ReadSnapshot,
    Replay,
    Settle,
    TakeLive,
    catch_up,
)
from thoughtwire.api.snapshots import SnapshotReader
from thoughtwire.shared.bus import Bus, Meta
from thoughtwire.shared.keys import Keys
from thoughtwire.shared.protocol import Job, Thought, event_position
from thoughtwire.shared.reducer import fold
from thoughtwire.shared.snapshots import (
    FINISHED_KEPT,
    Hole,
    Snapshot,
    compact,
    current,
    fold_tail,
    save,
    snapshot_frame,
)

TOKENS = 300


def event(seq: int, kind: str, run: str = "r1", epoch: str = "e1", **fields: Any) -> str:
    frame = {"type": kind, "run": run, **fields, "seq": seq, "epoch": epoch}
    return json.dumps(frame, separators=(",", ":"))


def finished_run(first: int, run: str) -> list[str]:
    return [
        event(first, "thinking", run, block="b1", delta=False, content="hmm"),
        event(first + 1, "answer", run, block="b2", delta=True, content="hi"),
        event(first + 2, "done", run, usage={"total_tokens": 3}),
    ]


# --- pure -----------------------------------------------------------------------------


def test_compact_keeps_unfinished_runs_whole_and_finished_ones_short():
    log = [*finished_run(1, "a"), event(4, "thinking", "b", block="b1", delta=False, content="x")]
    state = compact(fold(json.loads(e) for e in log))
    assert state["runs"]["a"]["blocks"] == [
        {"id": "b2", "kind": "text", "text": "hi", "done": True}
    ]
    assert state["runs"]["a"]["usage"] == {"total_tokens": 3}
    assert state["runs"]["b"]["blocks"][0]["text"] == "x"
    assert compact(state) == state


def test_compact_keeps_the_latest_finished_runs():
    log = [e for i in range(FINISHED_KEPT + 5) for e in finished_run(3 * i + 1, f"r{i}")]
    state = compact(fold(json.loads(e) for e in log))
    assert state["order"] == [f"r{i}" for i in range(5, FINISHED_KEPT + 5)]
    assert set(state["runs"]) == set(state["order"])


def test_a_snapshot_at_any_seq_plus_the_tail_folds_as_the_whole_log():
    log = [*finished_run(1, "a"), *finished_run(4, "b")]
    whole = compact(fold(json.loads(e) for e in log))
    for n in range(len(log) + 1):
        base = compact(fold(json.loads(e) for e in log[:n]))
        assert compact(fold_tail(base, log[n:])) == whole


def test_a_tail_with_a_hole_or_another_epoch_is_refused():
    base = fold(json.loads(e) for e in finished_run(1, "a"))
    with pytest.raises(Hole):
        fold_tail(base, [event(5, "thinking", "b")])
    with pytest.raises(Hole):
        fold_tail(base, [event(4, "thinking", "b", epoch="e2")])


def test_the_snapshot_frame_carries_its_position_at_its_tail():
    state = fold(json.loads(e) for e in finished_run(1, "a"))
    frame = snapshot_frame("s", state)
    assert event_position(frame) == (3, "e1")
    assert fold([json.loads(frame)]) == state


def drive(steps, answers):  # type: ignore[no-untyped-def]
    """Run a catch-up against canned answers; the emitted frames."""
    sent: list[str] = []
    answer = None
    try:
        while True:
            step = steps.send(answer)
            answer = answers(step)
            if isinstance(step, Emit):
                sent.extend(step.frames)
    except StopIteration:
        return sent


SIX = Meta("e1", 6)  # the log of the canned catch-ups: two runs, seq 1 to 6


class Canned:
    """A catch-up's steps answered from a log, a snapshot and a meta; the steps asked.
    ``live`` is what the first take of the live frames finds."""

    def __init__(
        self,
        log: list[str],
        snapshot: Snapshot | None = None,
        meta: Meta = SIX,
        live: list[str] | None = None,
    ) -> None:
        self.log, self.snapshot, self.meta, self.live = log, snapshot, meta, live or []
        self.asked: list[Any] = []

    def __call__(self, step: Any) -> Any:
        self.asked.append(step)
        if isinstance(step, ReadSnapshot):
            return self.snapshot
        if isinstance(step, ReadMeta):
            return self.meta
        if isinstance(step, ReadLog):
            return [e for e in self.log if event_position(e)[0] > step.after][: step.count]  # type: ignore[index]
        if isinstance(step, TakeLive):
            first = sum(isinstance(a, TakeLive) for a in self.asked) == 1
            return self.live if first else []
        return True if isinstance(step, Settle) else None

    def snapshot_reads(self) -> list[ReadSnapshot]:
        return [step for step in self.asked if isinstance(step, ReadSnapshot)]


def test_a_join_gets_the_snapshot_then_the_log_after_it():
    log = [*finished_run(1, "a"), *finished_run(4, "b")]
    snap = Snapshot("s", "e1", 4, compact(fold(json.loads(e) for e in log[:4])))
    sent = drive(catch_up("s", None, replay=Replay.SNAPSHOT), Canned(log, snap))
    assert sent == [snap.frame, *log[4:]]
    raw = drive(catch_up("s", None, replay=Replay.RAW), Canned(log, snap))
    assert raw == []  # from now on: nothing of the past


def test_events_the_snapshot_holds_are_not_sent_again_after_it():
    """Events heard since the subscription that the snapshot already holds do not come
    again: after the snapshot at N, the tail from N + 1, exactly once."""
    log = [*finished_run(1, "a"), *finished_run(4, "b")]
    snap = Snapshot("s", "e1", 6, compact(fold(json.loads(e) for e in log)))
    heard = [log[4], log[5]]  # heard since the subscription: seq 5 and 6
    sent = drive(catch_up("s", None, replay=Replay.SNAPSHOT), Canned(log, snap, live=heard))
    assert sent == [snap.frame]
    assert compact(fold(json.loads(f) for f in sent)) == compact(fold(json.loads(e) for e in log))


def test_a_session_without_events_gets_no_snapshot_and_no_snapshot_read():
    log = finished_run(1, "a")
    answers = Canned([], meta=Meta(None, 0), live=log)
    assert drive(catch_up("s", None, replay=Replay.SNAPSHOT), answers) == log
    assert answers.snapshot_reads() == []


def test_a_join_from_a_log_empty_before_the_greeting_gets_what_came_since_as_events():
    """The log, empty when the client was greeted, counts six events by the time the
    catch-up reads it, and pub/sub has brought none yet: the six are the client's, as
    events, and no snapshot is read."""
    log = [*finished_run(1, "a"), *finished_run(4, "b")]
    answers = Canned(log)
    joined = catch_up("s", None, replay=Replay.SNAPSHOT, now=Meta(None, 0))
    assert drive(joined, answers) == log
    assert answers.snapshot_reads() == []


def test_a_join_from_a_log_with_events_before_the_greeting_starts_with_a_snapshot():
    log = [*finished_run(1, "a"), *finished_run(4, "b")]
    snap = Snapshot("s", "e1", 3, compact(fold(json.loads(e) for e in log[:3])))
    answers = Canned(log, snap)
    joined = catch_up("s", None, replay=Replay.SNAPSHOT, now=Meta("e1", 3))
    assert drive(joined, answers) == [snap.frame, *log[3:]]
    assert answers.snapshot_reads() == [ReadSnapshot(3)]  # no further than the greeting


async def test_a_bounded_read_takes_no_snapshot_past_its_bound(redis_client, prefix):
    """A join greeted at seq 3 must not get a snapshot at 6: events 4-6 (its own
    prompt's, say) come to it as events. A shared read past the bound is not taken, a
    stored snapshot past it is not used; one within it is."""
    bus = Bus(redis_client, Keys(prefix), log_maxlen=1000, log_ttl=60)
    job = Job(run="r1", session="s", prompt="p")
    await bus.submit(job)
    fence = (await bus.start(job, "w1", 10_000, 3)).fence
    tokens = [bus.encode(job, Thought("answer", f"t{i}")) for i in range(6)]
    assert await bus.submit_encoded(job, tokens, fence=fence, first=1) == 6
    assert await save(bus, "s")  # stored at seq 6
    snapshots = SnapshotReader(bus)
    assert (await snapshots.get("s")).seq == 6  # type: ignore[union-attr]
    bounded = await snapshots.get("s", upto=3)
    assert bounded is not None and bounded.seq == 3
    assert bounded.state["runs"]["r1"]["blocks"][0]["text"] == "t0t1t2"
    assert snapshots.reads == 2
    assert (await snapshots.get("s", upto=10)).seq == 6  # type: ignore[union-attr]
    assert snapshots.reads == 2  # the shared read was within this bound

    # A storm of joins on a live session: the first one's read is bounded by its
    # greeting, and those greeted after it take that read.
    storm = SnapshotReader(bus)
    assert [(await storm.get("s", upto)).seq for upto in (3, 4, 6)] == [3, 3, 3]  # type: ignore[union-attr]
    assert (await storm.get("s")).seq == 3  # type: ignore[union-attr]
    assert storm.reads == 1

    # With the log's start trimmed, a bound before the stored snapshot cannot be folded
    # to: the stored one is taken (what the join got before there were bounds).
    await redis_client.xtrim(bus.keys.session_log("s"), maxlen=4, approximate=False)
    assert (await current(bus, "s", upto=3)).seq == 6  # type: ignore[union-attr]


def test_a_trimmed_log_is_repaired_by_a_snapshot_that_covers_it():
    log = [*finished_run(1, "a"), *finished_run(4, "b")]
    kept = log[3:]  # the log lost seq 1-3
    snap = Snapshot("s", "e1", 6, compact(fold(json.loads(e) for e in log)))
    repaired = drive(catch_up("s", Position("e1", 1), replay=Replay.SNAPSHOT), Canned(kept, snap))
    assert repaired == [snap.frame]
    raw = drive(catch_up("s", Position("e1", 1), replay=Replay.RAW), Canned(kept, snap))
    assert json.loads(raw[0])["type"] == "gap" and raw[1:] == kept


# --- integration ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def snapping(redis_server, logdir):  # type: ignore[no-untyped-def]
    """One frontend, two workers; "search" waits for approval; 1 s leases; 300-token runs."""
    c = start_cluster(
        redis_server,
        logdir,
        frontends=1,
        workers=2,
        THOUGHTWIRE_APPROVAL_TOOLS="search",
        THOUGHTWIRE_APPROVAL_TIMEOUT="60",
        THOUGHTWIRE_LEASE_SECONDS="1",
        THOUGHTWIRE_SIM_ANSWER_TOKENS=str(TOKENS),
        THOUGHTWIRE_SIM_TOKENS_PER_SECOND="300",
        THOUGHTWIRE_MAX_SOCKETS_PER_USER="1000",
        THOUGHTWIRE_RATE_LIMIT="100000",
    )
    yield c
    c.stop()


def is_event(message: dict[str, Any]) -> bool:
    return "seq" in message and message["type"] != "snapshot"


def finished(frame: dict[str, Any]) -> bool:
    """The run's ``done``, or a snapshot taken once it was done (the session's one run)."""
    if frame["type"] == "snapshot":
        runs = frame["state"]["runs"].values()
        return bool(runs) and all(r["status"] == "done" for r in runs)
    return frame["type"] == "done"


async def join(url: str, arrived: asyncio.Future[None] | None = None) -> list[dict[str, Any]]:
    """A late joiner's frames after its greeting, up to the run's end; ``arrived`` is set
    once its first frame is in."""
    frames: list[dict[str, Any]] = []
    async with connect(url) as ws:
        await greeting(ws)
        async with asyncio.timeout(seconds(60)):
            while not frames or not finished(frames[-1]):
                frames.append(await recv_json(ws, timeout=60))
                if arrived is not None and not arrived.done():
                    arrived.set_result(None)
    return frames


def owner_pid(cluster: Cluster, session: str, run: str) -> int:
    with cluster.redis.client() as r:
        owner = r.hget(Keys(cluster.prefix).run(session, run), "owner")
    return int(owner.decode().split("-")[-2])


def check_join(frames: list[dict[str, Any]], whole: dict[str, Any]) -> None:
    """One snapshot first (if the session had events), then every event after it, exactly
    once and in order, from the snapshot's seq + 1; the same state."""
    snapshots = [i for i, f in enumerate(frames) if f["type"] == "snapshot"]
    assert snapshots in ([], [0]), [f["type"] for f in frames][:5]
    events = [f for f in frames if is_event(f)]
    if snapshots and events:
        assert events[0]["seq"] == frames[0]["seq"] + 1
    if events:
        assert check_stream(events, first=events[0]["seq"]) == 0
    assert compact(fold(frames)) == whole


async def test_joins_at_random_points_of_a_run_fold_to_the_logs_state(snapping):  # type: ignore[no-untyped-def]
    """50 joins at random seqs, more during an approval wait and during a retry."""
    rng = random.Random(7)
    url = snapping.frontends[0].ws + "/ws/agent-thoughts"
    log: list[dict[str, Any]] = []
    joins: list[asyncio.Task[list[dict[str, Any]]]] = []
    targets = sorted(rng.sample(range(1, 2 * TOKENS), 50))
    async with connect(url + "?after=0") as ws:
        session = await greeting(ws)
        joiner = f"{url}?session={session}"

        def spawn(n: int) -> list[asyncio.Future[None]]:
            arrived = [asyncio.get_running_loop().create_future() for _ in range(n)]
            joins.extend(asyncio.create_task(join(joiner, a)) for a in arrived)
            return arrived

        await ws.send("snapshots please")
        killed = False
        async with asyncio.timeout(seconds(90)):
            while not log or log[-1]["type"] != "done":
                message = await recv_json(ws, timeout=30)
                if not is_event(message):
                    continue
                log.append(message)
                while targets and targets[0] <= message["seq"]:
                    targets.pop(0)
                    spawn(1)
                if message["type"] == "approval":  # joins during the wait, then allow it
                    await asyncio.gather(*spawn(3))  # joined, and caught up, while it waits
                    await ws.send(
                        json.dumps(
                            {
                                "type": "approve",
                                "run": message["run"],
                                "call_id": message["call_id"],
                                "decision": "allow",
                            }
                        )
                    )
                answers = sum(1 for e in log if e["type"] == "answer")
                if not killed and answers == TOKENS // 3:  # a retry: its owner is killed
                    killed = True
                    victim = snapping.worker_with_pid(owner_pid(snapping, session, message["run"]))
                    victim.kill()
                    snapping.workers.remove(victim)
                    spawn(3)  # joins while the run is lost, before its retry
                if message["type"] == "retry":
                    spawn(3)
        snapping.add_worker()
        while targets:  # seqs the run did not reach: join at its end
            targets.pop()
            spawn(1)
        results = await asyncio.gather(*joins)
    assert any(e["type"] == "retry" for e in log)
    assert check_stream(log) == 0
    whole = compact(fold(log))
    assert len(results) >= 59
    for frames in results:
        check_join(frames, whole)
    assert sum(1 for frames in results if frames[0]["type"] == "snapshot") == len(results)
    runs = [r for frames in results for r in frames[0]["state"]["runs"].values()]
    assert any(r["status"] == "waiting" for r in runs)  # joined during the approval wait
    assert any(r["attempt"] == 2 for r in runs)  # and after the retry


def stored_snapshot_seq(cluster: Cluster, session: str) -> int:
    with cluster.redis.client() as r:
        seq = r.hget(Keys(cluster.prefix).session_snapshot(session), "seq")
    return int(seq or 0)


async def finished_session(cluster: Cluster) -> tuple[str, list[dict[str, Any]]]:
    """A session with one whole run (its approval allowed); its events."""
    url = cluster.frontends[0].ws + "/ws/agent-thoughts"
    log: list[dict[str, Any]] = []
    async with connect(url) as ws:
        session = await greeting(ws)
        await ws.send("a whole run")
        async with asyncio.timeout(seconds(60)):
            while not log or log[-1]["type"] != "done":
                message = await recv_json(ws, timeout=30)
                assert message["type"] != "error", message
                if not is_event(message):
                    continue
                log.append(message)
                if message["type"] == "approval":
                    approve = {"type": "approve", "run": message["run"], "decision": "allow"}
                    await ws.send(json.dumps({**approve, "call_id": message["call_id"]}))
    last = log[-1]["seq"]
    wait_until(lambda: stored_snapshot_seq(cluster, session) == last, 10, "the run's snapshot")
    return session, log


async def test_a_trimmed_log_is_repaired_by_the_snapshot_and_raw_replay_stays(snapping):  # type: ignore[no-untyped-def]
    session, log = await finished_session(snapping)
    epoch, last = log[-1]["epoch"], log[-1]["seq"]
    with snapping.redis.client() as r:
        r.xtrim(Keys(snapping.prefix).session_log(session), maxlen=5, approximate=False)
    url = f"{snapping.frontends[0].ws}/ws/agent-thoughts?session={session}&after=1&epoch={epoch}"
    async with connect(url) as ws:
        await greeting(ws)
        snapshot = await recv_json(ws)
    assert snapshot["type"] == "snapshot" and snapshot["seq"] == last
    assert compact(fold([snapshot])) == compact(fold(log))
    async with connect(url + "&replay=raw") as ws:
        await greeting(ws)
        gap = await recv_json(ws)
        tail = [await recv_json(ws) for _ in range(5)]
    assert gap["type"] == "gap" and gap["reason"] == "trimmed" and gap["next"] == last - 4
    assert tail == log[-5:]
    # A resume may ask for the raw log too.
    async with connect(f"{snapping.frontends[0].ws}/ws/agent-thoughts") as ws:
        await greeting(ws)
        resume = {"type": "resume", "session": session, "after": 1, "epoch": epoch}
        await ws.send(json.dumps({**resume, "replay": "raw"}))
        assert (await recv_json(ws))["type"] == "session"
        assert (await recv_json(ws))["type"] == "gap"
        assert [await recv_json(ws) for _ in range(5)] == log[-5:]
        await ws.send(json.dumps(resume))
        assert (await recv_json(ws))["type"] == "session"
        assert (await recv_json(ws))["seq"] == last


async def sse_first_frame(url: str) -> tuple[str, dict[str, Any]]:
    """The ``id`` (and ``event``, after a space) and data of an SSE stream's first frame."""
    lines: list[str] = []
    async with (
        httpx.AsyncClient(timeout=seconds(10)) as client,
        client.stream("GET", url) as response,
    ):
        async for line in response.aiter_lines():
            if not line and any(x.startswith("data: ") for x in lines):
                break
            lines.append(line)
    ident = next(x[4:] for x in lines if x.startswith("id: "))
    ident += "".join(" " + x[7:] for x in lines if x.startswith("event: "))
    return ident, json.loads(next(x[6:] for x in lines if x.startswith("data: ")))


async def test_sse_joins_with_a_snapshot_event_and_can_ask_for_the_raw_log(snapping):  # type: ignore[no-untyped-def]
    session, log = await finished_session(snapping)
    base = f"{snapping.frontends[0].http}/v1/sessions/{session}/events"
    ident, first = await sse_first_frame(base)
    assert first["type"] == "snapshot" and ident == f"{first['epoch']}-{first['seq']} snapshot"
    assert compact(fold([first])) == compact(fold(log))
    _ident, raw = await sse_first_frame(base + "?after=0&replay=raw")
    assert raw == log[0]


def hgetall_calls(cluster: Cluster) -> int:
    with cluster.redis.client() as r:
        stats: Any = r.info("commandstats")
    return int(stats.get("cmdstat_hgetall", {}).get("calls", 0))


async def test_a_join_storm_costs_one_snapshot_read(snapping):  # type: ignore[no-untyped-def]
    session, log = await finished_session(snapping)
    url = f"{snapping.frontends[0].ws}/ws/agent-thoughts?session={session}"
    before = hgetall_calls(snapping)

    async def one() -> dict[str, Any]:
        async with connect(url) as ws:
            await greeting(ws)
            return await recv_json(ws, timeout=30)

    firsts = await asyncio.gather(*(one() for _ in range(200)))
    assert hgetall_calls(snapping) - before == 1
    assert all(f["type"] == "snapshot" and f["seq"] == log[-1]["seq"] for f in firsts)
