"""What one idle socket costs a frontend, and where the memory goes.

Runs a frontend in this process (uvicorn, on its own redis-server), opens ``count``
idle sockets from a separate client process, and prints the RSS growth per socket.
With ``--trace`` it also prints the top allocation sites per socket (tracemalloc),
grouped by the innermost thoughtwire frame, or by library file otherwise.

    .venv/bin/python -m bench.socket_memory --count 2000 [--trace]

The full benchmark's ``idle`` scenario measures 10,000 sockets against the peers;
this is the tool for finding what to cut.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import sys
import tempfile
import tracemalloc
from collections import Counter
from pathlib import Path

import uvicorn

from bench.run import free_port, own_redis
from thoughtwire.shared import loops

CLIENT = """
import asyncio, sys
from bench.wire import WireClient

async def main(port, count):
    limit = asyncio.Semaphore(100)
    async def one(i):
        async with limit:
            greeted = asyncio.Event()
            client = await WireClient.connect(
                f"ws://127.0.0.1:{port}/ws/agent-thoughts?session=idle{i}&after=0",
                lambda _client, _frame: greeted.set(),
            )
            await greeted.wait()
            return client
    clients = await asyncio.gather(*(one(i) for i in range(count)))
    print("open", flush=True)
    await asyncio.sleep(600)

asyncio.run(main(int(sys.argv[1]), int(sys.argv[2])))
"""


def rss_kb() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def where(stats: list[tracemalloc.StatisticDiff], count: int, top: int = 30) -> None:
    here = os.getcwd() + os.sep
    sites: Counter[str] = Counter()
    for stat in stats:
        ours = [
            f for f in stat.traceback if f.filename.startswith(here) and ".venv" not in f.filename
        ]
        frame = ours[-1] if ours else stat.traceback[-1]
        name = frame.filename.removeprefix(here).split("site-packages/")[-1]
        sites[f"{name}:{frame.lineno}"] += stat.size_diff
    for site, size in sites.most_common(top):
        print(f"{size / count:8.0f} B  {site}")


async def measure(count: int, trace: bool, redis_url: str) -> None:
    os.environ.update(REDIS_URL=redis_url, THOUGHTWIRE_MAX_SOCKETS_PER_USER=str(count * 2))
    from thoughtwire.api.app import create_app
    from thoughtwire.api.server import config
    from thoughtwire.shared.settings import Settings

    port = free_port()
    settings = Settings.from_env(os.environ)
    server = uvicorn.Server(
        config(create_app(settings), settings, "127.0.0.1", port, log_level="warning")
    )
    serving = asyncio.create_task(server.serve())
    clients = []
    try:
        async with asyncio.timeout(30):
            while not server.started:  # noqa: ASYNC110 (uvicorn offers no event to wait on)
                await asyncio.sleep(0.05)
        for n, label in ((50, "warm-up"), (count, "measured")):
            gc.collect()
            before = rss_kb()
            if trace and label == "measured":
                tracemalloc.start(14)
                snapshot = tracemalloc.take_snapshot()
            client = await asyncio.create_subprocess_exec(
                sys.executable, "-c", CLIENT, str(port), str(n), stdout=asyncio.subprocess.PIPE
            )
            clients.append(client)
            assert client.stdout is not None
            await asyncio.wait_for(client.stdout.readline(), 120)
            await asyncio.sleep(1.0)
            gc.collect()
            print(f"{label}: {n} sockets, {(rss_kb() - before) / n:.1f} KB of RSS each")
            if trace and label == "measured":
                where(tracemalloc.take_snapshot().compare_to(snapshot, "traceback"), n)
    finally:
        for client in clients:
            client.kill()
            await client.wait()
        server.should_exit = True
        await serving


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--count", type=int, default=2000)
    parser.add_argument("--trace", action="store_true")
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="thoughtwire-memory-"))
    with own_redis(workdir) as (redis_url, _redis):
        loops.run(measure(args.count, args.trace, redis_url))
    return 0


if __name__ == "__main__":
    sys.exit(main())
