"""The hub against a real redis-server: reference-counted subscriptions, relay, reconnects."""

import asyncio
import os
import signal
from functools import partial

import pytest
import redis
from redis.exceptions import ConnectionError as RedisConnectionError

from tests.procs import RedisServer, seconds
from thoughtwire.api.hub import Hub
from thoughtwire.shared.redis import RedisFactory
from thoughtwire.shared.redis.pubsub import RawLink, open_link
from thoughtwire.shared.settings import Settings


class Collector:
    def __init__(self):
        self.frames = []
        self.arrived = asyncio.Event()

    def deliver(self, frame, position, wire=None):
        self.frames.append(frame)
        self.arrived.set()

    def resync(self):
        self.resyncs = getattr(self, "resyncs", 0) + 1

    def close(self, code, reason): ...

    async def wait_for(self, count):
        async with asyncio.timeout(seconds(5)):
            while len(self.frames) < count:
                self.arrived.clear()
                await self.arrived.wait()


@pytest.fixture
async def hub_on(prefix):
    hubs = []

    async def start(server):
        factory = RedisFactory(Settings(redis_url=server.url))
        hub = Hub(partial(open_link, factory), f"{prefix}:node:test")
        await hub.start()
        hubs.append(hub)
        return hub

    yield start
    for hub in hubs:
        await hub.close()
        await hub.close()  # idempotent


def numsub(server, channel):
    with server.client() as r:
        return dict(r.pubsub_numsub(channel))[channel.encode()]


async def test_one_subscription_per_channel_however_many_viewers(redis_server, hub_on, prefix):
    hub = await hub_on(redis_server)
    channel = f"{prefix}:ch"
    one, two = Collector(), Collector()
    await hub.join(channel, one)
    await hub.join(channel, two)
    assert numsub(redis_server, channel) == 1
    with redis_server.client() as r:
        r.publish(channel, "héllo")
    await one.wait_for(1)
    await two.wait_for(1)
    assert one.frames == two.frames == ["héllo"]
    await hub.leave(channel, one)
    assert numsub(redis_server, channel) == 1
    await hub.leave(channel, two)
    await hub.leave(channel, two)  # a second leave is harmless
    with redis_server.client() as r:
        assert r.publish(channel, "nobody") == 0
    assert hub.channels() == []


async def test_leave_then_join_again_stays_subscribed(redis_server, hub_on, prefix):
    hub = await hub_on(redis_server)
    channel = f"{prefix}:flap"
    viewer = Collector()
    for _ in range(20):
        await hub.join(channel, viewer)
        await hub.leave(channel, viewer)
    await hub.join(channel, viewer)
    with redis_server.client() as r:
        assert r.publish(channel, "still here") == 1
    await viewer.wait_for(1)


async def test_the_hub_survives_a_redis_restart_and_resubscribes(logdir, hub_on, prefix, tmp_path):
    server = RedisServer(tmp_path).start()
    try:
        hub = await hub_on(server)
        viewer = Collector()
        await hub.join(f"{prefix}:live", viewer)
        server.stop()
        server.proc.popen = None
        server.start()  # same port, empty Redis
        async with asyncio.timeout(seconds(10)):
            while not (hub.healthy and numsub(server, f"{prefix}:live") == 1):
                await asyncio.sleep(0.02)
        assert hub.reconnects == 1
        with server.client() as r:
            r.publish(f"{prefix}:live", "after restart")
        await viewer.wait_for(1)
    finally:
        server.stop()


async def test_the_pubsub_link_authenticates_and_gives_up_on_a_silent_server(tmp_path):
    server = RedisServer(tmp_path).start()
    url = f"redis://:s3cret@127.0.0.1:{server.port}/0"
    try:
        with server.client() as r:
            r.config_set("requirepass", "s3cret")
        with pytest.raises(RedisConnectionError, match="authentication"):
            await RawLink.open(url.replace("s3cret", "wrong"), lambda *_: None)
        got = []
        link = await RawLink.open(url, lambda *m: got.append(m), ping_interval=0.1)
        await link.subscribe(b"ch")
        with redis.Redis(port=server.port, password="s3cret") as r:
            async with asyncio.timeout(seconds(5)):
                while not r.publish("ch", "hello"):
                    await asyncio.sleep(0.02)
        async with asyncio.timeout(seconds(5)):
            while (b"message", b"ch", b"hello") not in got:
                await asyncio.sleep(0.02)
        # A server that stops answering (paused, or a peer gone without a word) is
        # noticed by the missing pongs, not only by a reset.
        os.kill(server.proc.popen.pid, signal.SIGSTOP)
        try:
            async with asyncio.timeout(seconds(5)):
                with pytest.raises(RedisConnectionError):
                    await link.wait_closed()
        finally:
            os.kill(server.proc.popen.pid, signal.SIGCONT)
    finally:
        server.stop()
