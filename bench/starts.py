"""What a run costs besides its tokens: queueing the prompt, and starting and ending it.

Against its own redis-server, in one process: the frontend's side queues ``--count``
jobs at once (:meth:`Bus.submit`), then a worker runs them all with a simulated agent
that answers with one token, unpaced. Prints CPU microseconds per job for each side,
as JSON.
A run's start is what every prompt pays before its first token reaches anyone, and
a burst of prompts pays it all at once.

    python -m bench.starts --count 2000
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
from pathlib import Path

from bench.run import own_redis
from thoughtwire.shared import loops
from thoughtwire.shared.bus import Bus
from thoughtwire.shared.keys import Keys
from thoughtwire.shared.protocol import Job
from thoughtwire.shared.redis import RedisFactory
from thoughtwire.shared.settings import Settings
from thoughtwire.worker.main import serve

DEADLINE = 120.0


async def measure(redis_url: str, count: int) -> dict[str, float]:
    settings = Settings(
        redis_url=redis_url,
        key_prefix="starts",
        sim_step_delay=0,
        sim_answer_tokens=1,
        sim_tokens_per_second=0,
        worker_concurrency=count,
        coalesce_ms=0,
    )
    factory = RedisFactory(settings)
    redis = factory.commands()
    keys = Keys(settings.key_prefix)
    bus = Bus(redis, keys, log_maxlen=100, log_ttl=600)
    try:
        await bus.ensure_group()
        cpu = time.process_time()
        jobs = [Job(run=f"r{i}", session=f"s{i}", prompt="hello") for i in range(count)]
        await asyncio.gather(*(bus.submit(job) for job in jobs))
        submit = time.process_time() - cpu
        stop = asyncio.Event()
        cpu = time.process_time()
        worker = asyncio.create_task(serve(settings, factory, stop))
        async with asyncio.timeout(DEADLINE):
            while True:  # a job leaves the stream when its run ends
                if not await redis.xlen(keys.jobs):
                    break
                await asyncio.sleep(0.02)
        run = time.process_time() - cpu
        stop.set()
        await worker
    finally:
        await redis.aclose()
    return {
        "jobs": count,
        "frontend_cpu_us_per_submit": round(submit / count * 1e6, 1),
        "worker_cpu_us_per_run": round(run / count * 1e6, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--count", type=int, default=2000)
    args = parser.parse_args()
    with (
        tempfile.TemporaryDirectory(prefix="thoughtwire-starts-") as workdir,
        own_redis(Path(workdir)) as (redis_url, _redis),
    ):
        print(json.dumps(loops.run(measure(redis_url, args.count))))


if __name__ == "__main__":
    main()
