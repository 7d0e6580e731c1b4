"""Token coalescing: events per run and delay to the first event, window on and off.

Feeds a paced token source (an LLM streaming at a given rate) through the worker's
coalescer and counts what would be written to Redis and sent to each socket.
Bounded: a few runs of a few hundred tokens each.

    .venv/bin/python -m bench.coalescing [--out bench/results/coalescing.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from pathlib import Path

from thoughtwire.shared.protocol import Thought
from thoughtwire.shared.settings import Settings
from thoughtwire.worker.coalesce import coalesce

TOKENS = 300
RUNS = 3
RATES = (50, 200, 1000)  # tokens per second: a slow API, a fast API, a local model
DELTA = {"delta": True}  # a model's tokens are deltas; only deltas of one block merge


async def paced_tokens(rate: float):
    start = time.monotonic()
    for i in range(TOKENS):
        delay = start + i / rate - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        yield Thought("answer", "tok ", DELTA)


async def measure(rate: float, window: float) -> dict[str, float]:
    events, first = [], []
    for _ in range(RUNS):
        start = time.monotonic()
        count = 0
        async for _thought in coalesce(paced_tokens(rate), window):
            if count == 0:
                first.append((time.monotonic() - start) * 1000)
            count += 1
        events.append(count)
    return {
        "events_per_run": statistics.mean(events),
        "first_event_ms": round(statistics.median(first), 3),
    }


async def run_all() -> list[dict[str, float]]:
    default_window = Settings().coalesce_ms / 1000
    rows = []
    for rate in RATES:
        for window in (0.0, default_window):
            result = await measure(rate, window)
            rows.append(
                {"tokens_per_second": rate, "window_ms": window * 1000, "tokens": TOKENS, **result}
            )
            print(
                f"{rate:>5} tok/s  window {window * 1000:>4.0f} ms  "
                f"{result['events_per_run']:>6.1f} events/run  first event {result['first_event_ms']:.2f} ms"
            )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="bench/results/coalescing.json")
    args = parser.parse_args()
    rows = asyncio.run(run_all())
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
