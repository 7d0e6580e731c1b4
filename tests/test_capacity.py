"""The capacity page holds what the results files give, and the model counts as it says."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from bench.capacity import (
    Costs,
    Figure,
    Load,
    embedded,
    load_costs,
    plan,
    processes,
    render,
    write,
)

ROOT = Path(__file__).parent.parent
PAGE = ROOT / "docs" / "capacity.md"


def costs(**changes: Any) -> Costs:
    """Round figures, so that what the model makes of them can be counted by hand."""
    base = Costs(
        frontend_stream=Figure(20.0, "s"),
        frontend_fanout=Figure(10.0, "f"),
        frontend_batched=Figure(2.0, "b"),
        worker=Figure(30.0, "w"),
        redis_node=Figure(20.0, "n"),
        redis_unbundled=Figure(25.0, "u"),
        redis_cluster=Figure(40.0, "c"),
        worker_cluster=Figure(60.0, "wc"),
        kb_per_socket=Figure(20.0, "k"),
        frontend_base_mb=Figure(60.0, "m"),
        events_per_token=Figure(1.0, "e"),
        measured_streams=200,
        measured_viewers=5000,
        max_connections=10_000,
        worker_concurrency=32,
    )
    return dataclasses.replace(base, **changes)


def test_the_page_holds_the_tables_the_script_prints_from_the_results_files():
    printed = subprocess.run(
        [sys.executable, "-m", "bench.capacity"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    assert printed == render(load_costs())
    assert embedded(PAGE.read_text()) == printed, (
        "docs/capacity.md differs from what bench/results/ gives: run "
        "`.venv/bin/python -m bench.capacity --write docs/capacity.md`"
    )


def test_write_replaces_only_what_lies_between_the_markers(tmp_path):
    page = tmp_path / "capacity.md"
    page.write_text(PAGE.read_text().replace(embedded(PAGE.read_text()), "old\n"))
    write(page, "new\n")
    text = page.read_text()
    assert embedded(text) == "new\n"
    assert text.replace("new\n", "") == PAGE.read_text().replace(embedded(PAGE.read_text()), "")


def test_a_process_is_planned_at_its_share_of_a_core():
    assert processes(30_000, 20.0, 0.6) == 1  # 0.6 of a core exactly
    assert processes(30_001, 20.0, 0.6) == 2
    assert processes(0, 20.0, 0.6) == 1
    assert processes(30_000, 20.0, 0.3) == 2


def test_streams_take_workers_and_redis_by_events_and_frontends_by_deliveries():
    p = plan(Load("", streams=1_000, viewers=10_000, shared_frontends=False), costs())
    assert (p.events, p.deliveries) == (50_000, 500_000)
    assert p.frontends == 17  # 500,000 deliveries at 20 µs: 10 cores, at 0.6 each
    assert p.workers == 5  # 50,000 events at 60 µs (Redis is a cluster here): 3 cores
    assert p.workers_at_default == 32  # 1,000 runs at 32 a worker
    assert p.frontend_rss_mb == 60.0 + 10_000 / 17 * 20 / 1024


def test_viewers_sharing_frontends_are_counted_at_the_fanout_cost():
    p = plan(Load("", streams=1, viewers=10_000, shared_frontends=True), costs())
    assert p.frontends == 9  # 500,000 deliveries at 10 µs: 5 cores
    assert (p.workers, p.shards) == (1, 1)


def test_frontends_never_hold_more_sockets_than_the_connection_cap():
    cheap = costs(frontend_fanout=Figure(0.01, "f"))
    p = plan(Load("", streams=1, viewers=1_000_000, shared_frontends=True), cheap)
    assert p.frontends == 100


def test_coalescing_scales_the_events_of_a_stream():
    p = plan(Load("", 1_000, 1_000, False), costs(events_per_token=Figure(0.5, "e")))
    assert (p.events, p.deliveries) == (25_000, 25_000)


def test_redis_is_one_server_while_it_suffices_then_a_cluster_at_the_cluster_cost():
    one = plan(Load("", 600, 600, False), costs())  # 30,000 events at 20 µs: 0.6 of a core
    assert (one.shards, one.redis_us) == (1, 20.0)
    many = plan(Load("", 601, 601, False), costs())
    assert (many.shards, many.redis_us) == (3, 40.0)  # 30,050 events at 40 µs: 1.2 cores
    unbundled = plan(Load("", 601, 601, False), costs(redis_cluster=None))
    assert (unbundled.shards, unbundled.redis_us) == (2, 25.0)


def test_workers_on_a_cluster_are_counted_at_the_clusters_worker_cost():
    one = plan(Load("", 600, 600, False), costs())
    assert (one.workers, one.worker_us) == (2, 30.0)  # 30,000 events at 30 µs: 0.9 of a core
    many = plan(Load("", 601, 601, False), costs())
    assert (many.workers, many.worker_us) == (4, 60.0)  # 30,050 events at 60 µs: 1.8 cores
    unknown = plan(Load("", 601, 601, False), costs(worker_cluster=None))
    assert (unknown.workers, unknown.worker_us) == (2, 30.0)


def fanout(viewers: int, cost: float) -> dict[str, Any]:
    run = {"viewers": viewers, "frontend_cpu_us_per_event": cost}
    return {"results": {"thoughtwire": run}}


def redis_cost(cluster: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "scenario": {"sessions": 200},
        "runs": {"thoughtwire": [{}, {}, {}]},
        "summary": {
            "thoughtwire": {"redis_cpu_us_per_event_median": 21.0},
            "thoughtwire-unbundled": {"redis_cpu_us_per_event_median": 27.0},
        },
        "cluster": cluster,
    }


def results(folder: Path, cluster: list[dict[str, Any]]) -> Path:
    stream = {
        "frontend_cpu_us_per_event": 26.0,
        "worker_cpu_us_per_event": 36.0,
        "frontend_peak_rss_mb": 61.0,
    }
    idle = {"sockets": 10_000, "rss_kb_per_socket": 19.5}
    files = {
        "latest.json": {
            "results": {"streams": {"thoughtwire": stream}, "idle": {"thoughtwire": idle}}
        },
        "fanout1000.json": fanout(1000, 9.0),
        "fanout5000.json": fanout(5000, 3.0),
        "redis_cost.json": redis_cost(cluster),
        "coalescing.json": [
            {"tokens_per_second": 50, "window_ms": 0.0, "tokens": 300, "events_per_run": 300},
            {"tokens_per_second": 50, "window_ms": 15.0, "tokens": 300, "events_per_run": 240},
        ],
    }
    for name, content in files.items():
        (folder / name).write_text(json.dumps(content))
    return folder


def test_the_costs_are_read_from_the_results_files(tmp_path):
    cluster = [
        {"redis_cpu_us_per_event": v, "runs_retried": 0, "worker_cpu_us_per_event": v * 2}
        for v in (50.0, 40.0, 60.0)
    ]
    read = load_costs(results(tmp_path, cluster))
    assert (read.frontend_stream.value, read.worker.value) == (26.0, 36.0)
    assert (read.frontend_fanout.value, read.frontend_batched.value) == (9.0, 3.0)
    assert (read.redis_node.value, read.redis_unbundled.value) == (21.0, 27.0)
    assert read.redis_cluster == Figure(
        50.0, "`redis_cost.json`, `cluster`, median of 3 rounds; runs retried: 0, 0, 0"
    )
    assert read.worker_cluster == Figure(100.0, "`redis_cost.json`, `cluster`, median of 3 rounds")
    assert read.events_per_token.value == 0.8  # the 15 ms window's row
    assert (read.measured_streams, read.measured_viewers) == (200, 5000)
    assert (read.kb_per_socket.value, read.frontend_base_mb.value) == (19.5, 61.0)


def test_without_a_cluster_run_the_unbundled_cost_is_the_clusters(tmp_path):
    read = load_costs(results(tmp_path, []))
    assert (read.redis_cluster, read.worker_cluster) == (None, None)
    assert "Redis Cluster" not in render(read)
    p = plan(Load("", 1_000, 1_000, False), read)
    assert p.redis_us == 27.0


def test_the_clusters_own_run_is_preferred_to_the_cluster_part_of_the_one_server_run(tmp_path):
    folder = results(tmp_path, [{"redis_cpu_us_per_event": 50.0}])
    own = {"cluster": [{"redis_cpu_us_per_event": 26.0, "runs_retried": 0}]}
    (folder / "redis_cost_cluster.json").write_text(json.dumps(own))
    read = load_costs(folder)
    assert read.redis_cluster == Figure(
        26.0, "`redis_cost_cluster.json`, `cluster`, median of 1 rounds; runs retried: 0"
    )
