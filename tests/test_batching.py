"""The batcher's own reading of its connection, against a real redis-server.

On a plain socket the batcher reads replies itself (``shared.redis.pipeline._Line``); these
tests show that it does, and that a connection that is killed or goes silent fails
only the calls waiting on it, and the next call finds a new connection.
"""

from __future__ import annotations

import asyncio
import os
import signal

import pytest

from tests.procs import RedisServer, seconds
from thoughtwire.shared.redis import (
    Batcher,
    Redis,
    RedisConnectionError,
    RedisTimeoutError,
    ResponseError,
)


async def test_a_killed_connection_fails_the_waiting_call_and_the_next_one_reconnects(
    redis_server, prefix
):
    client = Redis(port=redis_server.port)
    batcher = Batcher(client)
    try:
        [first_id] = await batcher.commands(("CLIENT", "ID"))
        assert batcher._line is not None  # replies are read by the batcher itself
        # A call the server holds (a blocking pop), and the connection killed under it.
        waiting = batcher.commands(("BLPOP", f"{prefix}:nothing", 10))
        await asyncio.sleep(0.1)
        await client.client_kill_filter(_id=first_id)
        async with asyncio.timeout(seconds(5)):
            with pytest.raises(RedisConnectionError):
                await waiting
        [second_id] = await batcher.commands(("CLIENT", "ID"))
        assert second_id != first_id
        set_and_get = (("SET", f"{prefix}:k", "v"), ("GET", f"{prefix}:k"))
        assert await batcher.commands(*set_and_get) == [b"OK", b"v"]
    finally:
        await client.aclose()


async def test_a_silent_server_fails_the_waiting_calls_after_the_socket_timeout(tmp_path):
    server = RedisServer(tmp_path).start()
    client = Redis(port=server.port, socket_timeout=0.5)
    batcher = Batcher(client)
    try:
        assert await batcher.commands(("PING",)) == [b"PONG"]
        os.kill(server.proc.popen.pid, signal.SIGSTOP)
        try:
            async with asyncio.timeout(seconds(5)):
                with pytest.raises(RedisTimeoutError):
                    await batcher.commands(("PING",))
        finally:
            os.kill(server.proc.popen.pid, signal.SIGCONT)
        assert await batcher.commands(("PING",)) == [b"PONG"]
    finally:
        await client.aclose()
        server.stop()


async def test_many_callers_across_ticks_each_get_their_own_reply(redis_server, prefix):
    client = Redis(port=redis_server.port)
    batcher = Batcher(client)
    try:

        async def caller(i: int) -> list[object]:
            await asyncio.sleep((i % 7) / 1000)  # calls spread over several ticks
            return await batcher.commands(("INCRBY", f"{prefix}:n{i % 5}", i), ("ECHO", str(i)))

        replies = await asyncio.gather(*(caller(i) for i in range(500)))
        assert [echo for _, echo in replies] == [str(i).encode() for i in range(500)]
        totals = [sum(range(k, 500, 5)) for k in range(5)]
        assert [int(await client.get(f"{prefix}:n{k}")) for k in range(5)] == totals
    finally:
        await client.aclose()


async def test_the_embedded_redis_is_read_through_redis_py():
    import fakeredis

    client = fakeredis.FakeAsyncRedis()
    batcher = Batcher(client)
    try:
        assert await batcher.commands(("PING",)) == [b"PONG"]
        assert batcher._line is None
    finally:
        await client.aclose()


async def test_the_embedded_redis_keeps_raw_replies_order_and_reloads_forgotten_scripts():
    """Through redis-py's pipeline the replies are the same as off the batcher's own line:
    as Redis sent them, in call order, a refused command's error in its place, and a
    script Redis forgot loaded and run again."""
    import fakeredis

    client = fakeredis.FakeAsyncRedis()
    batcher = Batcher(client)
    script = client.register_script("return redis.call('INCR', KEYS[1])")
    try:
        assert await batcher.commands(("SET", "k", "v"), ("GET", "k")) == [b"OK", b"v"]
        assert batcher._line is None
        # Never loaded: the first pipelines are refused with NOSCRIPT, then run again.
        replies = await asyncio.gather(*(batcher.script(script, ["n"], []) for _ in range(200)))
        assert replies == list(range(1, 201))
        await client.script_flush()
        assert await batcher.script(script, ["n"], []) == 201
        [refused] = await batcher.commands(("INCR", "k"))
        assert isinstance(refused, ResponseError)
    finally:
        await client.aclose()


async def test_replies_that_are_false_or_pushed_keep_every_call_paired(redis_server, prefix):
    # RESP3 has a real False, and a server may push messages that answer no call
    # (here a client-side caching invalidation, sent on the batcher's own connection).
    client = Redis(port=redis_server.port)
    other = Redis(port=redis_server.port)
    batcher = Batcher(client)
    tracked = f"{prefix}:tracked"
    try:
        assert await batcher.commands(("EVAL", "redis.setresp(3); return false", 0)) == [False]
        assert await batcher.commands(("ECHO", "mine")) == [b"mine"]
        await batcher.commands(("CLIENT", "TRACKING", "ON"), ("GET", tracked))
        waiting = batcher.commands(("BLPOP", f"{prefix}:nothing", "0.5"))
        await asyncio.sleep(0.1)
        await other.set(tracked, "x")  # the server pushes an invalidation now
        assert await waiting == [None]
        assert await batcher.commands(("ECHO", "still paired")) == [b"still paired"]
        assert batcher._line is not None and not batcher._line.closed
    finally:
        await other.aclose()
        await client.aclose()


async def test_no_commands_is_an_empty_reply_and_takes_no_one_elses(redis_server):
    client = Redis(port=redis_server.port)
    batcher = Batcher(client)
    try:
        empty, echo = await asyncio.gather(batcher.commands(), batcher.commands(("ECHO", "x")))
        assert (empty, echo) == ([], [b"x"])
    finally:
        await client.aclose()


async def test_a_client_that_decodes_replies_is_read_through_redis_py(redis_server):
    client = Redis(port=redis_server.port, decode_responses=True)
    batcher = Batcher(client)
    try:
        assert await batcher.commands(("ECHO", "text")) == ["text"]
        assert batcher._line is None
    finally:
        await client.aclose()


async def test_calls_wait_in_the_batcher_while_redis_is_not_reading(tmp_path, prefix):
    server = RedisServer(tmp_path).start()
    client = Redis(port=server.port, socket_timeout=10)
    batcher = Batcher(client)
    try:
        await batcher.commands(("PING",))
        line = batcher._line
        assert line is not None
        os.kill(server.proc.popen.pid, signal.SIGSTOP)
        try:
            value = "v" * 10_000
            calls = [batcher.commands(("SET", f"{prefix}:{i}", value)) for i in range(3000)]
            async with asyncio.timeout(seconds(5)):
                while not line.paused:  # 30 MB fill the socket's buffers and then the write's
                    await asyncio.sleep(0.01)
            assert batcher._pending  # the rest wait here, not in the transport
        finally:
            os.kill(server.proc.popen.pid, signal.SIGCONT)
        async with asyncio.timeout(seconds(20)):
            assert await asyncio.gather(*calls) == [[b"OK"]] * 3000
        assert not line.paused and not line.closed
    finally:
        await client.aclose()
        server.stop()
