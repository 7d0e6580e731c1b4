"""The comparison systems' worker: streams tokens to a session when asked.

It takes start commands from a Redis list and, like an LLM run, sends ``tokens``
tokens at ``rate`` per second (0: unpaced), each within ``jitter`` of an interval of
its slot as the simulated agent's are, then ``done``. ``thin`` PUBLISHes each
token (awaited); ``sio`` emits through a write-only AsyncRedisManager.

    python -m bench.feeder --system thin|socketio --redis URL
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import time

import socketio
from redis.asyncio import BlockingConnectionPool, Redis

from thoughtwire.shared import loops


def now_ms() -> int:
    return time.time_ns() // 1_000_000


async def stream(send, session: str, tokens: int, rate: float, jitter: float) -> None:  # type: ignore[no-untyped-def]
    start = time.monotonic()
    for seq in range(1, tokens + 2):
        if rate > 0:
            slot = seq - 1 + random.uniform(-jitter, jitter) if seq > 1 else 0
            delay = start + slot / rate - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
        kind = "answer" if seq <= tokens else "done"
        await send(
            session,
            {"type": kind, "content": "tok ", "session": session, "seq": seq, "ts": now_ms()},
        )


async def main(system: str, redis_url: str) -> None:
    # Sized explicitly: redis-py 8 caps a pool at 100 and then raises
    # MaxConnectionsError, which drops streams under this very load.
    redis = Redis.from_pool(
        BlockingConnectionPool.from_url(redis_url, max_connections=64, timeout=10)
    )
    if system == "thin":

        async def send(session, event):  # type: ignore[no-untyped-def]
            await redis.publish(f"thin:{session}", json.dumps(event))
    else:
        manager = socketio.AsyncRedisManager(redis_url, write_only=True)

        async def send(session, event):  # type: ignore[no-untyped-def]
            await manager.emit("event", event, room=session)

    running = set()
    while True:
        # Blocking for less than redis-py's 5 s socket timeout, which would otherwise
        # end this process, and every stream it is sending, while it waits.
        popped = await redis.blpop([f"bench:{system}:start"], timeout=1)
        if popped is None:
            continue
        command = json.loads(popped[1])
        task = asyncio.create_task(
            stream(send, command["session"], command["tokens"], command["rate"], command["jitter"])
        )
        running.add(task)
        task.add_done_callback(running.discard)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--system", choices=["thin", "socketio"], required=True)
    parser.add_argument("--redis", required=True)
    args = parser.parse_args()
    loops.run(main(args.system, args.redis))
