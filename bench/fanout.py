"""Fan-out at scale: one session watched by thousands of viewers over two frontends.

The same shape for every system (thoughtwire, thin, socketio): two frontends, one
worker, one session, ``--viewers`` sockets split alike over the frontends, ``--tokens``
tokens at ``--rate`` per second. On two shared cores a load process cannot parse
every frame of thousands of sockets and leave the servers any room, so most viewers
are *counters*: once open, they read their socket raw and count the events in it
(occurrences of ``"seq"``) and the terminal one (``"done"``) without parsing frames or
JSON. One viewer in ``--parse-every`` parses every frame as the other benchmarks do,
and gives the latency (from the producer's ``ts`` to the kernel's receive stamp) and
the lost, duplicated and out-of-order counts. Frontend CPU is per delivered event,
counted on every socket; the load processes' own CPU is reported beside it.

    .venv/bin/python -m bench.fanout [--viewers 5000] [--systems thoughtwire,thin]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import resource
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from redis.asyncio import Redis

from bench.load import CONNECT_CONCURRENCY, Plan, Socket, now_ms
from bench.run import JITTER, System, _get, machine, own_redis, percentile
from bench.wire import _frame
from thoughtwire.shared import loops

READ_SIZE = 64 * 1024
SEQ, DONE, MERGED = b'"seq"', b'"done"', b'"from_seq"'
# Engine.IO's ping, as a whole unmasked text frame: a socket that does not answer it
# is closed by python-socketio after its ping interval and timeout (45 s).
ENGINEIO_PING = b"\x81\x012"
# A WebSocket ping as uvicorn sends it (4 bytes of payload, every 20 s; unanswered, the
# socket is closed 20 s later). Neither byte can occur in JSON text.
WS_PING = b"\x89\x04"


class Parser(Socket):
    """A viewer that parses every frame; a merged frame counts for each seq it covers."""

    def __init__(self, plan: Plan, session: str, frontend: int) -> None:
        super().__init__(plan, session, frontend, ([], []))
        self.merged = 0

    def on_event(self, client: Any, event: dict[str, Any]) -> None:
        """Tally the seqs a merged frame covers before the frame's own."""
        first = event.get("from_seq", event["seq"])
        self.merged += first != event["seq"]
        for seq in range(first, event["seq"]):
            self.tally.take(seq)
        super().on_event(client, event)


class Counter:
    """Counts the events reaching an open socket, reading it raw: no frame, no JSON."""

    def __init__(self, socket: Socket) -> None:
        self.socket = socket
        self.events = 0
        self.merged = 0  # frames that carry more than one event: counted once here
        self.done = asyncio.Event()
        self.finished = False  # the terminal event came (not only the socket's end)
        self._tail = b""

    def start(self) -> None:
        """Take the socket's reading over from its WebSocket client."""
        client = self.socket.ws
        loop = asyncio.get_running_loop()
        loop.remove_reader(client._sock.fileno())
        loop.add_reader(client._sock.fileno(), self._readable)

    def _readable(self) -> None:
        sock = self.socket.ws._sock
        try:
            chunk = sock.recv(READ_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            chunk = b""
        if not chunk:
            asyncio.get_running_loop().remove_reader(sock.fileno())
            self.done.set()
            return
        # A pattern split across two reads is found in the tail kept from the first.
        data = self._tail + chunk
        self.events += data.count(SEQ)
        self.merged += data.count(MERGED)
        if ENGINEIO_PING in chunk:
            self.socket.ws.send_text("3")
        ping = chunk.find(WS_PING)
        if ping >= 0 and len(chunk) >= ping + 6:
            self.socket.ws._write(_frame(0xA, chunk[ping + 2 : ping + 6]))
        if DONE in data:
            self.finished = True
            self.done.set()
        self._tail = data[-(len(DONE) - 1) :]


async def _run(plan: Plan, parse_every: int, ready: Any, go: Any, results: Any) -> None:
    sockets = [Parser(plan, session, frontend) for session, frontend, _ in plan.sockets]
    limit = asyncio.Semaphore(CONNECT_CONCURRENCY)

    async def open_one(socket: Socket) -> None:
        async with limit:
            await socket.open()
            async with asyncio.timeout(60):
                await socket.ready.wait()

    await asyncio.gather(*(open_one(s) for s in sockets))
    # The first socket of the plan parses (it starts the run); then one in parse_every.
    parsers = [s for i, s in enumerate(sockets) if i % parse_every == 0]
    counters = [Counter(s) for i, s in enumerate(sockets) if i % parse_every != 0]
    for counter in counters:
        counter.start()
    ready.put(len(sockets))
    await asyncio.to_thread(go.wait, plan.deadline)
    for counter in counters:
        counter.events = counter.merged = 0  # the session frame is not an event
    cpu, started = time.process_time(), now_ms()
    redis = Redis.from_url(plan.redis_url)
    try:
        for s, (_, _, triggers) in zip(sockets, plan.sockets, strict=True):
            if triggers:
                await s.trigger(redis)
    finally:
        await redis.aclose()
    waits = [s.tally.done.wait() for s in parsers] + [c.done.wait() for c in counters]
    await asyncio.gather(
        *(asyncio.wait_for(w, plan.deadline) for w in waits), return_exceptions=True
    )
    results.put(_tally(parsers, counters, started, time.process_time() - cpu))
    for s in sockets:
        await s.close()


def _tally(
    parsers: list[Parser], counters: list[Counter], started: float, cpu_s: float
) -> dict[str, Any]:
    return {
        "latencies": [v for s in parsers for v in s.latencies],
        "parsed": sum(s.tally.received for s in parsers),
        "counted": sum(c.events for c in counters),
        "merged_parsed": sum(s.merged for s in parsers),
        "merged_counted": sum(c.merged for c in counters),
        "counters_with_merged": sum(c.merged > 0 for c in counters),
        "counts": sorted({c.events for c in counters}),
        "lost": sum(s.tally.last - s.tally.received for s in parsers),
        "duplicated": sum(s.tally.duplicated for s in parsers),
        "out_of_order": sum(s.tally.out_of_order for s in parsers),
        "incomplete": sum(not s.tally.done.is_set() for s in parsers)
        + sum(not c.finished for c in counters),
        "started": started,
        "finished": now_ms(),
        "cpu_s": cpu_s,
    }


def _process(plan: Plan, parse_every: int, ready: Any, go: Any, results: Any) -> None:
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    loops.run(_run(plan, parse_every, ready, go, results))


def measure(system: System, args: argparse.Namespace) -> dict[str, Any]:
    """One system: open every viewer, start the run, count what reaches each."""
    session = f"{system.prefix}-s0"
    sockets = [(session, i % 2, i == 0) for i in range(args.viewers)]
    plans = [
        Plan(
            system.name,
            system.urls,
            sockets[i :: args.processes],
            args.tokens,
            args.rate,
            system.redis_url,
            jitter=JITTER,
            deadline=args.deadline,
        )
        for i in range(args.processes)
    ]
    ctx = mp.get_context("spawn")
    ready, results, go = ctx.Queue(), ctx.Queue(), ctx.Event()
    procs = [
        ctx.Process(target=_process, args=(plan, args.parse_every, ready, go, results))
        for plan in plans
    ]
    for p in procs:
        p.start()
    try:
        opened_at = time.monotonic()
        opened = sum(_get(ready, procs, 240) for _ in procs)
        opening_s = time.monotonic() - opened_at
        watched = [*system.frontends, system.worker, system.redis]
        before = [p.cpu_seconds() for p in watched]  # type: ignore[union-attr]
        go.set()
        out = [_get(results, procs, args.deadline + 30) for _ in procs]
        after = [p.cpu_seconds() for p in watched]  # type: ignore[union-attr]
        rss = max(p.memory_kb("VmHWM") for p in system.frontends) / 1024
    finally:
        for p in procs:
            p.join(timeout=60)
            if p.is_alive():
                p.kill()
                p.join()
    return _report(system, args, out, (before, after), opened, opening_s, rss)


def _report(
    system: System,
    args: argparse.Namespace,
    out: list[dict[str, Any]],
    cpu: tuple[list[float], list[float]],
    opened: int,
    opening_s: float,
    rss_mb: float,
) -> dict[str, Any]:
    before, after = cpu
    frontend_s = sum(a - b for a, b in zip(after[:2], before[:2], strict=True))
    # frames: a merged frame is one frame for several events
    delivered = sum(o["parsed"] + o["counted"] for o in out)
    per_viewer = args.tokens + (10 if system.thoughtwire else 1)
    latencies = [v for o in out for v in o["latencies"]]
    elapsed = (max(o["finished"] for o in out) - min(o["started"] for o in out)) / 1000
    client_s = sum(o["cpu_s"] for o in out)
    return {
        "viewers": opened,
        "opening_s": round(opening_s, 1),
        "expected": per_viewer * opened,
        "delivered": delivered,
        "counts_per_counter": sorted({n for o in out for n in o["counts"]})[:5],
        # seqs missing from what the parsing viewers got, merged frames taken apart
        "lost": sum(o["lost"] for o in out),
        "merged_frames": sum(o["merged_parsed"] + o["merged_counted"] for o in out),
        "sockets_with_merged": sum(o["counters_with_merged"] for o in out),
        "duplicated": sum(o["duplicated"] for o in out),
        "out_of_order": sum(o["out_of_order"] for o in out),
        "incomplete_sockets": sum(o["incomplete"] for o in out),
        "elapsed_s": round(elapsed, 1),
        "run_s_at_rate": round(args.tokens / args.rate, 1),
        "events_per_s": round(delivered / max(elapsed, 1e-9), 1),
        "latency_ms_p50": round(percentile(latencies, 0.50), 2),
        "latency_ms_p99": round(percentile(latencies, 0.99), 2),
        "latency_ms_max": round(max(latencies, default=float("nan")), 2),
        "latency_samples": len(latencies),
        "frontend_cpu_s": round(frontend_s, 2),
        "frontend_cpu_us_per_event": round(frontend_s * 1e6 / max(delivered, 1), 2),
        "worker_cpu_s": round(after[2] - before[2], 2),
        "redis_cpu_s": round(after[3] - before[3], 2),
        "client_cpu_s": round(client_s, 2),
        "client_cpu_us_per_event": round(client_s * 1e6 / max(delivered, 1), 2),
        "machine_cpu_share": round(
            (frontend_s + after[2] - before[2] + after[3] - before[3] + client_s)
            / max(elapsed * (os.cpu_count() or 1), 1e-9),
            2,
        ),
        "frontend_peak_rss_mb": round(rss_mb, 1),
    }


def main() -> int:
    """Measure every system asked for, one after another, and write the report."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--viewers", type=int, default=5000)
    parser.add_argument("--tokens", type=int, default=300)
    parser.add_argument("--rate", type=float, default=50.0)
    parser.add_argument("--parse-every", type=int, default=50)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--deadline", type=float, default=90.0)
    parser.add_argument("--systems", default="thoughtwire,thin")
    parser.add_argument("--out", default="bench/results/fanout5000.json")
    args = parser.parse_args()
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))
    logdir = Path(tempfile.mkdtemp(prefix="thoughtwire-bench-"))
    report: dict[str, Any] = {
        "command": " ".join(sys.argv),
        "machine": machine(),
        "load_average_1m_before": round(os.getloadavg()[0], 1),
        "results": {},
    }
    scenario = {"tokens": args.tokens, "rate": args.rate, "jitter": JITTER}
    with own_redis(logdir) as (redis_url, redis):
        for name in args.systems.split(","):
            prefix = f"bfan{name[0]}{len(name)}{redis.pid}"
            system = System(name, redis, redis_url, logdir, scenario, prefix)
            try:
                result = measure(system.start(), args)
            except Exception as exc:  # a system that cannot hold the load is a result too
                result = {"error": f"{type(exc).__name__}: {exc}"}
            finally:
                system.stop()
            report["results"][name] = result
            print(f"{name:>12} {json.dumps(result)}", flush=True)
            Path(args.out).write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out}; logs in {logdir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
