"""Pipelining for the hot paths: many callers' Redis calls in one round trip.

A worker runs many runs at once, each appending its events as they come; a frontend
queues prompts from many sockets. Their calls go to Redis together, in pipelines:
one write and one read instead of one round trip each. A pipeline leaves at the end
of the event-loop tick, or as soon as it holds ``max_batch`` calls (so a burst's
first calls need not wait for its last); up to ``max_in_flight`` are away at a time
on one connection, and whatever queues beyond goes out as one comes back. Nothing
waits on a timer, so a lone call is not delayed; under load, pipelines fill by
themselves.

A call is a script run (EVALSHA) or a few plain commands whose replies the caller
gets together. Calls leave, and are run by Redis, in the order they were made (but
for script runs that Redis refused because it had forgotten the script: they are
run again after it is loaded). When a connection fails, only the calls whose replies
had not been read get the error: those may or may not have run, and each caller
knows whether its call is safe to repeat.

The pipeline is packed here rather than by redis-py's ``Pipeline``: the arguments
are only bytes, str and int, so the whole batch is encoded into one buffer with a
few joins, written once, and its replies read off one pooled connection. That cut
the worker's CPU per event by about a third (docs/performance.md).
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from redis.asyncio import Redis
from redis.asyncio.connection import AbstractConnection
from redis.commands.core import AsyncScript
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, ResponseError


def _encode(value: Any) -> bytes:
    if isinstance(value, str):
        return value.encode()
    if isinstance(value, int):
        return b"%d" % value
    raise TypeError(f"cannot send {type(value).__name__} to Redis")


def _pack(parts: Sequence[Any]) -> bytes:
    data = [part if part.__class__ is bytes else _encode(part) for part in parts]
    return b"*%d\r\n" % len(data) + b"".join([b"$%d\r\n%b\r\n" % (len(d), d) for d in data])


def pack_command(*parts: Any) -> bytes:
    """One command in RESP, as redis-py would send it."""
    return _pack(parts)


def pack_evalsha(sha: bytes, keys: Sequence[Any], args: Sequence[Any]) -> bytes:
    """One EVALSHA command in RESP."""
    return _pack([b"EVALSHA", sha, len(keys), *keys, *args])


@dataclass(slots=True)
class _Call:
    payload: bytes
    replies: int  # how many commands the payload holds
    script: AsyncScript | None  # set for a script run, to load it again after a restart
    future: asyncio.Future[Any]


class Batcher:
    """Sends many callers' calls pipelined on one connection (see above)."""

    def __init__(self, redis: Redis, max_batch: int = 64, max_in_flight: int = 4) -> None:
        self._redis = redis
        self._max_batch = max_batch
        self._max_in_flight = max_in_flight
        self._pending: list[_Call] = []
        self._scheduled: asyncio.Handle | None = None
        self._sending: set[asyncio.Task[None]] = set()
        self._connection: AbstractConnection | None = None
        # Pipelines share the connection: sent in turn, and their replies read in the
        # same turn. A reset bumps the generation, failing pipelines sent before it.
        self._send_turn = asyncio.Lock()
        self._read_turn = asyncio.Lock()
        self._generation = 0

    def script(
        self, script: AsyncScript, keys: Sequence[Any], args: Sequence[Any]
    ) -> asyncio.Future[Any]:
        """Run ``script``; the future gets its reply (or error). Cancel it to drop the reply."""
        return self._queue(pack_evalsha(script.sha.encode(), keys, args), 1, script)

    def commands(self, *commands: Sequence[Any]) -> asyncio.Future[list[Any]]:
        """Run ``commands`` one after the other; the future gets the list of their replies,
        where a command that Redis refused has its error in its place."""
        payload = b"".join(pack_command(*command) for command in commands)
        return self._queue(payload, len(commands), None)

    def _queue(
        self, payload: bytes, replies: int, script: AsyncScript | None
    ) -> asyncio.Future[Any]:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        self._pending.append(_Call(payload, replies, script, future))
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

    async def _send(self, batch: list[_Call]) -> None:
        try:
            results = await self._execute(batch)
        except asyncio.CancelledError:  # the loop is closing: nobody waits forever
            for call in batch:
                call.future.cancel()
            raise
        except Exception as exc:  # the pipeline could not be sent
            results = [exc] * len(batch)
        for call, result in zip(batch, results, strict=True):
            if call.future.done():
                continue  # its caller was cancelled
            if isinstance(result, Exception):
                call.future.set_exception(result)
            else:
                call.future.set_result(result)

    async def _execute(self, batch: list[_Call]) -> list[Any]:
        """Each call's result: a script's reply or error, or a list of command replies."""
        results = await self._pipeline(batch)
        unknown = [i for i, result in enumerate(results) if isinstance(result, NoScriptError)]
        if unknown:
            # Redis restarted and forgot the scripts, so these calls did not run: load
            # them, and run just those calls again.
            try:
                for script in {id(batch[i].script): batch[i].script for i in unknown}.values():
                    assert script is not None
                    await self._redis.script_load(script.script)
                again = await self._pipeline([batch[i] for i in unknown])
            except Exception as exc:  # for these calls only: the others have run
                again = [exc] * len(unknown)
            for i, result in zip(unknown, again, strict=True):
                results[i] = result
        return results

    async def _pipeline(self, batch: list[_Call]) -> list[Any]:
        payload = b"".join(call.payload for call in batch)
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
                    for call in batch:
                        replies = [await self._reply(connection) for _ in range(call.replies)]
                        results.append(replies[0] if call.script is not None else replies)
            except BaseException as exc:
                # In the send turn: a pipeline being sent (perhaps on a connection it
                # just reopened) must not outlive the reset with replies nobody reads.
                async with self._send_turn:
                    await self._reset(connection, generation)
                if not isinstance(exc, Exception):
                    raise
                # The calls read so far have run; the error goes to the rest.
                results.extend([exc] * (len(batch) - len(results)))
            return results

    @staticmethod
    async def _reply(connection: AbstractConnection) -> Any:
        try:
            return await connection.read_response(timeout=math.inf)
        except ResponseError as exc:  # a reply, not a broken connection
            return exc

    async def _reset(self, connection: AbstractConnection, generation: int) -> None:
        """Replies may be left unread: pipelines sent on this connection so far fail, and
        it connects again for the next one. Called in the send turn; a reset that
        someone else already made is not made twice."""
        if generation == self._generation:
            self._generation += 1
            await connection.disconnect(nowait=True)
