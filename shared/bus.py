"""The bus: the contract between frontends and workers, and its Redis implementation.

Guarantees, as of this module:

* **Jobs** go into one Redis Stream read by a consumer group. A job is delivered to
  one worker; it is acknowledged (and deleted) when its run has ended.
* **Events** of a session are numbered ``seq`` = 1, 2, 3, ... with no gaps. Each one
  is appended to the session's log (a stream bounded by MAXLEN and a TTL) and
  published on the session's channel in one atomic script, so the log and the live
  channel never disagree on order or content.
* **Live delivery** over pub/sub is at-most-once: a frontend that is not subscribed
  at the moment of PUBLISH misses the event. The log is there to fill such holes.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Sequence
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import ResponseError

from shared.keys import Keys
from shared.protocol import Job, Thought, encode_event_head

# KEYS: meta, log, channel.  ARGV: maxlen, ttl, epoch-if-new, head1, head2, ...
# Each head is an event encoded up to its ``"seq":``; the script completes it with
# the position, so the log entry and the published bytes are identical. The stream
# id of an event is ``0-<seq>``: XRANGE (0-N + reads everything after seq N.
APPEND_SCRIPT = """
local seq = tonumber(redis.call('HGET', KEYS[1], 'seq') or '0')
local epoch = redis.call('HGET', KEYS[1], 'epoch')
if not epoch then
  epoch = ARGV[3]
  redis.call('HSET', KEYS[1], 'epoch', epoch)
end
local tail = ',"epoch":"' .. epoch .. '"}'
for i = 4, #ARGV do
  seq = seq + 1
  local payload = ARGV[i] .. seq .. tail
  redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[1], '0-' .. seq, 'e', payload)
  redis.call('PUBLISH', KEYS[3], payload)
end
redis.call('HSET', KEYS[1], 'seq', seq)
redis.call('EXPIRE', KEYS[1], ARGV[2])
redis.call('EXPIRE', KEYS[2], ARGV[2])
return seq
"""


def now_ms() -> int:
    return time.time_ns() // 1_000_000


class Bus:
    """Queue jobs, append events, publish messages. Shared by frontends and workers."""

    def __init__(self, redis: Redis, keys: Keys, *, log_maxlen: int, log_ttl: int) -> None:
        self.redis = redis
        self.keys = keys
        self._log_maxlen = log_maxlen
        self._log_ttl = log_ttl
        self._append = redis.register_script(APPEND_SCRIPT)

    # --- jobs ---------------------------------------------------------------

    async def submit(self, job: Job) -> None:
        await self.redis.xadd(self.keys.jobs, {"job": job.encode()})

    async def ensure_group(self) -> None:
        """Create the workers' consumer group (and the stream) if they do not exist."""
        try:
            await self.redis.xgroup_create(self.keys.jobs, self.keys.jobs_group, "0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    async def claim(self, consumer: str, count: int, block_ms: int) -> list[tuple[str, Job]]:
        """Take up to ``count`` new jobs for ``consumer``, waiting at most ``block_ms``."""
        reply: Any = await self.redis.xreadgroup(
            self.keys.jobs_group, consumer, {self.keys.jobs: ">"}, count=count, block=block_ms
        )
        jobs = []
        for _stream, entries in reply or ():
            for entry_id, fields in entries:
                jobs.append((_text(entry_id), Job.decode(fields[b"job"])))
        return jobs

    async def finish(self, entry_id: str) -> None:
        """Acknowledge a job and drop it from the stream: the stream holds only live jobs."""
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.xack(self.keys.jobs, self.keys.jobs_group, entry_id)
            pipe.xdel(self.keys.jobs, entry_id)
            await pipe.execute()

    # --- events -------------------------------------------------------------

    async def append(self, session: str, run: str, thoughts: Sequence[Thought]) -> int:
        """Append events to the session's log and publish them; returns the last seq."""
        ts = now_ms()
        heads = [encode_event_head(t, session, run, ts) for t in thoughts]
        keys = self.keys
        seq = await self._append(
            keys=[
                keys.session_meta(session),
                keys.session_log(session),
                keys.session_channel(session),
            ],
            args=[self._log_maxlen, self._log_ttl, os.urandom(6).hex(), *heads],
        )
        return int(seq)

    async def history(self, session: str, after: int = 0) -> list[bytes]:
        """Events of the session's log with ``seq > after``, oldest first."""
        entries: Any = await self.redis.xrange(self.keys.session_log(session), min=f"(0-{after}")
        return [fields[b"e"] for _id, fields in entries]

    # --- plain messages -----------------------------------------------------

    async def publish(self, channel: str, payload: str | bytes) -> int:
        return int(await self.redis.publish(channel, payload))

    async def subscribers(self, channels: Iterable[str]) -> dict[str, int]:
        """PUBSUB NUMSUB, for tests and health checks."""
        reply: Any = await self.redis.pubsub_numsub(*channels)
        return {_text(name): int(count) for name, count in reply}


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
