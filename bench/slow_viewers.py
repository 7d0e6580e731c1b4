"""Slow viewers: one session, 2,000 viewers over 2 frontends, 100 tokens/s.

Run twice on the same thoughtwire system: every viewer reading, then with 1% of them
reading a tenth of the time (10 ms of every 100 ms) and 1% not reading for 10 s. It
reports the other viewers' p99 latency in both runs, whether every lagging viewer got
every event's content (a merged frame counts for each seq it covers), how long each
paused viewer took, once it read again, to reach the seq the others had then, and the frontends' peak RSS.
Lagging viewers connect with a small receive buffer and segment size, as over a phone's
link, and fold what they got with the reducer, to compare with a viewer that kept up.

    .venv/bin/python -m bench.slow_viewers [--viewers 2000] [--parse-every 20] [--out FILE]
        [--send-buffer-bytes N] [--window-ms MS]

``--window-ms`` is the workers' token coalescing window: by default the product's own
(``THOUGHTWIRE_COALESCE_MS``), so the frontends relay what a deployment would relay; 0
relays one event per token.
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

from bench.fanout import Counter
from bench.load import CONNECT_CONCURRENCY, Plan, Socket
from bench.run import LOAD_PROCESSES, System, _get, own_redis, percentile
from bench.wire import WireClient
from thoughtwire.shared import loops, reducer
from thoughtwire.shared.settings import Settings

TOKENS = 1500  # 15 s at 100 tokens/s
RATE = 100.0
PAUSE_AT, PAUSE = 2.0, 10.0  # seconds after the go, and for how long
DUTY = (0.01, 0.09)  # a slow viewer reads 10 ms, then not for 90 ms
# A lagging viewer's receive buffer, set before it connects: as on a slow mobile link,
# the kernel holds little for it, and the frontend feels its pace. With the default
# (autotuned to megabytes on loopback) a 10 s pause at 100 tokens/s fits in the kernel.
RCVBUF = 4096
MSS = 1400  # segments as on a phone's link (see bench/wire.py)
# Frames queued for a viewer before its deltas merge, for this benchmark's frontends. A
# 10 s pause at 100 tokens/s is 1,000 frames: under the default 1,024 nothing would merge.
SEND_QUEUE_SIZE = 256
# The newest seq any viewer of this process that keeps up has: where a paused viewer
# must get to, once it reads again, to be live.
NEWEST = [0]
ROLES = {
    1: "slow",
    2: "paused",
}  # of every 100 viewers  # a paused viewer is live again once an event reaches it this fresh


class Lagging(Socket):
    """A viewer that reads slowly or pauses, counting each seq a merged frame covers."""

    def __init__(self, plan: Plan, session: str, frontend: int, role: str) -> None:
        super().__init__(plan, session, frontend, ([], []))
        self.role = role  # "slow", "paused" or "" (keeps up)
        self.resumed: float | None = None
        self.target = 0  # the newest seq when it read again
        self.live_after: float | None = None
        self.merged = 0  # frames that carried more than one event
        self.frames: list[dict[str, Any]] = []  # kept to fold, by lagging viewers
        self.keep = bool(role)
        if role:
            self.rcvbuf, self.mss = RCVBUF, MSS

    def on_event(self, client: WireClient, event: dict[str, Any]) -> None:
        if self.keep:
            self.frames.append(event)
        first = event.get("from_seq", event["seq"])
        self.merged += first != event["seq"]
        for seq in range(first, event["seq"]):
            self.tally.take(seq)
        if not self.role:
            NEWEST[0] = max(NEWEST[0], event["seq"])
            super().on_event(client, event)
            return
        self.tally.take(event["seq"])
        if event["type"] in ("done", "error", "cancelled"):
            self.tally.done.set()
        if self.resumed is not None and self.live_after is None and self.tally.last >= self.target:
            self.live_after = time.monotonic() - self.resumed

    def _reading(self, on: bool) -> None:
        client = self.ws
        if client._sock is None:
            return
        if on:
            client._loop.add_reader(client._sock.fileno(), client._readable)
        else:
            client._loop.remove_reader(client._sock.fileno())

    async def lag(self) -> None:
        """Read as the role says until the run is done."""
        if self.role == "paused":
            await asyncio.sleep(PAUSE_AT)
            self._reading(False)
            await asyncio.sleep(PAUSE)
            self.resumed, self.target = time.monotonic(), NEWEST[0]
            self._reading(True)
        elif self.role == "slow":
            for _ in range(int(600 / sum(DUTY))):  # bounded: the plan's deadline
                if self.tally.done.is_set():
                    return
                await asyncio.sleep(DUTY[0])
                self._reading(False)
                await asyncio.sleep(DUTY[1])
                self._reading(True)


async def _run(
    plan: Plan, roles: list[str], parse_every: int, ready: Any, go: Any, results: Any
) -> None:
    sockets = [
        Lagging(plan, session, frontend, role)
        for (session, frontend, _), role in zip(plan.sockets, roles, strict=True)
    ]
    # A viewer that keeps up: the state the lagging ones must reach.
    reference = next(s for s in sockets if not s.role)
    reference.keep = True
    limit = asyncio.Semaphore(CONNECT_CONCURRENCY)

    async def open_one(socket: Lagging) -> None:
        async with limit:
            await socket.open()
            async with asyncio.timeout(30):
                await socket.ready.wait()

    await asyncio.gather(*(open_one(s) for s in sockets))
    # Viewers that keep up, but for one in parse_every, only count what reaches them:
    # parsing every frame of every socket would take the cores the frontends need.
    counters = [
        Counter(s)
        for i, s in enumerate(sockets)
        if i % parse_every and not s.role and s is not reference
    ]
    for counter in counters:
        counter.start()
    counted = {id(c.socket) for c in counters}
    ready.put(len(sockets))
    await asyncio.to_thread(go.wait, plan.deadline)
    for counter in counters:
        counter.events = counter.merged = 0
    starters = [s for s, (_, _, t) in zip(sockets, plan.sockets, strict=True) if t]
    for s in starters:
        s.ws.send_text("go")
    lagging = [asyncio.create_task(s.lag()) for s in sockets if s.role]
    waits = [
        asyncio.wait_for(s.tally.done.wait(), plan.deadline)
        for s in sockets
        if id(s) not in counted
    ] + [asyncio.wait_for(c.done.wait(), plan.deadline) for c in counters]
    await asyncio.gather(*waits, *lagging, return_exceptions=True)
    fast = reducer.fold(reference.frames)
    results.put(
        {
            "latencies": [v for s in sockets if not s.role for v in s.latencies],
            "counted_incomplete": sum(not c.finished for c in counters),
            "lagging": [
                {
                    "role": s.role,
                    "complete": s.tally.done.is_set() and s.tally.received == s.tally.last,
                    "live_after_s": s.live_after,
                    "merged": s.merged,
                    "same_state": reducer.fold(s.frames) == fast,
                }
                for s in sockets
                if s.role
            ],
        }
    )
    for s in sockets:
        await s.close()


def _process(
    plan: Plan, roles: list[str], parse_every: int, ready: Any, go: Any, results: Any
) -> None:
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    loops.run(_run(plan, roles, parse_every, ready, go, results))


def measure(system: System, viewers: int, lagging: bool, parse_every: int = 1) -> dict[str, Any]:
    """One run: ``viewers`` on one session; 1% slow and 1% paused when ``lagging``."""
    session = f"{system.prefix}-s{int(lagging)}"
    roles = ["" if not lagging else ROLES.get(i % 100, "") for i in range(viewers)]
    sockets = [(session, i % 2, i == 0) for i in range(viewers)]
    ctx = mp.get_context("spawn")
    ready, results, go = ctx.Queue(), ctx.Queue(), ctx.Event()
    plans = [
        (
            Plan(
                system.name,
                system.urls,
                sockets[i::LOAD_PROCESSES],
                TOKENS,
                RATE,
                system.redis_url,
                deadline=90.0,
            ),
            roles[i::LOAD_PROCESSES],
        )
        for i in range(LOAD_PROCESSES)
    ]
    procs = [
        ctx.Process(target=_process, args=(plan, r, parse_every, ready, go, results))
        for plan, r in plans
    ]
    for p in procs:
        p.start()
    try:
        for _ in procs:
            _get(ready, procs, 120)
        go.set()
        out = [_get(results, procs, 150) for _ in procs]
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
                p.join()
    latencies = [v for o in out for v in o["latencies"]]
    lag = [entry for o in out for entry in o["lagging"]]
    paused = [e["live_after_s"] for e in lag if e["role"] == "paused"]
    return {
        "viewers": viewers,
        "others_latency_ms_p50": round(percentile(latencies, 0.50), 2),
        "others_latency_ms_p99": round(percentile(latencies, 0.99), 2),
        "slow": sum(e["role"] == "slow" for e in lag),
        "paused": len(paused),
        "lagging_complete": sum(e["complete"] for e in lag),
        # folded with the reducer, equal to the state of a viewer that kept up
        "lagging_same_state": sum(e["same_state"] for e in lag),
        "counted_incomplete": sum(o["counted_incomplete"] for o in out),
        "latency_samples": len(latencies),
        "paused_live_after_s_max": max((p for p in paused if p is not None), default=None),
        "paused_never_live": sum(p is None for p in paused),
        "merged_frames": sum(e["merged"] for e in lag),
        "frontend_peak_rss_mb": round(
            max(p.memory_kb("VmHWM") for p in system.frontends) / 1024, 1
        ),
    }


def main() -> int:
    """Run both cases and write the report."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--viewers", type=int, default=2000)
    parser.add_argument("--out", default="bench/results/slow_viewers.json")
    parser.add_argument("--parse-every", type=int, default=1)
    parser.add_argument(
        "--send-buffer-bytes",
        type=int,
        help="the frontends' THOUGHTWIRE_SEND_BUFFER_BYTES (default: theirs; 0: the kernel's)",
    )
    parser.add_argument(
        "--window-ms",
        type=float,
        default=Settings().coalesce_ms,
        help="the workers' coalescing window (default: the product's; 0: one event per token)",
    )
    args = parser.parse_args()
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))
    logdir = Path(tempfile.mkdtemp(prefix="thoughtwire-bench-"))
    report: dict[str, Any] = {
        "command": " ".join(sys.argv),
        "tokens": TOKENS,
        "rate": RATE,
        "lagging_rcvbuf": RCVBUF,
        "lagging_mss": MSS,
        "send_queue_size": SEND_QUEUE_SIZE,
        "send_buffer_bytes": args.send_buffer_bytes,  # None: the frontends' default
        "window_ms": args.window_ms,
    }
    env = {"THOUGHTWIRE_SEND_QUEUE_SIZE": str(SEND_QUEUE_SIZE)}
    if args.send_buffer_bytes is not None:
        env["THOUGHTWIRE_SEND_BUFFER_BYTES"] = str(args.send_buffer_bytes)
    scenario = {
        "tokens": TOKENS,
        "rate": RATE,
        "jitter": 0.5,
        "env": env,
        "window_ms": args.window_ms,
    }
    with own_redis(logdir) as (redis_url, redis):
        for lagging in (False, True):
            # A fresh system per case, so each peak RSS is its own.
            name = "with_slow" if lagging else "all_reading"
            prefix = f"bslow{int(lagging)}{redis.pid}"
            system = System("thoughtwire", redis, redis_url, logdir, scenario, prefix)
            try:
                report[name] = measure(system.start(), args.viewers, lagging, args.parse_every)
            finally:
                system.stop()
            report[name]["load_average_1m"] = round(os.getloadavg()[0], 1)  # shared cores
            print(f"{name:>12} {json.dumps(report[name])}", flush=True)
            Path(args.out).write_text(json.dumps(report, indent=2))
    base = report["all_reading"]["others_latency_ms_p99"]
    report["p99_ratio"] = round(report["with_slow"]["others_latency_ms_p99"] / base, 2)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(f"p99 ratio {report['p99_ratio']}; wrote {args.out}; logs in {logdir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
