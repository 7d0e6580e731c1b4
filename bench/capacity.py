"""The capacity model: how many frontends, workers and Redis shards a load needs, worked
out from the per-event costs the benchmarks measured (bench/results/*.json).

Every process is given one core and planned at ``--utilisation`` of it. A frontend
spends CPU per event it delivers to a socket, a worker and Redis per event written; a
stream writes one event per token times what the worker's coalescing window leaves.
docs/capacity.md embeds what this prints, and ``tests/test_capacity.py`` checks that the
page holds exactly that, so the page follows the results files.

    .venv/bin/python -m bench.capacity                            # print the tables
    .venv/bin/python -m bench.capacity --write docs/capacity.md   # put them in the page
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from thoughtwire.shared.settings import Settings

RESULTS = Path(__file__).parent / "results"
RATE = 50  # tokens per second of one stream
WINDOW_MS = 15.0  # the worker's coalescing window, as deployed
UTILISATION = 0.6  # the share of its core a process is planned to use
STREAMS = (1_000, 10_000, 100_000)
VIEWERS = (10_000, 100_000, 1_000_000)
VIEWERS_PER_STREAM = 10
CLUSTER_FILES = ("redis_cost_cluster.json", "redis_cost.json")
PLURAL = {"delivery": "deliveries", "event": "events"}
BEGIN = "<!-- capacity: begin (made by python -m bench.capacity --write docs/capacity.md) -->"
END = "<!-- capacity: end -->"


@dataclass(frozen=True)
class Figure:
    """One measured figure and the results file (and field) it was read from."""

    value: float
    source: str


@dataclass(frozen=True)
class Costs:
    """What the model is built from: per-event CPU, memory, and the scale that was run."""

    frontend_stream: Figure  # µs per delivered event, one viewer of a session per frontend
    frontend_fanout: Figure  # µs per delivered event, many viewers of a session per frontend
    frontend_batched: Figure  # the same when a frontend falls behind and reads batch
    worker: Figure  # µs per event written, paced
    redis_node: Figure  # µs per event, one server, bundled appends
    redis_unbundled: Figure  # µs per event, one script run per call
    redis_cluster: Figure | None  # µs per event summed over a cluster's masters
    worker_cluster: Figure | None  # a worker's µs per event when Redis is a cluster
    kb_per_socket: Figure
    frontend_base_mb: Figure
    events_per_token: Figure
    measured_streams: int
    measured_viewers: int
    max_connections: int
    worker_concurrency: int


@dataclass(frozen=True)
class Load:
    """A load to plan for: streams at ``RATE`` tokens/s, and who watches them."""

    label: str
    streams: int
    viewers: int
    shared_frontends: bool  # a session's viewers share frontends (a broadcast)


@dataclass(frozen=True)
class Plan:
    """What a load takes."""

    events: float  # written per second
    deliveries: float  # events written to sockets per second
    frontends: int
    frontend_us: float  # the per-delivery figure the count used
    frontend_rss_mb: float
    workers: int
    worker_us: float  # the per-event figure the count used
    workers_at_default: int
    shards: int
    redis_us: float  # the per-event figure the count used


def read(results: Path, name: str) -> Any:
    return json.loads((results / name).read_text())


def thoughtwire_fanout(results: Path, name: str) -> tuple[Figure, int]:
    run = read(results, name)["results"]["thoughtwire"]
    cost = run["frontend_cpu_us_per_event"]
    source = f"`{name}`, {run['viewers']:,} viewers of one stream"
    return Figure(cost, source), run["viewers"]


def redis_figures(results: Path) -> tuple[Figure, Figure, int]:
    """One server's Redis figures, bundled and not, and the streams the run had."""
    report = read(results, "redis_cost.json")
    summary = report["summary"]
    rounds = len(report["runs"]["thoughtwire"])
    node = Figure(
        summary["thoughtwire"]["redis_cpu_us_per_event_median"],
        f"`redis_cost.json`, `thoughtwire`, median of {rounds} rounds",
    )
    unbundled = Figure(
        summary["thoughtwire-unbundled"]["redis_cpu_us_per_event_median"],
        f"`redis_cost.json`, `thoughtwire-unbundled`, median of {rounds} rounds",
    )
    return node, unbundled, report["scenario"]["sessions"]


def cluster_figures(results: Path) -> tuple[Figure | None, Figure | None]:
    """Redis' CPU per event summed over a cluster's masters, and the worker's, from the
    cluster's own run when there is one, else from the cluster part of the one-server run."""
    for name in CLUSTER_FILES:
        runs = read(results, name).get("cluster") if (results / name).exists() else None
        if runs:
            source = f"`{name}`, `cluster`, median of {len(runs)} rounds"
            redis = statistics.median(run["redis_cpu_us_per_event"] for run in runs)
            retried = [str(run["runs_retried"]) for run in runs if "runs_retried" in run]
            suffix = f"; runs retried: {', '.join(retried)}" if retried else ""
            workers = [
                run["worker_cpu_us_per_event"] for run in runs if "worker_cpu_us_per_event" in run
            ]
            worker = Figure(statistics.median(workers), source) if workers else None
            return Figure(redis, source + suffix), worker
    return None, None


def events_per_token(results: Path) -> Figure:
    for row in read(results, "coalescing.json"):
        if row["tokens_per_second"] == RATE and row["window_ms"] == WINDOW_MS:
            value = row["events_per_run"] / row["tokens"]
            return Figure(value, f"`coalescing.json`, {RATE} tokens/s, {WINDOW_MS:g} ms window")
    raise LookupError(f"coalescing.json has no row for {RATE} tokens/s at {WINDOW_MS} ms")


def load_costs(results: Path = RESULTS) -> Costs:
    """Read every figure the model uses from the results files."""
    latest = read(results, "latest.json")["results"]
    streams = latest["streams"]["thoughtwire"]
    idle = latest["idle"]["thoughtwire"]
    fanouts = [thoughtwire_fanout(results, n) for n in ("fanout1000.json", "fanout5000.json")]
    planned, batched = sorted(fanouts, key=lambda f: -f[0].value)  # the dearer one is planned
    node, unbundled, measured_streams = redis_figures(results)
    cluster, worker_cluster = cluster_figures(results)
    defaults = Settings.model_fields
    return Costs(
        frontend_stream=Figure(streams["frontend_cpu_us_per_event"], "`latest.json`, streams"),
        frontend_fanout=planned[0],
        frontend_batched=batched[0],
        worker=Figure(streams["worker_cpu_us_per_event"], "`latest.json`, streams"),
        redis_node=node,
        redis_unbundled=unbundled,
        redis_cluster=cluster,
        worker_cluster=worker_cluster,
        kb_per_socket=Figure(
            idle["rss_kb_per_socket"], f"`latest.json`, idle, {idle['sockets']:,} sockets"
        ),
        frontend_base_mb=Figure(streams["frontend_peak_rss_mb"], "`latest.json`, streams"),
        events_per_token=events_per_token(results),
        measured_streams=measured_streams,
        measured_viewers=max(viewers for _, viewers in fanouts),
        max_connections=defaults["max_connections"].default,
        worker_concurrency=defaults["worker_concurrency"].default,
    )


def processes(per_second: float, us_per_event: float, utilisation: float) -> int:
    """Processes of one core each that carry ``per_second`` events at ``utilisation``."""
    cores = per_second * us_per_event / 1e6
    return max(1, math.ceil(cores / utilisation - 1e-9))


def carried(us_per_event: float, utilisation: float) -> float:
    """Events per second one process carries at ``utilisation`` of its core."""
    return utilisation * 1e6 / us_per_event


def shards(events: float, costs: Costs, utilisation: float) -> tuple[int, float]:
    """Redis shards for ``events`` a second: one server while it suffices, else a cluster
    at the cluster's measured cost (the unbundled one when no cluster was run)."""
    if processes(events, costs.redis_node.value, utilisation) == 1:
        return 1, costs.redis_node.value
    figure = costs.redis_cluster or costs.redis_unbundled
    return processes(events, figure.value, utilisation), figure.value


def worker_cost(costs: Costs, shards: int) -> float:
    """A worker's µs per event: more on a cluster, through redis-py's cluster pipeline."""
    if shards > 1 and costs.worker_cluster:
        return costs.worker_cluster.value
    return costs.worker.value


def plan(load: Load, costs: Costs, utilisation: float = UTILISATION) -> Plan:
    """What ``load`` takes under the model."""
    per_stream = RATE * costs.events_per_token.value
    events = load.streams * per_stream
    deliveries = load.viewers * per_stream
    frontend = costs.frontend_fanout if load.shared_frontends else costs.frontend_stream
    frontends = max(
        processes(deliveries, frontend.value, utilisation),
        math.ceil(load.viewers / costs.max_connections),
    )
    sockets_mb = load.viewers / frontends * costs.kb_per_socket.value / 1024
    redis, redis_us = shards(events, costs, utilisation)
    worker_us = worker_cost(costs, redis)
    return Plan(
        events=events,
        deliveries=deliveries,
        frontends=frontends,
        frontend_us=frontend.value,
        frontend_rss_mb=costs.frontend_base_mb.value + sockets_mb,
        workers=processes(events, worker_us, utilisation),
        worker_us=worker_us,
        workers_at_default=math.ceil(load.streams / costs.worker_concurrency),
        shards=redis,
        redis_us=redis_us,
    )


def loads() -> list[Load]:
    """The loads of the page's table."""
    rows = [Load(f"{n:,} streams, a viewer each", n, n, False) for n in STREAMS]
    rows += [
        Load(f"{n:,} viewers, {VIEWERS_PER_STREAM} per stream", n // VIEWERS_PER_STREAM, n, False)
        for n in VIEWERS
    ]
    rows += [Load(f"{n:,} viewers of one stream", 1, n, True) for n in VIEWERS]
    return rows


def beyond(load: Load, costs: Costs) -> str:
    """How far past the largest run measured a load lies."""
    parts = []
    if load.streams > costs.measured_streams:
        parts.append(f"{load.streams / costs.measured_streams:,.0f} times the streams")
    if load.viewers != load.streams and load.viewers > costs.measured_viewers:
        parts.append(f"{load.viewers / costs.measured_viewers:,.0f} times the viewers")
    return ", ".join(parts) or "within"


def cpu_rows(costs: Costs) -> list[tuple[str, Figure | None, str, str]]:
    """The CPU figures: what, the figure, per what, and what a process then carries."""
    return [
        ("frontend, a viewer of each stream on it", costs.frontend_stream, "delivery", "viewers"),
        ("frontend, many viewers of a stream on it", costs.frontend_fanout, "delivery", "viewers"),
        ("the same, reads batched (not planned on)", costs.frontend_batched, "delivery", "viewers"),
        ("worker, Redis one server", costs.worker, "event", "streams"),
        ("worker, Redis a cluster", costs.worker_cluster, "event", "streams"),
        ("Redis, one server (bundled appends)", costs.redis_node, "event", "streams"),
        ("Redis, a script run per append", costs.redis_unbundled, "event", "streams"),
        ("Redis Cluster, summed over its masters", costs.redis_cluster, "event", "streams"),
    ]


def figures_table(costs: Costs, utilisation: float) -> list[str]:
    """What each process costs, where it was read, and what one carries."""
    per_stream = RATE * costs.events_per_token.value
    tokens = costs.events_per_token
    lines = [
        f"| figure | measured | from | one process at {utilisation:.0%} of a core |",
        "|---|---:|---|---|",
        f"| events per token | {tokens.value:.2f} | {tokens.source} | {per_stream:g} events/s a stream |",
    ]
    for what, figure, per, who in cpu_rows(costs):
        if figure is None:
            continue
        n = carried(figure.value, utilisation)
        lines.append(
            f"| {what} | {figure.value:g} µs/{per} | {figure.source} | "
            f"{n:,.0f} {PLURAL[per]}/s: {n / per_stream:,.0f} {who} |"
        )
    cap = costs.max_connections
    cap_mb = cap * costs.kb_per_socket.value / 1024
    base, socket = costs.frontend_base_mb, costs.kb_per_socket
    lines += [
        f"| frontend's RSS | {base.value:g} MB | {base.source} | its peak, 100 sockets each |",
        f"| idle socket | {socket.value:g} KB | {socket.source} | {cap:,} (the cap): {cap_mb:,.0f} MB |",
    ]
    return lines


def capacity_table(costs: Costs, utilisation: float) -> list[str]:
    """The loads and what each takes."""
    lines = [
        "| load | events/s written | deliveries/s | frontends | frontend RSS each | "
        f"workers | workers at {costs.worker_concurrency} runs each | Redis shards | "
        "beyond the largest run measured |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for load in loads():
        p = plan(load, costs, utilisation)
        lines.append(
            f"| {load.label} | {p.events:,.0f} | {p.deliveries:,.0f} | "
            f"{p.frontends:,} ({p.frontend_us:g} µs) | {p.frontend_rss_mb:,.0f} MB | "
            f"{p.workers:,} ({p.worker_us:g} µs) | {p.workers_at_default:,} | "
            f"{p.shards:,} ({p.redis_us:g} µs) | {beyond(load, costs)} |"
        )
    return lines


def render(costs: Costs, utilisation: float = UTILISATION) -> str:
    """The page's generated part: the figures, then the capacity table."""
    lines = [
        f"Figures read from `bench/results/`; every process on a core of its own at "
        f"{utilisation:.0%} of it; streams at {RATE} tokens/s with the {WINDOW_MS:g} ms "
        "coalescing window.",
        "",
        *figures_table(costs, utilisation),
        "",
        *capacity_table(costs, utilisation),
    ]
    return "\n".join(lines) + "\n"


def embedded(page: str) -> str:
    """The generated part of a page: what lies between its markers."""
    start = page.index(BEGIN) + len(BEGIN) + 1
    return page[start : page.index(END)]


def write(page_path: Path, text: str) -> None:
    """Replace the generated part of the page at ``page_path`` with ``text``."""
    page = page_path.read_text()
    start = page.index(BEGIN) + len(BEGIN) + 1
    page_path.write_text(page[:start] + text + page[page.index(END) :])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--results", type=Path, default=RESULTS, help="the results folder")
    parser.add_argument("--utilisation", type=float, default=UTILISATION)
    parser.add_argument("--write", type=Path, help="a page to put the tables in")
    args = parser.parse_args()
    text = render(load_costs(args.results), args.utilisation)
    if args.write:
        write(args.write, text)
        print(f"wrote {args.write}")
    else:
        print(text, end="")


if __name__ == "__main__":
    main()
