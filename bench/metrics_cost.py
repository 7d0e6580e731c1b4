"""What a frontend's metrics cost: on the relay's path per message, and per scrape.

The relay pays two statements per message whatever its number of sockets (api/hub.py:
the channel's head noted, the viewers counted); this times them against the hub's whole
hand-off of a message to N viewers that keep up (real :class:`Viewer` objects over a
transport that takes every frame). A scrape walks every viewer once for the lag
histogram; this times ``/metrics``' whole body with N viewers on one frontend. CPU time
of this process only (the machine is shared), best of several rounds.

    .venv/bin/python -m bench.metrics_cost [--out bench/results/metrics_cost.json]
"""

from __future__ import annotations

import argparse
import json
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from thoughtwire.api import metrics as api_metrics
from thoughtwire.api.hub import Hub
from thoughtwire.api.viewer import Viewer
from thoughtwire.shared import metrics

ROUNDS = 5
MESSAGES = 20_000
SCRAPES = 20


class Taker:
    """A transport that takes every frame at once, as a socket that keeps up does."""

    def write(self, frame: str, wire: bytes | None) -> bool:
        return True

    def write_run(self, frames: list[str], wire: bytes) -> bool:
        return True

    async def send(self, frame: str) -> bool:
        return True

    def close(self, code: int, reason: str) -> None:
        pass


def best(run: Callable[[], object], count: int) -> float:
    """The least CPU time of ``count`` calls of ``run``, over ROUNDS rounds, per call in µs."""
    times = []
    for _ in range(ROUNDS):
        start = time.process_time()
        for _ in range(count):
            run()
        times.append(time.process_time() - start)
    return min(times) * 1e6 / count


def hub_with(viewers: int) -> tuple[Hub, bytes, list[Viewer]]:
    bus = SimpleNamespace(session_channel=lambda session: f"c:{session}")
    hub = Hub(lambda *_: None, "home")  # type: ignore[arg-type]
    channel = b"c:s"
    group = []
    for _ in range(viewers):
        viewer = Viewer(bus, hub, Taker(), queue_size=100)  # type: ignore[arg-type]
        viewer.session = "s"
        group.append(viewer)
    hub._viewers[channel] = set(group)
    return hub, channel, group


def relay(viewers: int) -> dict[str, float]:
    hub, channel, group = hub_with(viewers)
    seq = [0]

    def message() -> None:
        seq[0] += 1
        data = b'{"type":"answer","content":"x","seq":%d,"epoch":"e"}' % seq[0]
        hub._dispatch(b"message", channel, data)

    for viewer in group:  # positioned so every event continues it
        viewer._epoch = "e"
    dispatch = best(message, MESSAGES // max(1, viewers // 50))
    counts, heads, position = api_metrics.COUNTS, hub.heads, (1, "e")

    def counting() -> None:  # the two statements the relay pays per message
        heads[channel] = position
        counts.relayed += viewers

    def nothing() -> None:  # the call itself, taken off
        pass

    added = max(best(counting, MESSAGES) - best(nothing, MESSAGES), 0.0)
    return {
        "viewers": viewers,
        "dispatch_us_per_message": round(dispatch, 2),
        "counting_us_per_message": round(added, 3),
        "counting_share_pct": round(100 * added / dispatch, 2),
    }


def scrape(viewers: int) -> dict[str, float]:
    hub, _, group = hub_with(viewers)
    hub.heads[b"c:s"] = (100, "e")
    for i, viewer in enumerate(group):
        viewer._epoch, viewer._seq = "e", 100 - i % 7
    frontend = SimpleNamespace(hub=hub, open_sockets=Counter({("/ws", "websocket"): viewers}))
    api_metrics._frontends[id(frontend)] = frontend  # type: ignore[assignment]
    metrics.install(api_metrics.COLLECTOR)
    try:
        size = len(metrics.exposition())
        cost = best(metrics.exposition, SCRAPES)
    finally:
        del api_metrics._frontends[id(frontend)]
    return {"viewers": viewers, "scrape_ms": round(cost / 1000, 2), "bytes": size}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    result: dict[str, Any] = {
        "relay": [relay(n) for n in (1, 100, 500)],
        "scrape": [scrape(n) for n in (0, 1000, 10_000)],
    }
    print(json.dumps(result, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
