"""Pipelining for the hottest script: many runs' appends in one round trip.

A worker runs many runs at once; each appends its events as they come. Appends go
to Redis together, in pipelines: one write and one read instead of one round trip
each. A pipeline leaves at the end of the event-loop tick, or as soon as it holds
``max_batch`` calls (so a burst's first calls need not wait for its last); up to
``max_in_flight`` are away at a time on one connection, and whatever queues beyond
goes out as one comes back. Nothing waits on a timer, so a lone append is not
delayed; under load, pipelines fill by themselves.

The pipeline is packed here rather than by redis-py's ``Pipeline``: the arguments
are only bytes, str and int, so the whole batch is encoded into one buffer with a
few joins, written once, and its replies read off one pooled connection. That cut
the worker's CPU per event by about a third (docs/performance.md).
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Sequence
from typing import Any

from redis.asyncio import Redis
from redis.asyncio.connection import AbstractConnection
from redis.commands.core import AsyncScript
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, ResponseError

Call = tuple[Sequence[Any], Sequence[Any], "asyncio.Future[Any]"]


def _bulk(value: Any) -> bytes:
    if isinstance(value, bytes):
        data = value
    elif isinstance(value, str):
        data = value.encode()
    elif isinstance(value, int):
        data = str(value).encode()
    else:
        raise TypeError(f"cannot send {type(value).__name__} to Redis")
    return b"$%d\r\n%b\r\n" % (len(data), data)


def pack_evalsha(sha: bytes, keys: Sequence[Any], args: Sequence[Any]) -> bytes:
    """One EVALSHA command in RESP, as redis-py would send it."""
    parts = [b"*%d\r\n$7\r\nEVALSHA\r\n" % (3 + len(keys) + len(args)), _bulk(sha)]
    parts.append(_bulk(len(keys)))
    parts.extend(map(_bulk, keys))
    parts.extend(map(_bulk, args))
    return b"".join(parts)


class ScriptBatcher:
    """Runs one script for many callers, pipelined (see above)."""

    def __init__(
        self, redis: Redis, script: AsyncScript, max_batch: int = 64, max_in_flight: int = 4
    ) -> None:
        self._redis = redis
        self._script = script
        self._sha = script.sha.encode()
        self._max_batch = max_batch
        self._max_in_flight = max_in_flight
        self._pending: list[Call] = []
        self._scheduled: asyncio.Handle | None = None
        self._sending: set[asyncio.Task[None]] = set()
        self._connection: AbstractConnection | None = None
        # Pipelines share the connection: sent in turn, and their replies read in the
        # same turn. A reset bumps the generation, failing pipelines sent before it.
        self._send_turn = asyncio.Lock()
        self._read_turn = asyncio.Lock()
        self._generation = 0

    async def __call__(self, keys: Sequence[Any], args: Sequence[Any]) -> Any:
        return await self.submit(keys, args)

    def submit(self, keys: Sequence[Any], args: Sequence[Any]) -> asyncio.Future[Any]:
        """Queue one call; the future gets its reply (or error). Cancel it to drop the reply."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        self._pending.append((keys, args, future))
        if len(self._pending) >= self._max_batch:
            self._flush()  # a burst's first calls need not wait for its last
        elif self._scheduled is None:
            self._scheduled = loop.call_soon(self._flush)
        return future

    def _flush(self) -> None:
        if self._scheduled is not None:
            self._scheduled.cancel()
            self._scheduled = None
        loop = asyncio.get_running_loop()
        while self._pending and len(self._sending) < self._max_in_flight:
            batch = self._pending[: self._max_batch]
            del self._pending[: self._max_batch]
            task = loop.create_task(self._send(batch))
            self._sending.add(task)
            task.add_done_callback(self._sent)

    def _sent(self, task: asyncio.Task[None]) -> None:
        # What queued while every pipeline was away goes out as one comes back.
        self._sending.discard(task)
        if self._pending:
            self._flush()

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
        commands = [pack_evalsha(self._sha, keys, args) for keys, args, _ in batch]
        results = await self._pipeline(b"".join(commands), len(commands))
        unknown = [i for i, result in enumerate(results) if isinstance(result, NoScriptError)]
        if unknown:
            # Redis restarted and forgot the script, so these calls did not run: load
            # it, and run just them again.
            await self._redis.script_load(self._script.script)
            again = await self._pipeline(b"".join(commands[i] for i in unknown), len(unknown))
            for i, result in zip(unknown, again, strict=True):
                results[i] = result
        return results

    async def _pipeline(self, payload: bytes, count: int) -> list[Any]:
        # The batcher keeps one connection of the pool for itself rather than taking
        # one from it per pipeline.
        async with self._send_turn:
            if self._connection is None:
                self._connection = await self._redis.connection_pool.get_connection()
            connection, generation = self._connection, self._generation
            try:
                await connection.send_packed_command(payload, check_health=False)
            except BaseException:
                await self._reset(connection, generation)
                raise
        async with self._read_turn:
            if generation != self._generation:
                raise RedisConnectionError("the connection was reset before these replies")
            results: list[Any] = []
            try:
                # One deadline for the whole pipeline rather than one per reply.
                async with asyncio.timeout(connection.socket_timeout):
                    for _ in range(count):
                        try:
                            results.append(await connection.read_response(timeout=math.inf))
                        except ResponseError as exc:  # a reply, not a broken connection
                            results.append(exc)
            except BaseException:
                # In the send turn: a pipeline being sent (perhaps on a connection it
                # just reopened) must not outlive the reset with replies nobody reads.
                async with self._send_turn:
                    await self._reset(connection, generation)
                raise
            return results

    async def _reset(self, connection: AbstractConnection, generation: int) -> None:
        """Replies may be left unread: pipelines sent on this connection so far fail, and
        it connects again for the next one. Called in the send turn; a reset that
        someone else already made is not made twice."""
        if generation == self._generation:
            self._generation += 1
            await connection.disconnect(nowait=True)
