"""Pipelining for the hottest script: many runs' appends in one round trip.

A worker runs many runs at once; each appends its events as they come. Appends
made in the same event-loop tick go to Redis together, in one pipeline: one write
and one read instead of one round trip each. Nothing waits on a timer, so a lone
append is not delayed; under load, batches form by themselves (every run woken by
one batch's reply appends its next event in the same tick).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

from redis.asyncio import Redis
from redis.commands.core import AsyncScript
from redis.exceptions import NoScriptError

Call = tuple[Sequence[Any], Sequence[Any], "asyncio.Future[Any]"]


class ScriptBatcher:
    """Runs one (idempotent) script for many callers, pipelined per event-loop tick."""

    def __init__(self, redis: Redis, script: AsyncScript, max_batch: int = 512) -> None:
        self._redis = redis
        self._script = script
        self._max_batch = max_batch
        self._pending: list[Call] = []
        self._scheduled: asyncio.Handle | None = None
        self._sending: set[asyncio.Task[None]] = set()

    async def __call__(self, keys: Sequence[Any], args: Sequence[Any]) -> Any:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        self._pending.append((keys, args, future))
        if len(self._pending) >= self._max_batch:
            self._flush()
        elif self._scheduled is None:
            self._scheduled = loop.call_soon(self._flush)
        return await future

    def _flush(self) -> None:
        if self._scheduled is not None:
            self._scheduled.cancel()
            self._scheduled = None
        batch, self._pending = self._pending, []
        if batch:
            task = asyncio.get_running_loop().create_task(self._send(batch))
            self._sending.add(task)
            task.add_done_callback(self._sending.discard)

    async def _send(self, batch: list[Call]) -> None:
        try:
            results = await self._execute(batch)
        except Exception as exc:
            results = [exc] * len(batch)
        for (_keys, _args, future), result in zip(batch, results, strict=True):
            if future.done():
                continue  # its caller was cancelled
            if isinstance(result, Exception):
                future.set_exception(result)
            else:
                future.set_result(result)

    async def _execute(self, batch: list[Call]) -> list[Any]:
        results = await self._pipeline(batch)
        if any(isinstance(r, NoScriptError) for r in results):
            # Redis restarted and forgot the script. The script is idempotent, so the
            # whole batch can run again once it is loaded.
            await self._redis.script_load(self._script.script)
            results = await self._pipeline(batch)
        return results

    async def _pipeline(self, batch: list[Call]) -> list[Any]:
        async with self._redis.pipeline(transaction=False) as pipe:
            for keys, args, _future in batch:
                pipe.evalsha(self._script.sha, len(keys), *keys, *args)
            results: list[Any] = await pipe.execute(raise_on_error=False)
            return results
