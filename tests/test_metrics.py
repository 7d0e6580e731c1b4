"""Prometheus metrics of real frontends and a real worker, checked against what clients saw."""

from __future__ import annotations

import asyncio
import signal
import socket
import time
from collections.abc import Iterator
from types import SimpleNamespace

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from websockets.exceptions import ConnectionClosed

from bench.metrics_cost import Taker
from tests.conftest import Cluster, start_cluster
from tests.procs import free_port, seconds, wait_until
from tests.wsclient import connect, greeting, recv_json, run_events
from thoughtwire.api.app import create_app
from thoughtwire.api.backlog import Backlog
from thoughtwire.api.hub import Hub
from thoughtwire.api.metrics import COUNTS, Resume, lag, resume_outcome
from thoughtwire.api.recovery import Position
from thoughtwire.api.viewer import Viewer
from thoughtwire.shared.closecodes import Close
from thoughtwire.shared.keys import Keys
from thoughtwire.shared.settings import Settings
from thoughtwire.worker.metrics import MAX_REQUESTS, Probes, serving

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]

FRONTEND_METRICS = {
    "thoughtwire_sockets_open",
    "thoughtwire_events_relayed",
    "thoughtwire_frames_merged",
    "thoughtwire_slow_viewer_closes",
    "thoughtwire_resumes",
    "thoughtwire_viewer_lag_seqs",
    "thoughtwire_pubsub_reconnects",
    "thoughtwire_connections_refused",
}
WORKER_METRICS = {
    "thoughtwire_runs",
    "thoughtwire_run_duration_seconds",
    "thoughtwire_time_to_first_token_seconds",
    "thoughtwire_tokens",
    "thoughtwire_tool_calls",
    "thoughtwire_tool_call_seconds",
    "thoughtwire_append_seconds",
    "thoughtwire_append_batch_size",
    "thoughtwire_lease_losses",
    "thoughtwire_jobs_queue_depth",
    "thoughtwire_jobs_pending",
    "thoughtwire_jobs_lag",
}


def scrape(url: str) -> tuple[set[str], Samples]:
    """The metric families and every sample of ``url``'s /metrics."""
    response = httpx.get(url + "/metrics", timeout=seconds(5))
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain")
    families, samples = set(), {}
    for family in text_string_to_metric_families(response.text):
        families.add(family.name)
        for sample in family.samples:
            samples[sample.name, frozenset(sample.labels.items())] = sample.value
    return families, samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def status(url: str, path: str) -> int:
    try:
        return httpx.get(url + path, timeout=seconds(5)).status_code
    except httpx.HTTPError:
        return 0


def moved(before: Samples, after: Samples, name: str, **labels: str) -> float:
    return value(after, name, **labels) - value(before, name, **labels)


@pytest.fixture(scope="module")
def metered(redis_server, logdir) -> Iterator[tuple[Cluster, str]]:
    """Two frontends and one worker serving its metrics port; yields the port's URL."""
    cluster = start_cluster(redis_server, logdir, frontends=2, workers=0)
    try:
        port = free_port()
        cluster.add_worker(THOUGHTWIRE_METRICS_PORT=str(port))
        url = f"http://127.0.0.1:{port}"
        wait_until(lambda: status(url, "/readyz") == 200, 30, "the worker to be ready")
        yield cluster, url
    finally:
        cluster.stop()


async def wait_subscribers(cluster: Cluster, session: str, count: int) -> None:
    channel = Keys(cluster.prefix).session_channel(session)
    deadline = time.monotonic() + seconds(10)
    with cluster.redis.client() as r:
        while True:
            subscribers = int(dict(r.pubsub_numsub(channel))[channel.encode()])
            if subscribers == count:
                return
            assert time.monotonic() < deadline, f"{subscribers} subscribers, not {count}"
            await asyncio.sleep(0.02)


WS = {"endpoint": "/ws/agent-thoughts", "transport": "websocket"}


async def test_relayed_events_open_sockets_and_runs_agree_with_what_clients_got(metered):
    cluster, worker = metered
    a, b = cluster.frontends
    before = [scrape(f.http)[1] for f in (a, b)]
    _, worker_before = scrape(worker)
    runs, received = 2, 0
    async with connect(a.ws + "/ws/agent-thoughts") as prompter:
        session = await greeting(prompter)
        async with (
            connect(f"{a.ws}/ws/agent-thoughts?session={session}") as neighbour,
            connect(f"{b.ws}/ws/agent-thoughts?session={session}") as remote,
        ):
            await greeting(neighbour)
            await greeting(remote)
            await wait_subscribers(cluster, session, 2)
            assert value(scrape(a.http)[1], "thoughtwire_sockets_open", **WS) == 2
            assert value(scrape(b.http)[1], "thoughtwire_sockets_open", **WS) == 1
            for _ in range(runs):
                await prompter.send("tell me about metrics")
                got = await asyncio.gather(
                    run_events(prompter), run_events(neighbour), run_events(remote)
                )
                assert got[0] == got[1] == got[2]
                received += sum(map(len, got))
            after = [scrape(f.http)[1] for f in (a, b)]

    pairs = list(zip(before, after, strict=True))
    relayed = sum(moved(p, s, "thoughtwire_events_relayed_total") for p, s in pairs)
    print(f"\n{received} events received by 3 sockets on 2 frontends; relayed: {relayed:g}")
    assert relayed == received
    # The lag histogram sampled the three viewers at that scrape: each caught up.
    sampled = sum(moved(p, s, "thoughtwire_viewer_lag_seqs_count") for p, s in pairs)
    at_zero = sum(moved(p, s, "thoughtwire_viewer_lag_seqs_bucket", le="0.0") for p, s in pairs)
    assert sampled == at_zero == 3

    def runs_counted() -> Samples | None:
        _, now = scrape(worker)
        done = moved(worker_before, now, "thoughtwire_runs_total", outcome="done")
        return now if done == runs else None

    worker_after = wait_until(runs_counted, 10, "runs_total to count the runs")
    for histogram in ("run_duration_seconds", "time_to_first_token_seconds"):
        name = f"thoughtwire_{histogram}_count"
        assert moved(worker_before, worker_after, name) == runs, name
    # Every event of the runs appended once, in calls that were timed.
    appended = moved(worker_before, worker_after, "thoughtwire_append_batch_size_sum")
    assert appended == received / 3
    calls = moved(worker_before, worker_after, "thoughtwire_append_seconds_count")
    assert calls == moved(worker_before, worker_after, "thoughtwire_append_batch_size_count") > 0
    assert moved(worker_before, worker_after, "thoughtwire_tokens_total", direction="out") > 0

    def jobs_done() -> bool:  # every job acknowledged and deleted
        _, now = scrape(worker)
        return all(
            ("thoughtwire_jobs_" + gauge, frozenset()) in now
            and value(now, "thoughtwire_jobs_" + gauge) == 0
            for gauge in ("queue_depth", "pending", "lag")
        )

    wait_until(jobs_done, 10, "the jobs gauges to say 0")
    for frontend in (a, b):
        wait_until(
            lambda f=frontend: value(scrape(f.http)[1], "thoughtwire_sockets_open", **WS) == 0,
            10,
            "the sockets gauge to come back to 0",
        )


async def test_every_metric_of_the_contract_is_served_where_it_belongs(metered):
    cluster, worker = metered
    families, _ = scrape(cluster.frontends[0].http)
    assert families >= FRONTEND_METRICS
    assert not families & WORKER_METRICS
    families, _ = scrape(worker)
    labelled = {"thoughtwire_runs", "thoughtwire_tokens", "thoughtwire_tool_calls"}
    assert families >= WORKER_METRICS - labelled  # a labelled one shows once counted
    assert not families & FRONTEND_METRICS
    assert "process_cpu_seconds" in families
    assert status(worker, "/healthz") == 200
    assert status(worker, "/readyz") == 200
    assert status(worker, "/nothing") == 404


async def next_of(ws, kind: str) -> dict:  # type: ignore[no-untyped-def]
    while (frame := await recv_json(ws))["type"] != kind:  # bounded by recv_json's timeout
        assert "seq" not in frame, frame
    return frame


async def test_resumes_and_refusals_are_counted_by_outcome_and_reason(metered):
    cluster, _ = metered
    a, b = cluster.frontends
    async with connect(a.ws + "/ws/agent-thoughts") as ws:
        session = await greeting(ws)
        await ws.send("something to resume")
        events = await run_events(ws)
    epoch = events[0]["epoch"]
    _, before = scrape(b.http)
    # Back from seq 3 of its epoch: every later event, from the log.
    async with connect(f"{b.ws}/ws/agent-thoughts?session={session}&after=3&epoch={epoch}") as ws:
        await greeting(ws)
        assert await run_events(ws) == events[3:]
    # Back from an epoch the log never had: a gap.
    async with connect(f"{b.ws}/ws/agent-thoughts?session={session}&after=3&epoch=gone") as ws:
        await greeting(ws)
        await next_of(ws, "gap")
        await run_events(ws)  # the log from the start of its epoch; then it closes at once
    # A socket that needs a token where no authentication is configured: refused.
    async with connect(b.ws + "/ws/secure") as ws:
        with pytest.raises(ConnectionClosed, match="authentication is not configured"):
            await recv_json(ws)

    def counted() -> Samples | None:
        _, now = scrape(b.http)
        got = {o: moved(before, now, "thoughtwire_resumes_total", outcome=o) for o in Resume}
        return now if got == {"recovered": 1, "gap": 1, "snapshot": 0} else None

    after = wait_until(counted, 10, "both resumes to be counted")
    assert moved(before, after, "thoughtwire_connections_refused_total", reason="auth") == 1


async def test_a_draining_worker_is_live_and_not_ready(redis_server, logdir):
    """SIGTERM: /readyz turns 503 at once while the run in hand finishes; /healthz stays 200."""
    cluster = start_cluster(
        redis_server,
        logdir,
        frontends=1,
        workers=0,
        THOUGHTWIRE_SIM_ANSWER_TOKENS="30",
        THOUGHTWIRE_SIM_TOKENS_PER_SECOND="10",
        THOUGHTWIRE_DRAIN_TIMEOUT="20",
    )
    try:
        port = free_port()
        worker = cluster.add_worker(THOUGHTWIRE_METRICS_PORT=str(port))
        url = f"http://127.0.0.1:{port}"
        wait_until(lambda: status(url, "/readyz") == 200, 30, "the worker to be ready")
        async with connect(cluster.frontends[0].ws + "/ws/agent-thoughts") as ws:
            await greeting(ws)
            await ws.send("a run of about three seconds")
            while (await recv_json(ws))["type"] != "answer":  # bounded by its timeout
                pass
            worker.signal(signal.SIGTERM)
            wait_until(lambda: status(url, "/readyz") == 503, 2, "/readyz to say 503")
            assert status(url, "/healthz") == 200
            events = await run_events(ws)
        assert events[-1]["type"] == "done"  # the run in hand finished while draining
        assert worker.stop() == 0
    finally:
        cluster.stop()


def test_a_resume_is_told_by_the_frames_its_catch_up_sent():
    gap = '{"type":"gap","session":"s","reason":"epoch","after":3,"epoch":"e","next":1}'
    snapshot = '{"type":"snapshot","session":"s","seq":4,"epoch":"e"}'
    event = '{"type":"answer","content":"\\"type\\":\\"gap\\"","seq":5,"epoch":"e"}'
    assert resume_outcome([event], Resume.RECOVERED) is Resume.RECOVERED
    assert resume_outcome([snapshot, event], Resume.RECOVERED) is Resume.SNAPSHOT
    assert resume_outcome([gap, snapshot], Resume.RECOVERED) is Resume.GAP
    assert resume_outcome([event], Resume.GAP) is Resume.GAP


class _Viewer:
    """What ``lag`` reads of a viewer."""

    def __init__(self, position: Position, oldest: str | None = None) -> None:
        self.session = "s"
        self.bus = SimpleNamespace(session_channel=lambda session: f"c:{session}")
        self.position = position
        self._oldest = oldest

    def oldest_waiting(self) -> str | None:
        return self._oldest


def test_a_viewers_lag_counts_from_the_oldest_event_its_socket_has_not_taken():
    heads = {b"c:s": (40, "e")}
    assert lag(_Viewer(Position("e", 40)), heads) == 0  # caught up
    assert lag(_Viewer(Position("e", 25)), heads) == 15  # catching up from the log
    merged = '{"type":"answer","content":"abc","from_seq":31,"seq":33,"epoch":"e"}'
    assert lag(_Viewer(Position("e", 40), merged), heads) == 10  # 31..40 wait in its queue
    assert lag(_Viewer(Position("other", 3)), heads) is None  # another epoch: not comparable
    assert lag(_Viewer(Position("e", 3)), {}) is None  # nothing heard on its session yet


def test_with_metrics_off_a_frontend_serves_no_metrics():
    paths = {getattr(r, "path", None) for r in create_app(Settings(metrics=False)).routes}
    assert "/metrics" not in paths and "/healthz" in paths
    assert "/metrics" in {getattr(r, "path", None) for r in create_app(Settings()).routes}


async def test_a_worker_whose_metrics_port_is_taken_runs_on_without_it(caplog):
    with socket.socket() as holder:
        holder.bind(("", 0))
        holder.listen()
        probes = Probes(asyncio.get_running_loop(), None, lambda: True)  # type: ignore[arg-type]
        async with serving(holder.getsockname()[1], probes) as port:
            assert port is None
    assert "not served" in caplog.text
    async with serving(0, probes) as port:
        assert port is None


def delta(seq: int) -> str:
    """An answer delta as the log writes it: position last."""
    head = '{"type":"answer","content":"tok ","block":"b1","delta":true,"session":"s","run":"r"'
    return head + f',"seq":{seq},"epoch":"e"}}'


async def test_merged_frames_and_slow_viewers_closed_are_counted_where_they_happen():
    merged, closes = COUNTS.merged, COUNTS.slow_closes[Close.SLOW]
    backlog = Backlog(merge_after=8, max_bytes=1 << 20)
    for seq in range(1, 10):
        backlog.push(delta(seq))
    assert len(backlog) == 1 and COUNTS.merged - merged == 8  # nine frames made one
    hub = Hub(lambda *_: None, "home")  # type: ignore[arg-type]
    slow, gone = (Viewer(None, hub, Taker(), queue_size=8) for _ in range(2))  # type: ignore[arg-type]
    slow.close(Close.SLOW, "slow")
    slow.close(Close.SLOW, "slow")  # closed already: not counted again
    gone.close(Close.NORMAL, "bye")
    assert COUNTS.slow_closes[Close.SLOW] - closes == 1


async def test_with_metrics_off_a_workers_port_still_answers_its_probes():
    """A deployment that turns metrics off keeps its liveness and readiness probes."""
    loop = asyncio.get_running_loop()
    probes = Probes(loop, None, lambda: True, metrics_on=False)  # type: ignore[arg-type]

    def get(path: str) -> str:
        statuses: list[str] = []
        probes({"PATH_INFO": path}, lambda status, headers: statuses.append(status))
        return statuses[0]

    assert await asyncio.to_thread(get, "/healthz") == "200 OK"
    assert await asyncio.to_thread(get, "/readyz") == "200 OK"
    assert await asyncio.to_thread(get, "/metrics") == "404 Not Found"


async def test_silent_clients_filling_a_workers_port_do_not_fail_its_probes():
    """Connections that never send a request (or drip one) give way to a probe: with
    every slot held by one, the port used to close the kubelet's probe at once."""
    probes = Probes(asyncio.get_running_loop(), None, lambda: True)  # type: ignore[arg-type]
    async with serving(free_port(), probes) as port:
        assert port is not None
        silent = [socket.create_connection(("127.0.0.1", port)) for _ in range(MAX_REQUESTS)]
        silent[0].sendall(b"GET /healthz HTTP/1.1\r\n")  # a head that never ends
        try:
            async with httpx.AsyncClient(timeout=seconds(3)) as client:
                for _ in range(3):
                    answer = await client.get(f"http://127.0.0.1:{port}/healthz")
                    assert answer.status_code == 200
        finally:
            for held in silent:
                held.close()
