"""The hub against a real redis-server: reference-counted subscriptions, relay, reconnects;
and, on a link fed by hand, what one read of several messages of a channel becomes."""

import asyncio
import json
import os
import signal
import time
from functools import partial
from types import SimpleNamespace

import pytest
import redis
from redis.exceptions import ConnectionError as RedisConnectionError
from websockets.protocol import State

from tests.procs import RedisServer, seconds
from thoughtwire.api.connection import SocketTransport
from thoughtwire.api.hub import Hub, Run
from thoughtwire.api.viewer import Viewer
from thoughtwire.api.wire import SCOPE_KEY, text_frame
from thoughtwire.shared.bus import Meta
from thoughtwire.shared.redis import RedisFactory
from thoughtwire.shared.redis.pubsub import PING_INTERVAL, RawLink, open_link
from thoughtwire.shared.redis.resp import pack_command, unpack
from thoughtwire.shared.settings import Settings
from thoughtwire.shared.vocab import ViewScope


class Collector:
    def __init__(self):
        self.frames = []
        self.arrived = asyncio.Event()

    def deliver(self, frame, position, wire=None):
        self.frames.append(frame)
        self.arrived.set()

    def deliver_run(self, run):
        for frame in run.frames:
            self.deliver(frame, None)

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


# --- one read, several messages -------------------------------------------------


class FakeRedis:
    """The Redis end of a raw pub/sub link, in memory: it confirms every SUBSCRIBE, and
    ``read`` hands the link messages as the bytes of one read."""

    def __init__(self):
        self.link = None
        self.closed = False

    async def open_link(self, on_message, on_run):
        self.link = RawLink(on_message, PING_INTERVAL, on_run)
        self.link.connection_made(self)
        return self.link

    def read(self, *messages):
        self.link.data_received(b"".join(pack_command(b"message", c, d) for c, d in messages))

    # the asyncio transport the link writes to
    def write(self, data):
        for command in unpack(data):
            if command[0] == b"SUBSCRIBE":
                confirm = b"".join(pack_command(b"subscribe", c, b"1") for c in command[1:])
                asyncio.get_running_loop().call_soon(self.link.data_received, confirm)

    def is_closing(self):
        return self.closed

    def close(self):
        if not self.closed:
            self.closed = True
            asyncio.get_running_loop().call_soon(self.link.connection_lost, None)

    abort = close


@pytest.fixture
async def fake_hub():
    redis = FakeRedis()
    hub = Hub(redis.open_link, "home")
    await hub.start()
    yield hub, redis
    await hub.close()


def delta(seq, content="x", type_="answer"):
    fields = {"type": type_, "session": "s", "run": "r", "block": "b1", "delta": True}
    event = {**fields, "content": content, "seq": seq, "epoch": "e1"}
    return json.dumps(event, separators=(",", ":")).encode()


class Sink:
    """A transport that records each call that took frames, or pushes back until opened."""

    def __init__(self, *, pushing_back=False):
        self.pushing_back = pushing_back
        self.writes = []  # the wire bytes of each write or write_run, one entry per call
        self.sent = []
        self.open = asyncio.Event()
        self.arrived = asyncio.Event()

    def write(self, frame, wire):
        if self.pushing_back:
            return False
        self.writes.append(wire)
        return True

    def write_run(self, frames, wire):
        return self.write(None, wire)

    async def send(self, frame):
        await self.open.wait()
        self.sent.append(frame)
        self.arrived.set()
        return True

    def close(self, code, reason): ...


class RawProtocol:
    """What a SocketTransport's raw writer needs of uvicorn's protocol; counts writes."""

    def __init__(self):
        self.writes = []
        self.close_sent = False
        self.writable = asyncio.Event()
        self.writable.set()
        self.conn = SimpleNamespace(extensions=[], state=State.OPEN)
        self.transport = SimpleNamespace(write=self.writes.append, is_closing=lambda: False)


async def test_the_link_hands_on_consecutive_messages_of_a_channel_together():
    """Order across channels is exactly Redis's: only messages in a row are one run."""
    got = []
    link = RawLink(lambda *m: got.append(m), PING_INTERVAL, lambda c, d: got.append((c, d)))
    link.data_received(
        b"".join(pack_command(b"message", c, d) for c, d in [(b"a", b"1"), (b"a", b"2")])
        + pack_command(b"subscribe", b"c", b"1")
        + b"".join(pack_command(b"message", c, d) for c, d in [(b"b", b"3"), (b"a", b"4")])
    )
    assert got == [
        (b"a", [b"1", b"2"]),
        (b"subscribe", b"c", None),
        (b"message", b"b", b"3"),
        (b"message", b"a", b"4"),
    ]
    alone = []  # without a run callback, each message goes alone
    link = RawLink(lambda *m: alone.append(m), PING_INTERVAL)
    link.data_received(pack_command(b"message", b"a", b"1") + pack_command(b"message", b"a", b"2"))
    assert alone == [(b"message", b"a", b"1"), (b"message", b"a", b"2")]


def test_a_run_knows_whether_its_events_follow_each_other():
    run = Run([delta(2), delta(3), delta(4)])
    assert (run.epoch, run.first, run.last) == ("e1", 2, 4)
    assert run.wire == b"".join(text_frame(delta(s)) for s in (2, 3, 4))
    assert Run([delta(2), delta(4)]).epoch is None  # a hole
    assert Run([delta(2), b'{"type":"pong"}']).epoch is None  # not only events


async def test_a_read_of_three_messages_reaches_a_direct_socket_in_one_write(fake_hub):
    hub, redis = fake_hub
    protocol = RawProtocol()
    transport = SocketTransport(SimpleNamespace(scope={SCOPE_KEY: protocol}))
    viewer = Viewer(None, hub, transport, queue_size=8)
    await hub.join("ch", viewer)
    redis.read((b"ch", delta(1)))  # a lone message: one write, as ever
    redis.read((b"ch", delta(2)), (b"ch", delta(3)), (b"ch", delta(4)))
    frames = [text_frame(delta(seq)) for seq in (1, 2, 3, 4)]
    assert protocol.writes == [frames[0], b"".join(frames[1:])]
    assert transport.sent == 4 and viewer.position.seq == 4
    assert viewer._queue is None and viewer._writer is None
    await hub.leave("ch", viewer)


async def test_a_run_that_overlaps_what_was_sent_goes_frame_by_frame(fake_hub):
    hub, redis = fake_hub
    sink = Sink()
    viewer = Viewer(None, hub, sink, queue_size=8)
    await hub.join("ch", viewer)
    redis.read(*[(b"ch", delta(seq)) for seq in (1, 2, 3)])  # the first: seq 1 of no epoch yet
    redis.read(*[(b"ch", delta(seq)) for seq in (2, 3, 4, 5)])  # 2 and 3 again
    assert sink.writes == [text_frame(delta(seq)) for seq in (1, 2, 3, 4, 5)]
    await hub.leave("ch", viewer)


async def test_a_viewer_with_a_backlog_takes_a_run_through_its_queue(fake_hub):
    hub, redis = fake_hub
    sink = Sink(pushing_back=True)
    viewer = Viewer(None, hub, sink, queue_size=8)
    await hub.join("ch", viewer)
    redis.read((b"ch", delta(1)))  # pushed back: queued, and the writer waits on the send
    sink.pushing_back = False
    redis.read(*[(b"ch", delta(seq)) for seq in (2, 3, 4)])
    assert sink.writes == []  # not written past the frame that waits
    sink.open.set()
    async with asyncio.timeout(seconds(5)):
        while len(sink.sent) < 4:
            sink.arrived.clear()
            await sink.arrived.wait()
    assert sink.sent == [delta(seq).decode() for seq in (1, 2, 3, 4)]
    await hub.leave("ch", viewer)


async def test_scoped_viewers_get_their_projection_of_each_message_of_a_run(fake_hub):
    hub, redis = fake_hub
    full, answer = Sink(), Sink()
    viewers = [Viewer(None, hub, full, queue_size=8), Viewer(None, hub, answer, queue_size=8)]
    await hub.join("ch", viewers[0])
    await hub.join("ch", viewers[1], ViewScope.ANSWER)
    kinds = ["answer", "thinking", "answer"]
    redis.read(*[(b"ch", delta(seq, type_=kind)) for seq, kind in enumerate(kinds, 1)])
    assert full.writes == [text_frame(delta(seq, type_=k)) for seq, k in enumerate(kinds, 1)]
    assert [json.loads(w[2:])["seq"] for w in answer.writes] == [1, 3]  # no reasoning
    assert viewers[1].position.seq == 3
    for viewer in viewers:
        await hub.leave("ch", viewer)


async def test_a_probe_round_that_fails_is_logged_and_probing_goes_on(caplog):
    """An unexpected error in one round neither ends the prober nor makes close() raise."""
    redis = FakeRedis()
    published = []

    async def publish(channel, token):
        published.append(token)
        raise KeyError(channel)  # not a Redis error: the round fails

    hub = Hub(redis.open_link, "home", publish=publish, probe_interval=0.01)
    await hub.start()
    try:
        async with asyncio.timeout(seconds(5)):
            while len(published) < 3:
                await asyncio.sleep(0.01)
        assert "pub/sub probe 1 failed (KeyError)" in caplog.text
    finally:
        await hub.close()


async def test_a_probe_heard_while_the_loop_stalled_past_its_deadline_counts_as_heard():
    """A loop blocked past the probe's deadline ran the reply's callback and the timeout
    in one turn, and the wait was cancelled with the reply in hand: a busy frontend took a
    link that was fine for deaf, and every viewer on it caught up for nothing."""
    redis = FakeRedis()
    hub: Hub

    async def publish(channel, token):
        loop = asyncio.get_running_loop()
        loop.call_later(0.01, time.sleep, 0.2)  # the loop stalls, the deadline passes
        loop.call_later(0.02, hub._heard, token)  # the reply was read meanwhile

    hub = Hub(redis.open_link, "home", publish=publish, probe_interval=0.05)
    assert await hub.probe(1)


async def test_close_goes_on_past_a_background_task_that_failed():
    redis = FakeRedis()
    hub = Hub(redis.open_link, "home")
    await hub.start()

    async def fail():
        raise KeyError("gone")

    hub._prober = asyncio.create_task(fail())
    await asyncio.sleep(0)
    await hub.close()
    assert redis.closed
    await hub.close()  # idempotent


async def test_a_join_greets_only_once_this_frontend_is_subscribed():
    """The greeting went out before the subscription was made: a client that prompted
    through another frontend on it could have its run's first event published before
    this frontend listened, and a viewer that joined "from now on" never got it."""
    subscribed = asyncio.Event()

    class SlowHub:
        async def join(self, channel, viewer, scope):
            await subscribed.wait()

    sink = Sink()

    async def meta(session):
        return Meta(None, 0)

    bus = SimpleNamespace(session_channel=lambda session: f"ch:{session}", meta=meta)
    viewer = Viewer(bus, SlowHub(), sink, queue_size=8)
    following = asyncio.create_task(viewer.follow("S", greeting='{"type":"session"}'))
    await asyncio.sleep(0)
    assert sink.writes == [], "greeted before it listens"
    subscribed.set()
    async with asyncio.timeout(seconds(5)):
        await following
    assert len(sink.writes) == 1
    viewer._stop_recovery()
