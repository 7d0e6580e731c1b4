"""What a paced event costs Redis: thoughtwire beside the thin relay's bare PUBLISH, one run.

One redis-server of its own; for each system in turn, the same paced load as
bench/run.py's streams scenario (200 streams at 50 tokens/s, two frontends, one worker or
feeder, one watcher each), in ``--rounds`` alternating rounds:

- ``thoughtwire``, as deployed;
- ``thoughtwire-unbundled``: the same, but every append call is a script run of its own,
  as before bundles (``Batcher.bundles`` turned off in its processes by a
  ``sitecustomize`` this tool writes), to show what bundling saves;
- ``thoughtwire-public``: its fast paths off (``THOUGHTWIRE_FAST_PATHS=0``);
- ``thin``: the thin relay, one bare PUBLISH per event.

Redis' CPU is redis-server's own (utime + stime from /proc/PID/stat over the load, and
``INFO cpu`` over the whole run), divided by the events produced. ``INFO stats`` and
``INFO commandstats`` are reset before each run and read after, so the report says what
Redis did per event: socket reads and writes, commands, and each command's calls and µs
(wall time inside Redis; a script's figure includes the commands it calls, which are
listed too).

    python -m bench.redis_cost                      # about 2 minutes
    python -m bench.redis_cost --sessions 4 --tokens 20 --rounds 1   # seconds
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import signal
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

from redis import Redis

from bench.run import System, machine, measure_streams, own_redis

SYSTEMS = ("thoughtwire", "thoughtwire-unbundled", "thoughtwire-public", "thin")
UNBUNDLED = """# Written by bench/redis_cost.py: one script run per append call, as before bundles.
from thoughtwire.shared.redis.pipeline import Batcher

Batcher.bundles = property(lambda self: False)
"""


def commandstats(redis: Redis) -> dict[str, dict[str, float]]:
    """``INFO commandstats``: calls and µs per command."""
    info: Any = redis.info("commandstats")
    return {
        name.removeprefix("cmdstat_"): {"calls": stats["calls"], "usec": stats["usec"]}
        for name, stats in info.items()
    }


def redis_cpu(redis: Redis) -> float:
    """Redis' CPU seconds by its own count (``INFO cpu``), finer than /proc's ticks."""
    info: Any = redis.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


def traffic(redis: Redis, events: float) -> dict[str, float]:
    """Per event since the last reset: reads and writes of sockets, commands, bytes."""
    info: Any = redis.info("stats")
    names = ("total_reads_processed", "total_writes_processed", "total_commands_processed")
    names += ("total_net_input_bytes", "total_net_output_bytes")
    return {name.removeprefix("total_"): round(info[name] / events, 3) for name in names}


def breakdown(stats: dict[str, dict[str, float]], events: float) -> dict[str, Any]:
    """Per event: calls and µs of each command, the busiest first."""
    rows = sorted(stats.items(), key=lambda item: -item[1]["usec"])
    return {
        name: {
            "calls_per_event": round(s["calls"] / events, 3),
            "us_per_event": round(s["usec"] / events, 2),
        }
        for name, s in rows
        if s["calls"]
    }


def measure(system: System, scenario: dict[str, Any], client: Redis) -> dict[str, Any]:
    """One run of the streams load through ``system``, with Redis' cost per event."""
    client.config_resetstat()
    before = redis_cpu(client)
    result = measure_streams(system, scenario)
    spent = redis_cpu(client) - before
    events = max(result["delivered"] / scenario["watchers"], 1)
    stats = commandstats(client)
    return {
        "events": round(events),
        "redis_cpu_us_per_event": result["redis_cpu_us_per_event"],  # /proc, the load only
        "redis_info_cpu_us_per_event": round(spent * 1e6 / events, 2),  # whole run
        "per_event": traffic(client, events),
        "commands": breakdown(stats, events),
        "lost": result["lost"],
        "duplicated": result["duplicated"],
        "out_of_order": result["out_of_order"],
        "latency_ms_p99": result["latency_ms_p99"],
        "worker_cpu_us_per_event": result["worker_cpu_us_per_event"],
    }


def unbundled(logdir: Path) -> dict[str, str]:
    """The environment that turns bundles off in a system's processes."""
    patch = logdir / "unbundled"
    patch.mkdir(exist_ok=True)
    (patch / "sitecustomize.py").write_text(UNBUNDLED)
    return {"PYTHONPATH": os.pathsep.join(filter(None, [str(patch), os.environ.get("PYTHONPATH")]))}


def summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The median and range of each system's Redis µs per event over its rounds."""
    figures = [run["redis_cpu_us_per_event"] for run in runs]
    per_event = [run["per_event"] for run in runs]
    scripts = [run["commands"].get("evalsha", {}).get("calls_per_event", 0) for run in runs]
    return {
        "redis_cpu_us_per_event_median": round(statistics.median(figures), 1),
        "redis_cpu_us_per_event_range": [min(figures), max(figures)],
        "commands_per_event_median": statistics.median(p["commands_processed"] for p in per_event),
        "socket_reads_per_event_median": statistics.median(p["reads_processed"] for p in per_event),
        "script_runs_per_event_median": statistics.median(scripts),
        "latency_ms_p99_median": statistics.median(run["latency_ms_p99"] for run in runs),
        "lost": sum(run["lost"] for run in runs),
        "duplicated": sum(run["duplicated"] for run in runs),
        "out_of_order": sum(run["out_of_order"] for run in runs),
    }


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sessions", type=int, default=200)
    parser.add_argument("--tokens", type=int, default=200)
    parser.add_argument("--rate", type=float, default=50)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--systems", default=",".join(SYSTEMS))
    parser.add_argument("--out", default="bench/results/redis_cost.json")
    args = parser.parse_args()
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))  # unwinds: every process stops
    scenario = {"sessions": args.sessions, "watchers": 1, "tokens": args.tokens}
    scenario.update(rate=args.rate, jitter=0.5)
    logdir = Path(tempfile.mkdtemp(prefix="thoughtwire-redis-cost-"))
    report: dict[str, Any] = {
        "machine": machine(),
        "command": " ".join(sys.argv),
        "scenario": scenario,
        "runs": {},
    }
    with own_redis(logdir) as (redis_url, redis):
        client = Redis.from_url(redis_url)
        try:
            for round_ in range(args.rounds):
                for name in args.systems.split(","):
                    prefix = f"rc{round_}{name[0]}{len(name)}{redis.pid}"
                    env = unbundled(logdir) if name == "thoughtwire-unbundled" else {}
                    system = System(
                        name, redis, redis_url, logdir, {**scenario, "env": env}, prefix
                    )
                    try:
                        run = measure(system.start(), scenario, client)
                    finally:
                        system.stop()
                    report["runs"].setdefault(name, []).append(run)
                    print(f"{name:>18} {json.dumps(run)}", flush=True)
        finally:
            client.close()
    report["summary"] = {name: summary(runs) for name, runs in report["runs"].items()}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report["summary"], indent=2))
    print(f"wrote {args.out}; logs in {logdir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
