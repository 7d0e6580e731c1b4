"""What an event costs Redis when it is written: the append-only file's growth per append.

Against its own redis-server with the append-only file on, one process appends
``--count`` one-event calls to one run, as a worker streaming paced tokens does
(:meth:`Bus.submit_encoded`). Every write a script makes is appended to the file and
sent to each replica, so the bytes per call are what persistence and replication
carry for each token. Prints them, and Redis' CPU per call, as JSON.

    python -m bench.appends --count 20000
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
from pathlib import Path

from bench.run import own_redis
from thoughtwire.shared import loops
from thoughtwire.shared.bus import Bus
from thoughtwire.shared.keys import Keys
from thoughtwire.shared.protocol import Job, Thought
from thoughtwire.shared.redis import RedisFactory
from thoughtwire.shared.settings import Settings

IN_FLIGHT = 100  # calls at a time, so that the client's round trips do not dominate


async def measure(redis_url: str, count: int) -> dict[str, float]:
    settings = Settings(redis_url=redis_url, key_prefix="appends")
    redis = RedisFactory(settings).commands()
    bus = Bus(redis, Keys(settings.key_prefix), log_maxlen=1000, log_ttl=86_400)
    job = Job(run="r", session="s", prompt="hello")
    try:
        await bus.submit(job)
        fence = (await bus.start(job, "w", 60_000, 3)).fence
        head = bus.encode(job, Thought("answer", "tok "))
        before = await redis.info()
        for first in range(1, count + 1, IN_FLIGHT):
            await asyncio.gather(
                *(
                    bus.submit_encoded(job, [head], fence=fence, first=n)
                    for n in range(first, min(first + IN_FLIGHT, count + 1))
                )
            )
        after = await redis.info()
    finally:
        await redis.aclose()
    cpu = sum(after[k] - before[k] for k in ("used_cpu_user", "used_cpu_sys"))
    return {
        "appends": count,
        "aof_bytes_per_append": round(
            (after["aof_current_size"] - before["aof_current_size"]) / count
        ),
        "redis_cpu_us_per_append": round(cpu / count * 1e6, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--count", type=int, default=20_000)
    args = parser.parse_args()
    with (
        tempfile.TemporaryDirectory(prefix="thoughtwire-appends-") as workdir,
        own_redis(Path(workdir), "--appendonly", "yes", "--appendfsync", "no") as (url, _redis),
    ):
        print(json.dumps(loops.run(measure(url, args.count))))


if __name__ == "__main__":
    main()
