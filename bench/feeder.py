"""The comparison systems' worker: streams tokens to a session when asked.

It takes start commands from a Redis list and, like an LLM run, sends ``tokens``
tokens at ``rate`` per second (0: unpaced), each within ``jitter`` of an interval of
its slot as the simulated agent's are, then ``done``. ``thin`` PUBLISHes each
token (awaited); ``sio`` emits through a write-only AsyncRedisManager. ``thin-logged``
is the least a resumable relay must ask of Redis: each token appended to its session's
stream and published (``XADD`` and ``PUBLISH``), the tokens of every session that are
ready sent together in one pipeline (no script: Redis runs the two commands for less
from a pipeline than from Lua), as thoughtwire's worker bundles its appends, but with
nothing else: no fence, no idempotence, no epochs, no expiry, no run state.

    python -m bench.feeder --system thin|thin-logged|socketio --redis URL
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


class Logged:
    """Tokens appended and published in bundles: what is ready goes in one pipeline, one
    pipeline in flight at a time (the next bundle fills meanwhile)."""

    def __init__(self, redis: Redis) -> None:
        self.redis = redis
        self.ready: list[tuple[str, str, asyncio.Future[None]]] = []
        self.wake = asyncio.Event()

    async def send(self, session: str, event: dict) -> None:  # type: ignore[type-arg]
        done = asyncio.get_running_loop().create_future()
        self.ready.append((session, json.dumps(event), done))
        self.wake.set()
        await done

    async def flush(self) -> None:
        """Send what is ready, bundle after bundle, for as long as the process runs."""
        while True:
            await self.wake.wait()
            self.wake.clear()
            bundle, self.ready = self.ready, []
            pipe = self.redis.pipeline(transaction=False)
            for session, event, _ in bundle:
                pipe.xadd(f"thinlog:{session}", {"e": event}, maxlen=1000, approximate=True)
                pipe.publish(f"thin:{session}", event)
            try:
                await pipe.execute()
            except Exception as exc:  # each waiting token hears of it
                for _, _, done in bundle:
                    done.set_exception(exc)
            else:
                for _, _, done in bundle:
                    done.set_result(None)


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
    running: set[asyncio.Task[None]] = set()
    if system == "thin":

        async def send(session, event):  # type: ignore[no-untyped-def]
            await redis.publish(f"thin:{session}", json.dumps(event))
    elif system == "thin-logged":
        logged = Logged(redis)
        send = logged.send
        running.add(asyncio.create_task(logged.flush()))
    else:
        manager = socketio.AsyncRedisManager(redis_url, write_only=True)

        async def send(session, event):  # type: ignore[no-untyped-def]
            await manager.emit("event", event, room=session)

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
    parser.add_argument("--system", choices=["thin", "thin-logged", "socketio"], required=True)
    parser.add_argument("--redis", required=True)
    args = parser.parse_args()
    loops.run(main(args.system, args.redis))
