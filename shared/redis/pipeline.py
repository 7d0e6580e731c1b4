"""Pipelining for the hot paths: many callers' Redis calls in one round trip.

A worker runs many runs at once, each appending its events as they come; a frontend
queues prompts from many sockets. Their calls go to Redis together, in pipelines:
one write and one read instead of one round trip each. A pipeline leaves at the end
of the event-loop tick, or as soon as it holds ``max_batch`` calls (so a burst's
first calls need not wait for its last); whatever queues while the connection's
buffer is full waits here and goes out when it drains. Nothing waits on a timer, so a
lone call is not delayed; under load, pipelines fill by themselves.

A call is a script run (EVALSHA) or a few plain commands whose replies the caller
gets together. Calls of a bundle script (:meth:`Batcher.bundle`: the appends of many
sessions) queued one after the other share one script run, which returns each call's
reply: what a script run costs Redis besides its commands is paid once for all of them
(docs/performance.md, "Redis per event"); on a cluster, those of one master share one
(docs/redis.md, "Bundles per master"). Calls leave, and are run by Redis, in the order they were made (but
for script runs that Redis refused because it had forgotten the script: they are
run again after it is loaded). When a connection fails, only the calls whose replies
had not been read get the error: those may or may not have run, and each caller
knows whether its call is safe to repeat.

The pipeline is packed here rather than by redis-py's ``Pipeline``: the arguments
are only bytes, str and int, so the whole batch is encoded into one buffer with a
few joins (:mod:`thoughtwire.shared.redis.resp`), written once, and its replies read off one
pooled connection. That cut the worker's CPU per event by about a third
(docs/performance.md).

The connection is one of the pool's, opened by redis-py (so AUTH, SELECT, TLS and
the rest are its), and then read by a :class:`_Line`: a
:class:`~shared.redis.resp.ReplyReader` that hands each reply to its call from the
read callback. A pipeline costs one ``transport.write`` and no task, lock or timer of
its own; through redis-py's reader each cost about 40 µs more, which is most of what
an event costs a worker that streams slowly paced tokens. Where the connection is not
a plain socket we can read (the embedded mode's in-process Redis, or a client that
decodes replies), the calls go through redis-py's own ``Pipeline`` instead, one
pipeline at a time so that they still run in order. So do they with the fast paths
off (``THOUGHTWIRE_FAST_PATHS=0``), or with a redis-py or hiredis release the line was
not tested on (:mod:`thoughtwire.shared.redis.fast`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import Any, cast

from redis.asyncio import Redis
from redis.asyncio.connection import AbstractConnection
from redis.commands.core import AsyncScript
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import (
    NoScriptError,
    ReadOnlyError,
    RedisClusterException,
    RedisError,
    ResponseError,
    SlotNotCoveredError,
)

from thoughtwire.shared.redis import fast
from thoughtwire.shared.redis.cluster import ClusterClient, is_cluster, unavailable
from thoughtwire.shared.redis.resp import (
    PARTIAL,
    PUSH,
    Call,
    ReplyReader,
    pack_command,
    pack_evalsha,
    settle,
    unpack,
)


class _Line(ReplyReader):
    """The batcher's connection, read by hiredis from the read callback.

    Calls are written in order and Redis answers in order, so the replies pair with
    the calls waiting at the head of a queue. A call of several commands gets its
    replies as a list; an error reply takes its place in that list, or is a script
    run's result. A script run that Redis refused because it forgot the script goes
    to ``on_unknown``, which loads it and runs the call again.

    A reply that says Redis cannot serve now (``LOADING``, ``MASTERDOWN``: a connection
    error) fails the whole call, as a broken connection would. ``READONLY`` (a master
    demoted by a failover) fails every waiting call and drops the connection. RESP3 push
    messages (invalidations, maintenance notices) answer no call and are let go.

    Nothing heard for ``timeout`` seconds while calls wait aborts the connection.
    However it ends, every waiting call fails with a connection error, and redis-py's
    own protocol hears of it, so the pool can close and reopen the connection.
    """

    def __init__(
        self,
        transport: Any,
        previous: asyncio.BaseProtocol,
        timeout: float | None,
        on_unknown: Callable[[Call], None],
        on_writable: Callable[[], None],
    ) -> None:
        super().__init__(timeout)
        self._on_writable = on_writable
        self._transport = transport
        self._previous = previous
        self._on_unknown = on_unknown
        self._replies: list[Any] = []  # so far, for the head call when it has several
        self.paused = False  # the transport's buffer is full: calls wait in the batcher

    @classmethod
    def take_over(
        cls,
        connection: AbstractConnection,
        on_unknown: Callable[[Call], None],
        on_writable: Callable[[], None],
    ) -> _Line | None:
        """Read ``connection`` from now on; None where it is not a plain socket we can read."""
        transport = fast.transport_of(connection)
        if transport is None:
            return None
        line = cls(
            transport, transport.get_protocol(), connection.socket_timeout, on_unknown, on_writable
        )
        transport.set_protocol(line)
        return line

    def send(self, calls: list[Call]) -> None:
        """Write ``calls``; the batcher sends only on a line that is open and not paused."""
        if not self._waiting:
            self._heard = self._loop.time()  # silence counts from the first call waiting
            self._watch(self._silence or 0.0)
        self._waiting.extend(calls)
        self._transport.write(b"".join([call.payload for call in calls]))

    # --- asyncio.Protocol -------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        self._heard = self._loop.time()
        parser, waiting = self._parser, self._waiting
        parser.feed(data)
        while (reply := parser.gets()) is not PARTIAL:
            if reply.__class__ is PUSH:
                continue  # answers no call
            if reply.__class__ is ReadOnlyError:
                # A master demoted by a failover: not an answer but a connection to drop,
                # so that the next one asks where the master is now (Sentinel).
                self._lost(RedisConnectionError(f"the server is a replica now: {reply}"))
                self.abort()
                return
            if not waiting:
                self._lost(RedisConnectionError("a reply that no call waited for"))
                self.abort()
                return
            call = waiting[0]
            if call.replies > 1:
                self._replies.append(reply)
                if len(self._replies) < call.replies:
                    continue
                result: Any = self._replies
                self._replies = []
                unavailable = [r for r in result if isinstance(r, RedisConnectionError)]
                if unavailable:
                    result = unavailable[0]
            elif call.script is None:
                result = reply if isinstance(reply, RedisConnectionError) else [reply]
            else:
                result = reply
            waiting.popleft()
            if isinstance(result, NoScriptError) and not call.again:
                call.again = True
                self._on_unknown(call)
            else:
                settle(call, result)

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        self._previous.connection_lost(exc)  # redis-py's reader: closed, as it should be

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        self._on_writable()

    def _lost(self, error: Exception) -> None:
        self._replies = []
        super()._lost(error)


def _not_local(reply: Any) -> bool:
    """A cluster bundle's call that met a key its master does not hold, or a cluster down."""
    return isinstance(reply, ResponseError) and "Script attempted to" in str(reply)


class _Bundle:
    """Calls of one bundle script queued one after the other: one script run, one
    :class:`Call`, whose reply (a list) is shared out to their futures in order.

    On a cluster the calls are those of one master (``node``), whose keys span slots:
    the call is sent to that master (:attr:`Call.bundle`)."""

    __slots__ = ("args", "call", "common", "futures", "keys", "node", "parts", "script")

    def __init__(
        self,
        script: AsyncScript,
        common: tuple[Any, ...],
        future: asyncio.Future[Any],
        node: str | None = None,
    ) -> None:
        self.script = script
        self.common = common
        self.node = node
        self.keys: list[Any] = []
        self.args: list[Any] = list(common)
        self.parts: list[tuple[Sequence[Any], Sequence[Any]]] = []  # each call's keys, args
        self.futures: list[asyncio.Future[Any]] = []
        self.call = Call(b"", 1, script, future)  # packed when closed: nothing joins it then
        if node is not None:
            self.call.bundle = self
        future.add_done_callback(self._share)

    def join(self, keys: Sequence[Any], args: Sequence[Any]) -> asyncio.Future[Any]:
        """Add a call; the future gets its reply."""
        future: asyncio.Future[Any] = self.call.future.get_loop().create_future()
        if self.node is None:
            self.keys.extend(keys)
        else:  # a cluster's: no key declared, each call's among the arguments
            self.args.extend(keys)
            self.parts.append((keys, args))
        self.args.extend(args)
        self.futures.append(future)
        return future

    def close(self) -> None:
        """Pack the script run: no call joins it after this."""
        self.call.payload = pack_evalsha(self.script.sha.encode(), self.keys, self.args)

    def one_by_one(self, which: Sequence[int]) -> list[Call]:
        """Calls ``which`` each as a script run of its own (of one slot), routed alone."""
        loop = self.call.future.get_loop()
        return [
            Call(
                pack_evalsha(self.script.sha.encode(), keys, [*self.common, *args]),
                1,
                self.script,
                loop.create_future(),
            )
            for keys, args in (self.parts[i] for i in which)
        ]

    def _share(self, done: asyncio.Future[Any]) -> None:
        if done.cancelled():
            for future in self.futures:
                future.cancel()
            return
        error = done.exception()
        replies = None if error is not None else done.result()
        if error is None and (not isinstance(replies, list) or len(replies) != len(self.futures)):
            error = ResponseError(f"a bundle of {len(self.futures)} calls got {replies!r}")
        for i, future in enumerate(self.futures):
            if future.done():  # its caller gave up on it
                continue
            reply = error if error is not None else cast(list[Any], replies)[i]
            if isinstance(reply, BaseException):
                future.set_exception(reply)
            else:
                future.set_result(reply)


class Batcher:
    """Sends many callers' calls pipelined on one connection (see above)."""

    def __init__(
        self, redis: Redis, max_batch: int = 64, *, own_reader: bool | None = None
    ) -> None:
        """``own_reader`` False: always through redis-py's ``Pipeline``; None: as the fast
        paths' switch says (:mod:`thoughtwire.shared.redis.fast`)."""
        self._cluster = is_cluster(redis)
        if self._cluster:
            # A cluster's calls go to several masters: through redis-py's cluster pipeline,
            # which splits a batch per node, on a twin that hands replies on as Redis sent
            # them. The line reads one connection, so it is for one server only.
            twin: Any = cast(ClusterClient, redis).raw()  # same commands as a Redis
            redis = twin
            own_reader = False
        self._redis = redis
        self._max_batch = max_batch
        self._pending: list[Call] = []
        self._scheduled: asyncio.Handle | None = None
        self._connection: AbstractConnection | None = None
        # Our own reader of the connection, where it can be had (None: not known yet).
        self._line: _Line | None = None
        if own_reader is None:
            own_reader = fast.enabled()
        self._own_reader: bool | None = None if own_reader else False
        self._opening: asyncio.Task[None] | None = None
        self._unknown: list[Call] = []  # script runs waiting for their script to load
        self._loading: asyncio.Task[None] | None = None
        self._through_client: asyncio.Task[None] | None = None  # where we cannot read
        # The last bundle queued, while calls may join it: one per master on a cluster.
        self._open: dict[str, _Bundle] = {}

    @property
    def bundles(self) -> bool:
        """Whether calls of many sessions may share one script run (:meth:`bundle`): on one
        server, and on a cluster those of one master, with a script declared
        ``allow-cross-slot-keys`` (``register_script(..., cross_slot=True)``)."""
        return self._cluster or isinstance(self._redis, Redis)

    def script(
        self, script: AsyncScript, keys: Sequence[Any], args: Sequence[Any]
    ) -> asyncio.Future[Any]:
        """Run ``script``; the future gets its reply (or error). Cancel it to drop the reply."""
        return self._queue(pack_evalsha(script.sha.encode(), keys, args), 1, script)

    def commands(self, *commands: Sequence[Any]) -> asyncio.Future[list[Any]]:
        """Run ``commands`` one after the other; the future gets the list of their replies,
        where a command that Redis refused has its error in its place."""
        if not commands:
            done: asyncio.Future[list[Any]] = asyncio.get_running_loop().create_future()
            done.set_result([])
            return done
        payload = b"".join(pack_command(*command) for command in commands)
        return self._queue(payload, len(commands), None)

    def bundle(
        self,
        script: AsyncScript,
        common: tuple[Any, ...],
        keys: Sequence[Any],
        args: Sequence[Any],
    ) -> asyncio.Future[Any]:
        """Run one call of a bundle ``script``; the future gets this call's reply (or error).

        Calls of one bundle script with the same ``common`` arguments, queued one after
        the other, leave as one script run (up to ``max_batch`` of them): its keys are
        theirs in order, its arguments ``common`` and then theirs in order, and it
        returns their replies in order. Only where :attr:`bundles` says so. On a cluster,
        calls join the bundle of their first key's master; until the slot map is known,
        each goes alone.
        """
        node = self._master_of(keys[0])
        bundle = self._open.get(node) if node is not None else None
        if bundle is None or bundle.script is not script or bundle.common != common:
            loop = asyncio.get_running_loop()
            bundle = _Bundle(script, common, loop.create_future(), node if self._cluster else None)
            if node is None:  # a call of its own, routed by its keys
                future = bundle.join(keys, args)
                bundle.close()
                self._queue_call(bundle.call)
                return future
            self._queue_call(bundle.call, bundle, node)  # closes node's bundle before it
        future = bundle.join(keys, args)
        if len(bundle.futures) >= self._max_batch or len(self._pending) >= self._max_batch:
            self._flush()
        return future

    def _queue(
        self, payload: bytes, replies: int, script: AsyncScript | None
    ) -> asyncio.Future[Any]:
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._queue_call(Call(payload, replies, script, future))
        return future

    def _master_of(self, key: Any) -> str | None:
        """Which bundles a call of ``key`` may join: ``""`` on one server, the name of the
        key's master on a cluster (None while the slot map is not known)."""
        if not self._cluster:
            return ""
        try:
            node = cast(ClusterClient, self._redis).get_node_from_key(key)
        except (RedisClusterException, RedisError):
            return None
        return None if node is None else str(node.name)

    def _queue_call(self, call: Call, bundle: _Bundle | None = None, node: str = "") -> None:
        """Queue ``call`` (``bundle``'s, which calls of ``node`` then join: the caller
        flushes it)."""
        # Calls leave in order: nothing joins a bundle queued before this call (on a
        # cluster, before a plain call, or before a bundle of the same master).
        if bundle is None:
            self._close_bundles()
        elif (before := self._open.pop(node, None)) is not None:
            before.close()
        self._pending.append(call)
        if bundle is not None:
            self._open[node] = bundle
        if bundle is None and len(self._pending) >= self._max_batch:
            self._flush()  # a burst's first calls need not wait for its last
        elif self._scheduled is None:
            self._scheduled = asyncio.get_running_loop().call_soon(self._flush)

    def _close_bundles(self) -> None:
        for bundle in self._open.values():
            bundle.close()
        self._open.clear()

    def _flush(self) -> None:
        if self._scheduled is not None:
            self._scheduled.cancel()
            self._scheduled = None
        self._close_bundles()
        loop = asyncio.get_running_loop()
        if self._own_reader is not False:
            line = self._line
            if line is not None and not line.closed:
                if self._pending and not line.paused:  # paused: it calls again when it may
                    batch, self._pending = self._pending, []
                    line.send(batch)
            elif self._opening is None:
                self._opening = loop.create_task(self._open_line())
            return
        if self._pending and self._through_client is None:
            self._through_client = loop.create_task(self._send_through_client())

    async def _open_line(self) -> None:
        """Connect (again, after a loss) and read the connection with a :class:`_Line`,
        or learn that this connection must be read through redis-py."""
        try:
            if self._connection is None:
                self._connection = await self._redis.connection_pool.get_connection()
            connection = self._connection
            if self._line is not None:  # it was lost: let redis-py close what is left
                self._line = None
                await connection.disconnect(nowait=True)
            await connection.connect()
            self._line = _Line.take_over(connection, self._load_again, self._flush)
            self._own_reader = self._line is not None
            if self._line is None:  # redis-py's pipelines take connections of their own
                self._connection = None
                await self._redis.connection_pool.release(connection)
        except asyncio.CancelledError:  # the loop is closing: nobody waits forever
            pending, self._pending = self._pending, []
            for call in pending:
                call.future.cancel()
            if self._connection is not None:  # it may be mid-handshake: start afresh
                await self._connection.disconnect(nowait=True)
            raise
        except Exception as exc:  # nothing was sent: the calls waiting get the error
            pending, self._pending = self._pending, []
            for call in pending:
                settle(call, exc)
        finally:
            self._opening = None
        if self._pending:
            self._flush()

    def _load_again(self, call: Call) -> None:
        """From the line: Redis forgot ``call``'s script (it restarted). Load it, and run
        the call again; the calls after it have run."""
        self._unknown.append(call)
        if self._loading is None:
            self._loading = asyncio.get_running_loop().create_task(self._load_unknown())

    async def _load_unknown(self) -> None:
        calls, self._unknown = self._unknown, []
        try:
            for script in {id(call.script): call.script for call in calls}.values():
                assert script is not None
                await self._redis.script_load(script.script)
        except asyncio.CancelledError:
            for call in calls:
                call.future.cancel()
            raise
        except Exception as exc:  # for these calls only
            for call in calls:
                settle(call, exc)
        else:
            self._pending[:0] = calls
            self._flush()
        finally:
            self._loading = None
            if self._unknown:  # refused while these were loading
                self._loading = asyncio.get_running_loop().create_task(self._load_unknown())

    # --- through redis-py, where the connection is not ours to read ---------------

    async def _send_through_client(self) -> None:
        """Send what waits, a pipeline at a time, through redis-py's ``Pipeline``."""
        batch: list[Call] = []
        try:
            while self._pending:  # ends once a pipeline finds nothing more queued
                self._close_bundles()
                batch = self._pending[: self._max_batch]
                del self._pending[: self._max_batch]
                try:
                    results = await self._run_through_client(batch)
                except Exception as exc:  # the pipeline could not be sent
                    results = [unavailable(exc)] * len(batch)
                for call, result in zip(batch, results, strict=True):
                    settle(call, result)
                batch = []
        except asyncio.CancelledError:  # the loop is closing: nobody waits forever
            for call in [*batch, *self._pending]:
                call.future.cancel()
            self._pending = []
            raise
        finally:
            self._through_client = None

    async def _run_through_client(self, batch: list[Call]) -> list[Any]:
        """Each call's result: a script's reply or error, or a list of command replies."""
        results = await self._routed_pipeline(batch)
        unknown = [i for i, result in enumerate(results) if isinstance(result, NoScriptError)]
        if unknown:
            # Redis forgot the scripts (it restarted), so these calls did not run: load
            # them, and run just those calls again.
            try:
                for script in {id(batch[i].script): batch[i].script for i in unknown}.values():
                    assert script is not None
                    await self._redis.script_load(script.script)
                again = await self._routed_pipeline([batch[i] for i in unknown])
            except Exception as exc:  # for these calls only: the others have run
                again = [exc] * len(unknown)
            for i, result in zip(unknown, again, strict=True):
                results[i] = result
        for i, call in enumerate(batch):  # bounded by the batch
            if call.bundle is not None:
                results[i] = await self._rerouted(call.bundle, results[i])
        return results

    async def _rerouted(self, bundle: _Bundle, result: Any) -> Any:
        """A cluster bundle's replies, with the calls that did not run on its master (the
        whole bundle: a slot moved, the master failed over, a connection was lost; a
        call: a key of a slot that is not, or no longer, this master's) run again, each
        routed by its own slot, which follows redirections and reads the slot map again.
        An append is safe to repeat: what its attempt already wrote is not written twice."""
        if isinstance(result, Exception):
            again = list(range(len(bundle.parts)))
            replies: list[Any] = [result] * len(again)
        elif isinstance(result, list) and len(result) == len(bundle.parts):
            replies = list(result)
            again = [i for i, reply in enumerate(replies) if _not_local(reply)]
        else:
            return result  # malformed: the bundle's callers get an error (_Bundle._share)
        if not again:
            return replies
        calls = bundle.one_by_one(again)
        try:
            # As any call: its master may not know the script (promoted, restarted, new).
            rerun = await self._run_through_client(calls)
        except Exception as exc:
            rerun = [unavailable(exc)] * len(calls)
        for i, reply in zip(again, rerun, strict=True):
            # A call's own reply is the one reply in its script run's list of replies.
            replies[i] = reply[0] if isinstance(reply, list) and len(reply) == 1 else reply
        return replies

    async def _routed_pipeline(self, batch: list[Call]) -> list[Any]:
        """:meth:`_client_pipeline`, where a call that a cluster cannot route fails alone.

        A cluster pipeline routes each command by its key before it sends any, and a
        command it finds no node for fails the whole pipeline: then nothing was sent, and
        each call goes again in a pipeline of its own, so only the unroutable one fails.
        """
        try:
            return await self._client_pipeline(batch)
        except RedisClusterException as exc:
            if len(batch) == 1 or isinstance(exc, SlotNotCoveredError):
                raise  # a slot nobody serves now (a failover): Redis is not there now
        results: list[Any] = []
        for call in batch:  # bounded by the batch
            try:
                results.extend(await self._client_pipeline([call]))
            except Exception as exc:
                results.append(unavailable(exc))
        return results

    async def _client_pipeline(self, batch: list[Call]) -> list[Any]:
        pipe: Any = self._redis.pipeline(transaction=False)
        # Replies as Redis sent them, as the line gives them, not reshaped per command.
        pipe.response_callbacks = {}
        for call in batch:
            where = self._target(call)
            for name, *args in unpack(call.payload):
                # The name as text: a cluster pipeline routes by it (EVALSHA by its keys).
                pipe.execute_command(name.decode(), *args, **where)
        # A cluster's refusal to serve a slot now (a failover) is Redis not being there.
        replies = [unavailable(r) for r in await pipe.execute(raise_on_error=False)]
        results: list[Any] = []
        at = 0
        for call in batch:
            mine = replies[at : at + call.replies]
            at += call.replies
            results.append(mine[0] if call.script is not None else mine)
        return results

    def _target(self, call: Call) -> dict[str, Any]:
        """Where a cluster pipeline sends ``call``: a bundle to the master of its first
        call's key, now; any other call where its keys route it."""
        if call.bundle is None:
            return {}
        try:
            first = call.bundle.parts[0][0][0]
            node = cast(ClusterClient, self._redis).get_node_from_key(first)
        except (RedisClusterException, RedisError):
            return {}  # it fails to route, and goes one by one
        return {} if node is None else {"target_nodes": node}
