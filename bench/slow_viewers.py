"""Slow viewers: one session, 2,000 viewers over 2 frontends, 100 tokens/s.

Run twice on the same thoughtwire system: every viewer reading, then with 1% of them
reading a tenth of the time (10 ms of every 100 ms) and 1% not reading for 10 s. It
reports the other viewers' p99 latency in both runs, whether every lagging viewer got
every event's content (a merged frame counts for each seq it covers), how long each
paused viewer took, once it read again, to reach the seq the others had then, and the frontends' peak RSS.

    .venv/bin/python -m bench.slow_viewers [--viewers 2000] [--out bench/results/slow_viewers.json]
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

from bench.load import CONNECT_CONCURRENCY, Plan, Socket
from bench.run import LOAD_PROCESSES, System, _get, own_redis, percentile
from bench.wire import WireClient
from thoughtwire.shared import loops

TOKENS = 1500  # 15 s at 100 tokens/s
RATE = 100.0
PAUSE_AT, PAUSE = 2.0, 10.0  # seconds after the go, and for how long
DUTY = (0.01, 0.09)  # a slow viewer reads 10 ms, then not for 90 ms
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

    def on_event(self, client: WireClient, event: dict[str, Any]) -> None:
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


async def _run(plan: Plan, roles: list[str], ready: Any, go: Any, results: Any) -> None:
    sockets = [
        Lagging(plan, session, frontend, role)
        for (session, frontend, _), role in zip(plan.sockets, roles, strict=True)
    ]
    limit = asyncio.Semaphore(CONNECT_CONCURRENCY)

    async def open_one(socket: Lagging) -> None:
        async with limit:
            await socket.open()
            async with asyncio.timeout(30):
                await socket.ready.wait()

    await asyncio.gather(*(open_one(s) for s in sockets))
    ready.put(len(sockets))
    await asyncio.to_thread(go.wait, plan.deadline)
    starters = [s for s, (_, _, t) in zip(sockets, plan.sockets, strict=True) if t]
    for s in starters:
        s.ws.send_text("go")
    lagging = [asyncio.create_task(s.lag()) for s in sockets if s.role]
    waits = [asyncio.wait_for(s.tally.done.wait(), plan.deadline) for s in sockets]
    await asyncio.gather(*waits, *lagging, return_exceptions=True)
    results.put(
        {
            "latencies": [v for s in sockets if not s.role for v in s.latencies],
            "lagging": [
                {
                    "role": s.role,
                    "complete": s.tally.done.is_set() and s.tally.received == s.tally.last,
                    "live_after_s": s.live_after,
                    "merged": s.merged,
                }
                for s in sockets
                if s.role
            ],
        }
    )
    for s in sockets:
        await s.close()


def _process(plan: Plan, roles: list[str], ready: Any, go: Any, results: Any) -> None:
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    loops.run(_run(plan, roles, ready, go, results))


def measure(system: System, viewers: int, lagging: bool) -> dict[str, Any]:
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
    procs = [ctx.Process(target=_process, args=(plan, r, ready, go, results)) for plan, r in plans]
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
    args = parser.parse_args()
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))
    logdir = Path(tempfile.mkdtemp(prefix="thoughtwire-bench-"))
    report: dict[str, Any] = {"command": " ".join(sys.argv), "tokens": TOKENS, "rate": RATE}
    scenario = {"tokens": TOKENS, "rate": RATE, "jitter": 0.5}
    with own_redis(logdir) as (redis_url, redis):
        for lagging in (False, True):
            # A fresh system per case, so each peak RSS is its own.
            name = "with_slow" if lagging else "all_reading"
            prefix = f"bslow{int(lagging)}{redis.pid}"
            system = System("thoughtwire", redis, redis_url, logdir, scenario, prefix)
            try:
                report[name] = measure(system.start(), args.viewers, lagging)
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
