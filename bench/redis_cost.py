"""What a paced event costs Redis: thoughtwire beside the thin relay's bare PUBLISH, one run.

One redis-server of its own; for each system in turn, the same paced load as
bench/run.py's streams scenario (200 streams at 50 tokens/s, two frontends, one worker or
feeder, one watcher each), in ``--rounds`` alternating rounds:

- ``thoughtwire``, as deployed;
- ``thoughtwire-unbundled``: the same, but every append call is a script run of its own,
  as before bundles (``Batcher.bundles`` turned off in its processes by a
  ``sitecustomize`` this tool writes), to show what bundling saves;
- ``thoughtwire-public``: its fast paths off (``THOUGHTWIRE_FAST_PATHS=0``);
- ``thin``: the thin relay, one bare PUBLISH per event;
- ``thin-logged``: the least a resumable relay asks of Redis, the floor: the thin relay,
  its feeder appending each event to its session's stream and publishing it (``XADD``
  and ``PUBLISH``), the events that are ready bundled in one pipeline, and nothing
  else (bench/feeder.py).

Redis' CPU is redis-server's own (utime + stime from /proc/PID/stat over the load, and
``INFO cpu`` over the whole run), divided by the events produced. ``INFO stats`` and
``INFO commandstats`` are reset before each run and read after, so the report says what
Redis did per event: socket reads and writes, commands, and each command's calls and µs
(wall time inside Redis; a script's figure includes the commands it calls, which are
listed too).

Then the parts of an append (``parts``): bundles of ``PARTS_CALLS`` one-event calls of
240 sessions, each session's channel followed, sent straight to Redis by this process,
with the append script as deployed and with less and less in each call, down to an empty
one; Redis' CPU per event of each, the least of ``--parts-rounds`` alternating rounds.

With ``--cluster``, the same load through thoughtwire on a Redis Cluster of three
masters (no replicas, so that only the work of serving the load is counted), a run of it
first in each round, so that the cluster's rounds alternate with one node's: Redis' CPU
per event summed over the masters, beside one node's (``cluster_against_one_node``:
round by round and of the medians), each master's share of the events (its ``XADD``
calls), the commands per event summed over the masters, and the runs retried (a worker
lost a lease). A cluster bundles appends per master, as one node does for all.

    python -m bench.redis_cost                      # about 2 minutes
    python -m bench.redis_cost --sessions 4 --tokens 20 --rounds 1   # seconds
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

from redis import Redis
from redis.crc import key_slot

from bench.run import (
    Proc,
    System,
    free_port,
    machine,
    measure_streams,
    own_redis,
    spawn,
    wait_for_port,
)
from thoughtwire.shared import scripts

SYSTEMS = ("thoughtwire", "thoughtwire-unbundled", "thoughtwire-public", "thin", "thin-logged")
UNBUNDLED = """# Written by bench/redis_cost.py: one script run per append call, as before bundles.
from thoughtwire.shared.redis.pipeline import Batcher

Batcher.bundles = property(lambda self: False)
"""


PARTS_SESSIONS = 240
PARTS_CALLS = 16  # calls per bundle: what the worker's bundles held in the streams load
PARTS_EVENTS = 4800  # per variant and round
HEAD = b'{"type":"answer","content":"tok ","session":"s","run":"r","ts":1764600000000,"seq":'
# What a call of the parts' variants does instead of the deployed body (KEYS and ARGV as
# APPEND's: meta, log, channel, run; maxlen, ttl, seed, fence, min-seq, first-n, ...).
_COMMANDS = """
redis.call('HMGET', KEYS[4], 'fence', 'emitted', 'status')
redis.call('HMGET', KEYS[1], 'seq', 'epoch', 'replid')
local payload = ARGV[13] .. ARGV[6] .. '}'
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[1], '0-' .. ARGV[6], 'e', payload)
redis.call('PUBLISH', KEYS[3], payload)
redis.call('HSET', KEYS[1], 'seq', ARGV[6], 'epoch', 'e')
redis.call('TTL', KEYS[2])
redis.call('HSET', KEYS[4], 'emitted', ARGV[6])
return 1
"""
PIPELINED = "-- no script: the commands go in a pipeline"  # a marker among the variants
_LOG_AND_PUBLISH = """
local payload = ARGV[13] .. ARGV[6] .. '}'
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[1], '0-' .. ARGV[6], 'e', payload)
redis.call('PUBLISH', KEYS[3], payload)
return 1
"""


def part_scripts() -> dict[str, str]:
    """``APPEND_MANY`` as deployed, then with less in each call, down to nothing."""
    deployed = scripts.APPEND_MANY
    start = deployed.index("local function append(KEYS, ARGV)")
    end = deployed.index("local replies")

    def each(body: str) -> str:
        return (
            deployed[:start] + "local function append(KEYS, ARGV)" + body + "end\n" + deployed[end:]
        )

    return {
        "append, a script run per call (unbundled)": scripts.APPEND,
        "append": deployed,
        "append without INFO": deployed.replace(
            "info = redis.pcall('INFO', 'replication')", "info = false"
        ),
        "its commands, no logic": each(_COMMANDS),
        "XADD and PUBLISH": each(_LOG_AND_PUBLISH),
        "nothing": each("\nreturn 1\n"),
        "XADD and PUBLISH, pipelined (the floor, thin-logged)": PIPELINED,
        "a bare PUBLISH per round trip (the thin relay)": "",
    }


def follow(port: int, channels: list[str], stop: threading.Event) -> None:
    """Subscribe to ``channels`` and read (and drop) what comes, until ``stop``."""
    with socket.create_connection(("127.0.0.1", port)) as sock:
        parts = [b"SUBSCRIBE", *(c.encode() for c in channels)]
        sock.sendall(
            b"*%d\r\n" % len(parts) + b"".join(b"$%d\r\n%b\r\n" % (len(p), p) for p in parts)
        )
        sock.settimeout(0.2)
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                if not sock.recv(1 << 20):
                    return


def bundles(client: Redis, sha: str, sessions: list[list[str]]) -> None:
    """``PARTS_EVENTS`` one-event calls of ``sessions``, ``PARTS_CALLS`` to a script run."""
    for n in range(PARTS_EVENTS // PARTS_SESSIONS):
        for at in range(0, PARTS_SESSIONS, PARTS_CALLS):
            calls = sessions[at : at + PARTS_CALLS]
            args: list[Any] = [1000, 86400, "ab", "parts:ended"]
            for _ in calls:
                args += [1, "f", 0, n + 1, HEAD]
            client.evalsha(sha, 4 * len(calls), *(k for c in calls for k in c), *args)


def pipelined(client: Redis, sessions: list[list[str]]) -> None:
    """As :func:`bundles`, but each call's ``XADD`` and ``PUBLISH`` in a pipeline of
    ``PARTS_CALLS`` calls, no script: the floor's way (bench/feeder.py, ``thin-logged``)."""
    for n in range(PARTS_EVENTS // PARTS_SESSIONS):
        for at in range(0, PARTS_SESSIONS, PARTS_CALLS):
            pipe = client.pipeline(transaction=False)
            for _meta, log, channel, _run in sessions[at : at + PARTS_CALLS]:
                payload = HEAD + b"%d}" % (n + 1)
                pipe.xadd(log, {"e": payload}, maxlen=1000, approximate=True)
                pipe.publish(channel, payload)
            pipe.execute()


def alone(client: Redis, sha: str, sessions: list[list[str]]) -> None:
    """As :func:`bundles`, but each call a script run of its own, pipelined as the
    worker's batcher sends them."""
    for n in range(PARTS_EVENTS // PARTS_SESSIONS):
        for at in range(0, PARTS_SESSIONS, PARTS_CALLS):
            pipe = client.pipeline(transaction=False)
            for meta, log, channel, run in sessions[at : at + PARTS_CALLS]:
                keys = (meta, log, channel, run, f"{run}:runs", f"{run}:memory", f"{run}:queue")
                args = (1000, 86400, "ab", "f", 0, n + 1, "", "", "r", "", 0, "parts:ended", HEAD)
                pipe.evalsha(sha, len(keys), *keys, *args)
            pipe.execute()


def measure_parts(client: Redis, port: int, rounds: int) -> dict[str, Any]:
    """Redis' CPU per event of each of :func:`part_scripts`' bundles (see above)."""
    keys = [
        [f"parts:{{s{i}}}:{name}" for name in ("meta", "log", "events", "run")]
        for i in range(PARTS_SESSIONS)
    ]
    stop = threading.Event()
    reader = threading.Thread(target=follow, args=(port, [k[2] for k in keys], stop))
    reader.start()
    figures: dict[str, list[float]] = {}
    try:
        for round_ in range(rounds):
            for variant, (name, lua) in enumerate(part_scripts().items()):
                tag = f"{round_}.{variant}"  # fresh keys: seqs start at 1
                own = [[key.replace("parts:", f"parts{tag}:") for key in k] for k in keys]
                for k in own:
                    client.hset(k[3], mapping={"fence": "f", "status": "running", "emitted": 0})
                before = redis_cpu(client)
                if lua == scripts.APPEND:
                    alone(client, client.script_load(lua), own)
                elif lua == PIPELINED:
                    pipelined(client, own)
                elif lua:
                    bundles(client, client.script_load(lua), own)
                else:  # as the thin relay's feeder: one PUBLISH per event and round trip
                    for n in range(PARTS_EVENTS // PARTS_SESSIONS):
                        for k in own:
                            client.publish(k[2], HEAD + b"%d}" % (n + 1))
                spent = redis_cpu(client) - before
                figures.setdefault(name, []).append(round(spent * 1e6 / PARTS_EVENTS, 2))
    finally:
        stop.set()
        reader.join()
    return {
        "calls_per_script_run": PARTS_CALLS,
        "redis_cpu_us_per_event_least": {name: min(v) for name, v in figures.items()},
        "redis_cpu_us_per_event_all": figures,
    }


CLUSTER_MASTERS = 3


class Masters:
    """A cluster's masters, counted as one Redis: their CPU summed."""

    def __init__(self, procs: list[Proc]) -> None:
        self.procs = procs
        self.pid = procs[0].pid

    def cpu_seconds(self) -> float:
        """The masters' CPU seconds, summed."""
        return sum(proc.cpu_seconds() for proc in self.procs)


@contextlib.contextmanager
def own_cluster(workdir: Path) -> Iterator[tuple[str, list[Proc], list[Redis]]]:
    """A Redis Cluster of ``CLUSTER_MASTERS`` masters and no replicas, on free loopback
    ports, stopped by PID however the block ends. Yields its URL, processes and clients."""
    procs: list[Proc] = []
    clients: list[Redis] = []
    try:
        for i in range(CLUSTER_MASTERS):
            port, bus, directory = free_port(), free_port(), workdir / f"cluster-{i}"
            directory.mkdir(parents=True)
            args = [shutil.which("redis-server") or "redis-server", "--port", str(port)]
            args += [
                "--cluster-port",
                str(bus),
                "--cluster-enabled",
                "yes",
                "--dir",
                str(directory),
            ]
            args += ["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
            procs.append(spawn(args, {}, directory / "redis.log"))
            wait_for_port(port, procs[-1])
            clients.append(Redis(port=port))
        addresses = [f"127.0.0.1:{c.connection_pool.connection_kwargs['port']}" for c in clients]
        subprocess.run(
            [
                "redis-cli",
                "--cluster",
                "create",
                *addresses,
                "--cluster-replicas",
                "0",
                "--cluster-yes",
            ],
            check=True,
            capture_output=True,
            timeout=60,
        )
        deadline = time.monotonic() + 30
        while not all(c.cluster("INFO").get("cluster_state") == "ok" for c in clients):
            if time.monotonic() > deadline:
                raise TimeoutError("the cluster did not come up")
            time.sleep(0.1)
        yield "redis+cluster://" + ",".join(addresses), procs, clients
    finally:
        for client in clients:
            client.close()
        for proc in procs:
            proc.stop()


def measure_cluster(
    system: System, scenario: dict[str, Any], clients: list[Redis]
) -> dict[str, Any]:
    """One run of the streams load over the cluster: Redis' CPU per event summed over the
    masters, each master's share of the events and of that CPU, what Redis did per event
    (summed over the masters), and how many runs took a second attempt."""
    for client in clients:
        client.config_resetstat()
    before = [redis_cpu(client) for client in clients]
    result = measure_streams(system, scenario)
    spent = [redis_cpu(client) - b for client, b in zip(clients, before, strict=True)]
    # Pools keep what they opened: after the load, each master's connections are as many
    # as the processes ever held at once (and this tool's one).
    connections = [int(cast(Any, c.info("clients"))["connected_clients"]) for c in clients]
    stats = [commandstats(client) for client in clients]
    logged = [each.get("xadd", {}).get("calls", 0) for each in stats]
    events = max(result["delivered"] / scenario["watchers"], 1)
    summed: dict[str, dict[str, float]] = {}
    for each in stats:
        for name, figures in each.items():
            total = summed.setdefault(name, {"calls": 0, "usec": 0})
            total["calls"] += figures["calls"]
            total["usec"] += figures["usec"]
    return {
        "events": round(events),
        "redis_cpu_us_per_event": result["redis_cpu_us_per_event"],  # summed over masters
        "share_of_events": [round(n / max(sum(logged), 1), 3) for n in logged],
        "share_of_cpu": [round(s / max(sum(spent), 1e-9), 3) for s in spent],
        "runs_retried": retried(clients, system.prefix),
        "connections": connections,
        "per_event": {
            name: round(sum(traffic(c, events)[name] for c in clients), 3)
            for name in ("reads_processed", "writes_processed", "commands_processed")
        },
        "commands": breakdown(summed, events),
        "worker_cpu_us_per_event": result["worker_cpu_us_per_event"],
        "lost": result["lost"],
        "duplicated": result["duplicated"],
        "out_of_order": result["out_of_order"],
        "latency_ms_p99": result["latency_ms_p99"],
    }


def retried(clients: list[Redis], prefix: str) -> int:
    """How many runs took more than one attempt (a worker lost a lease), over the masters."""
    count = 0
    for client in clients:
        for key in client.scan_iter(match=f"{prefix}:{{*}}:run:*", count=1000):
            attempt = client.hget(key, "attempt")
            count += int(attempt or 0) > 1
    return count


def cluster_round(
    cluster: tuple[str, list[Proc], list[Redis]],
    logdir: Path,
    scenario: dict[str, Any],
    round_: int,
) -> dict[str, Any]:
    """One run of thoughtwire over the cluster ``own_cluster`` made."""
    url, procs, clients = cluster
    prefix = f"rcc{round_}{procs[0].pid}"
    system = System("thoughtwire", Masters(procs), url, logdir, scenario, prefix)  # type: ignore[arg-type]
    try:
        system.start()
        # The load processes open a client of the URL they are given, which only the
        # other systems use: one node's is as good as any.
        port = clients[0].connection_pool.connection_kwargs["port"]
        system.redis_url = f"redis://127.0.0.1:{port}/0"
        run = measure_cluster(system, scenario, clients)
    finally:
        system.stop()
    print(f"{'cluster':>18} {json.dumps(run)}", flush=True)
    return run


def against_one_node(report: dict[str, Any]) -> dict[str, Any]:
    """The cluster's Redis µs per event (summed over its masters) over one node's
    (thoughtwire's), round by round (each pair ran one after the other) and of the
    medians; and every master's share of the events, over all rounds."""
    one = [run["redis_cpu_us_per_event"] for run in report["runs"].get("thoughtwire", [])]
    many = [run["redis_cpu_us_per_event"] for run in report["cluster"]]
    shares = [share for run in report["cluster"] for share in run["share_of_events"]]
    return {
        "ratio_per_round": [round(m / o, 3) for m, o in zip(many, one, strict=False)],
        "ratio_of_medians": round(statistics.median(many) / statistics.median(one), 3)
        if one
        else None,
        "share_of_events_range": [min(shares), max(shares)],
    }


def routed(clients: list[Redis], lua: str, sessions: list[list[str]], home: Any) -> list[float]:
    """As :func:`alone`, each session's calls pipelined to its master (``home(key)``: an
    index of ``clients``); Redis' CPU per event summed over ``clients``, and the part of
    it inside the script runs (``INFO commandstats``)."""
    shas = [client.script_load(lua) for client in clients]
    for k in sessions:
        clients[home(k[3])].hset(k[3], mapping={"fence": "f", "status": "running", "emitted": 0})
    for client in clients:
        client.config_resetstat()
    before = [redis_cpu(client) for client in clients]
    for n in range(PARTS_EVENTS // PARTS_SESSIONS):
        for at in range(0, PARTS_SESSIONS, PARTS_CALLS):
            pipes: dict[int, Any] = {}
            for meta, log, channel, run in sessions[at : at + PARTS_CALLS]:
                i = home(run)
                pipe = pipes.setdefault(i, clients[i].pipeline(transaction=False))
                keys = (meta, log, channel, run, f"{run}:runs", f"{run}:memory", f"{run}:queue")
                args = (1000, 86400, "ab", "f", 0, n + 1, "", "", "r", "", 0, "parts:ended", HEAD)
                pipe.evalsha(shas[i], len(keys), *keys, *args)
            for pipe in pipes.values():
                pipe.execute()
    spent = sum(redis_cpu(c) - b for c, b in zip(clients, before, strict=True))
    inside = sum(commandstats(c).get("evalsha", {}).get("usec", 0) for c in clients)
    return [round(spent * 1e6 / PARTS_EVENTS, 2), round(inside / PARTS_EVENTS, 2)]


def masters_of_slots(clients: list[Redis]) -> Any:
    """A key's master, as an index of ``clients`` (every master of a cluster)."""
    ranges = []
    for i, client in enumerate(clients):
        me = client.execute_command("CLUSTER", "MYID").decode()
        for low, high, master, *_replicas in client.execute_command("CLUSTER", "SLOTS"):
            if master[2].decode() == me:
                ranges.append((low, high, i))

    def home(key: str) -> int:
        slot = key_slot(key.encode())
        return next(i for low, high, i in ranges if low <= slot <= high)

    return home


def cluster_parts(logdir: Path, rounds: int) -> dict[str, Any]:
    """The append as a script run per call (as on a cluster, where bundles are off), sent
    straight to Redis in pipelines of ``PARTS_CALLS`` calls of ``PARTS_SESSIONS``
    sessions: on one node, on one node with cluster mode on (it serves every slot), and
    over three masters (each pipeline split per master, as the batcher's is). Redis' CPU
    per event, summed over the masters, and the part of it inside the script runs."""
    sharded = scripts.APPEND.replace("redis.call('PUBLISH', KEYS[", "redis.call('SPUBLISH', KEYS[")
    figures: dict[str, list[list[float]]] = {}
    (logdir / "plain").mkdir()
    (logdir / "lone").mkdir()
    with (
        own_redis(logdir / "plain") as (plain_url, _plain),
        own_redis(logdir / "lone", "--cluster-enabled", "yes") as (lone_url, _lone),
        own_cluster(logdir) as (_url, _procs, masters),
    ):
        plain = Redis.from_url(plain_url)
        lone = Redis.from_url(lone_url.rsplit("/", 1)[0])  # a cluster has no SELECT
        try:
            lone.execute_command("CLUSTER", "ADDSLOTSRANGE", 0, 16383)
            deadline = time.monotonic() + 30
            while lone.cluster("INFO").get("cluster_state") != "ok":
                if time.monotonic() > deadline:
                    raise TimeoutError("the one-node cluster did not come up")
                time.sleep(0.1)
            home = masters_of_slots(masters)
            for round_ in range(rounds):
                keys = [
                    [f"cp{round_}:{{s{i}}}:{name}" for name in ("meta", "log", "events", "run")]
                    for i in range(PARTS_SESSIONS)
                ]
                runs = {
                    "one node": routed([plain], scripts.APPEND, keys, lambda _key: 0),
                    "one node, cluster mode": routed([lone], sharded, keys, lambda _key: 0),
                    "three masters": routed(masters, sharded, keys, home),
                }
                for name, run in runs.items():
                    figures.setdefault(name, []).append(run)
                print(f"{'cluster parts':>18} {json.dumps(runs)}", flush=True)
        finally:
            plain.close()
            lone.close()
    return {
        "calls_per_pipeline": PARTS_CALLS,
        "sessions": PARTS_SESSIONS,
        "redis_cpu_us_per_event_and_inside_scripts": figures,
    }


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
    parser.add_argument("--parts-rounds", type=int, default=5, help="0: no parts")
    parser.add_argument("--cluster", action="store_true", help="and over three masters")
    parser.add_argument(
        "--cluster-parts", action="store_true", help="and appends sent straight to a cluster"
    )
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
    with contextlib.ExitStack() as stack:
        # The cluster's rounds alternate with one node's, so that both meet the same machine.
        cluster = stack.enter_context(own_cluster(logdir / "streams")) if args.cluster else None
        redis_url, redis = stack.enter_context(own_redis(logdir))
        client = Redis.from_url(redis_url)
        try:
            for round_ in range(args.rounds):
                if cluster is not None:
                    report.setdefault("cluster", []).append(
                        cluster_round(cluster, logdir, scenario, round_)
                    )
                for name in filter(None, args.systems.split(",")):
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
            if args.parts_rounds:
                port = int(redis_url.rsplit(":", 1)[1].split("/")[0])
                report["parts"] = measure_parts(client, port, args.parts_rounds)
                print(json.dumps(report["parts"]["redis_cpu_us_per_event_least"]), flush=True)
        finally:
            client.close()
    if args.cluster_parts:
        report["cluster_parts"] = cluster_parts(logdir, args.rounds)
    report["summary"] = {name: summary(runs) for name, runs in report["runs"].items()}
    if args.cluster:
        report["summary"]["cluster"] = summary(report["cluster"])
        report["cluster_against_one_node"] = against_one_node(report)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report["summary"], indent=2))
    print(f"wrote {args.out}; logs in {logdir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
