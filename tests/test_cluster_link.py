"""The cluster link's bookkeeping and the pub/sub connection's opening, on fakes: no server.

What a master's connection leaves behind when it is cut (SUNSUBSCRIBEs never confirmed),
what a master that keeps cutting it costs (a backoff), and what a probe round meets when
its channel's slot moves under it.
"""

import asyncio
from types import SimpleNamespace

import pytest
from redis.exceptions import ConnectionError as RedisConnectionError

from tests.procs import seconds
from thoughtwire.shared.redis import pubsub
from thoughtwire.shared.redis.cluster import CUT_WINDOW, ClusterLink
from thoughtwire.shared.redis.pubsub import RawLink


class FakeConnection:
    """A master's (or the global channels') connection: it records what it is sent."""

    def __init__(self, *, fail: bool = False) -> None:
        self.sent: list[tuple[str, tuple[bytes, ...]]] = []
        self.fail = fail
        self.closed = False

    async def subscribe(self, *channels: bytes) -> None:
        self.sent.append(("subscribe", channels))

    async def unsubscribe(self, *channels: bytes) -> None:
        if self.fail:
            raise RedisConnectionError("connection lost")
        self.sent.append(("unsubscribe", channels))

    async def close(self) -> None:
        self.closed = True


class FakeClient:
    """The commands client: every key is served by ``owner``; ``on_publish`` is run at
    each SPUBLISH (as if a message or confirmation came meanwhile)."""

    def __init__(self, owner: str, masters: list[str]) -> None:
        self.owner = owner
        self.nodes_manager = SimpleNamespace(slots_cache={0: [SimpleNamespace(name=owner)]})
        self.masters = masters
        self.on_publish = lambda channel: None

    def keyslot(self, channel: bytes) -> int:
        return 0

    def get_node_from_key(self, channel: str) -> SimpleNamespace:
        return SimpleNamespace(name=self.owner)

    async def spublish(self, channel: bytes, token: bytes) -> None:
        self.on_publish(channel)

    async def aclose(self) -> None:
        pass


async def a_link(owner: str = "a:1") -> tuple[ClusterLink, list[tuple[bytes, bytes]]]:
    heard: list[tuple[bytes, bytes]] = []
    link = ClusterLink(FakeClient(owner, [owner]), lambda k, c, d: heard.append((k, c)), None)  # type: ignore[arg-type]
    link._global = FakeConnection()  # type: ignore[assignment]
    return link, heard


async def test_a_cut_master_leaves_no_unsubscribe_pending_so_a_later_move_is_followed():
    link, heard = await a_link()
    a = FakeConnection()
    link._shards["a:1"] = a  # type: ignore[assignment]
    channel = b"s:{x}:events"
    link._wanted.add(channel)
    link._where[channel] = "a:1"
    await link.unsubscribe(channel)
    assert a.sent == [("unsubscribe", (channel,))]
    assert link._leaving == {channel: ["a:1"]}
    # Master a:1's connection is cut before it confirms: that SUNSUBSCRIBE is void.
    link._forget_leaving("a:1")
    assert not link._leaving
    # Followed again, on b:2, whose slot then moves: the master lets the channel go.
    moved: list[bytes] = []
    link._relocate = moved.extend  # type: ignore[method-assign]
    link._wanted.add(channel)
    link._where[channel] = "b:2"
    link._on_shard(b"sunsubscribe", channel, None)
    assert moved == [channel]  # subscribed again where its slot is now, not taken as ours
    assert (b"unsubscribe", channel) not in heard
    await link.close()


async def test_an_unsubscribe_that_could_not_be_sent_awaits_no_confirmation():
    link, _ = await a_link()
    link._shards["a:1"] = FakeConnection(fail=True)  # type: ignore[assignment]
    channel = b"s:{x}:events"
    link._wanted.add(channel)
    link._where[channel] = "a:1"
    with pytest.raises(RedisConnectionError):
        await link.unsubscribe(channel)
    assert not link._leaving
    link._where[channel] = "a:1"
    await link._drop(channel)  # a late confirmation's drop, on the same lost connection
    assert not link._leaving
    await link.close()


async def test_a_master_that_keeps_cutting_its_connection_is_backed_off():
    link, _ = await a_link()
    assert link._backoff_after_cut("a:1") == 0.0  # the first cut: at once
    pauses = [link._backoff_after_cut("a:1") for _ in range(8)]
    assert all(p > 0 for p in pauses)
    assert pauses[-1] > pauses[0]
    assert link._backoff_after_cut("b:2") == 0.0  # another master's is its own
    now, backoff = link._cuts["a:1"]
    link._cuts["a:1"] = (now - CUT_WINDOW - 1, backoff)  # quiet for a while
    assert link._backoff_after_cut("a:1") == 0.0
    await link.close()


async def test_a_probe_channel_let_go_during_a_probe_round_ends_the_round_quietly():
    link, _ = await a_link()
    link._shards["a:1"] = FakeConnection()  # type: ignore[assignment]
    asked: list[str] = []

    def channel_of(tag: str) -> str:
        asked.append(tag)
        return f"probe:{{{tag}}}"

    assert await link.probe_shards(b"probe 1", 0.05, channel_of) == 0  # subscribes it
    client: FakeClient = link._client  # type: ignore[assignment]
    # Its slot moves while the probe is published: the master lets the channel go.
    client.on_publish = lambda channel: link._on_shard(b"sunsubscribe", channel, None)
    assert await link.probe_shards(b"probe 2", 0.05, channel_of) == 0
    assert asked == ["0"]  # the tag found once is kept while its slot is that master's
    await link.close()


async def test_a_master_without_slots_is_not_searched_for_a_probe_channel():
    link, _ = await a_link()
    link._shards["b:2"] = FakeConnection()  # type: ignore[assignment]
    asked: list[str] = []
    await link.probe_shards(b"probe 1", 0.05, lambda tag: asked.append(tag) or tag)  # type: ignore[func-returns-value]
    assert asked == []
    await link.close()


async def test_a_connection_whose_auth_is_not_answered_is_closed(monkeypatch):
    """AUTH that times out leaves no connection open behind it."""
    ended = asyncio.Event()

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        async with asyncio.timeout(seconds(10)):
            while await reader.read(4096):  # bounded: until the peer closes
                pass
        ended.set()
        writer.close()

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    monkeypatch.setattr(pubsub, "CONNECT_TIMEOUT", 0.2)
    try:
        with pytest.raises(TimeoutError):
            await RawLink.open(f"redis://:secret@127.0.0.1:{port}/0", lambda *_: None)
        async with asyncio.timeout(seconds(5)):
            await ended.wait()
    finally:
        server.close()
        await server.wait_closed()
