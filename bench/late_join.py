"""Late joiners: time from connect to caught up, and bytes received, snapshot vs raw replay.

One frontend and one worker (simulated agent, one event per token) on a redis-server of
its own. For runs of 100 and 10,000 tokens, each lasting about three seconds, a viewer
joins at several points past the run's middle: once without ``after`` (a ``snapshot``
frame, then the tail) and once with ``?after=0&replay=raw`` (the whole log). It is
caught up once it holds the event the session had reached when it connected.

    .venv/bin/python -m bench.late_join [--out bench/results/late_join.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from websockets.asyncio.client import ClientConnection, connect

from bench.run import free_port, own_redis, spawn, wait_for_port

SIZES = (100, 10_000)  # answer tokens per run
RUN_SECONDS = 3.0
POINTS = (0.5, 0.6, 0.7, 0.8, 0.9)  # where in the answer the viewers join
MODES = {"snapshot": "", "raw": "&after=0&replay=raw"}


class Observer:
    """A socket on the session from its start: where the log has got to."""

    def __init__(self) -> None:
        self.seq = 0
        self.answers = 0
        self.wanted = 0  # the answer count reached() waits for
        self.hit = asyncio.Event()

    async def read(self, ws: ClientConnection) -> None:
        async with asyncio.timeout(60):
            async for raw in ws:
                frame = json.loads(raw)
                self.seq = frame.get("seq", self.seq)
                if frame.get("type") == "answer":
                    self.answers += 1
                if self.answers >= self.wanted or frame.get("type") == "done":
                    self.hit.set()
                if frame.get("type") == "done":
                    return

    async def reached(self, answers: int) -> None:
        self.wanted = answers
        self.hit.clear()
        if self.answers < answers:
            async with asyncio.timeout(60):
                await self.hit.wait()


async def join(url: str, target: int) -> dict[str, float]:
    """Connect, and read until the frame at ``target`` (or past it) is in hand."""
    start = time.perf_counter()
    received = 0
    async with connect(url, max_size=None) as ws:
        async with asyncio.timeout(60):
            while True:
                raw = await ws.recv()
                received += len(raw)
                seq = json.loads(raw).get("seq", 0)
                if seq >= target:
                    break
        elapsed = (time.perf_counter() - start) * 1000
    return {"ms": elapsed, "bytes": received}


async def measure(base: str, tokens: int) -> dict[str, Any]:
    """One run of ``tokens``; joins in both modes at each point."""
    observer = Observer()
    samples: dict[str, list[dict[str, float]]] = {mode: [] for mode in MODES}
    async with connect(f"{base}/ws/agent-thoughts", max_size=None) as ws:
        session = json.loads(await ws.recv())["session"]
        await ws.send("a long answer")
        reader = asyncio.create_task(observer.read(ws))
        for point in POINTS:
            await observer.reached(int(tokens * point))
            for mode, query in MODES.items():
                target = observer.seq
                url = f"{base}/ws/agent-thoughts?session={session}{query}"
                samples[mode].append(await join(url, target))
        await reader
    return {
        mode: {
            "median_ms": round(statistics.median(s["ms"] for s in rows), 2),
            "max_ms": round(max(s["ms"] for s in rows), 2),
            "median_bytes": int(statistics.median(s["bytes"] for s in rows)),
        }
        for mode, rows in samples.items()
    }


def run(out: Path) -> dict[str, Any]:
    results: dict[str, Any] = {"points": POINTS, "sizes": {}}
    with tempfile.TemporaryDirectory(prefix="late-join-") as tmp:
        workdir = Path(tmp)
        with own_redis(workdir) as (redis_url, _redis):
            for tokens in SIZES:
                env = {
                    "REDIS_URL": redis_url,
                    "THOUGHTWIRE_KEY_PREFIX": f"lj{tokens}",
                    "THOUGHTWIRE_AGENT": "simulated",
                    "THOUGHTWIRE_SIM_STEP_DELAY": "0",
                    "THOUGHTWIRE_SIM_ANSWER_TOKENS": str(tokens),
                    "THOUGHTWIRE_SIM_TOKENS_PER_SECOND": str(tokens / RUN_SECONDS),
                    "THOUGHTWIRE_SIM_JITTER": "0",
                    "THOUGHTWIRE_COALESCE_MS": "0",  # one event per token: raw replay's worst
                    "OPENAI_API_KEY": "",
                }
                port = free_port()
                python = sys.executable
                api = [python, "-m", "thoughtwire", "api", "--host", "127.0.0.1"]
                frontend = spawn(
                    [*api, "--port", str(port), "--insecure"], env, workdir / "api.log"
                )
                worker = spawn([python, "-m", "thoughtwire", "worker"], env, workdir / "w.log")
                try:
                    wait_for_port(port, frontend)
                    row = asyncio.run(measure(f"ws://127.0.0.1:{port}", tokens))
                finally:
                    frontend.stop()
                    worker.stop()
                results["sizes"][str(tokens)] = row
                print(tokens, json.dumps(row), flush=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    return results


def main() -> None:
    """Run the late-join benchmark and write its results."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("bench/results/late_join.json"))
    run(parser.parse_args().out)


if __name__ == "__main__":
    main()
