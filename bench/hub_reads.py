"""The hub's CPU per delivered event when one pub/sub read brings k messages of a session.

A frontend that falls behind reads several events of a session at once; the hub hands
each socket the whole run, written with one ``send`` (api/hub.py, ``Run``). This feeds
a hub the bytes of reads of k messages, in process, through the raw link's read
callback, with N viewers whose sockets are socketpairs written as the raw frame path
writes them (one ``send`` per write). It counts the process's CPU time in the read
callback only (not wall time: the machine is shared), per delivered event. It runs on
a hub that hands messages one by one too (an older tree), for a comparison.

    .venv/bin/python -m bench.hub_reads [--events 20000] [--out bench/results/hub_reads.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from websockets.protocol import State

from thoughtwire.api.connection import SocketTransport
from thoughtwire.api.hub import Hub
from thoughtwire.api.viewer import Viewer
from thoughtwire.api.wire import SCOPE_KEY
from thoughtwire.shared.redis.pubsub import PING_INTERVAL, RawLink
from thoughtwire.shared.redis.resp import pack_command, unpack

SHAPES = ((1, 1), (1, 3), (100, 1), (100, 3), (1000, 1), (1000, 4))  # (viewers, k)
EVENTS_PER_VIEWER = 20_000  # fewer reads with more viewers, the same work in each shape
DRAIN_EVERY = 20  # reads between two drains of the sockets' other ends


def event(seq: int) -> bytes:
    """A delta as the log script publishes it: the position last."""
    fields = {"type": "answer", "content": "tok ", "session": "s", "run": "r", "block": "b"}
    event = {**fields, "delta": True, "seq": seq, "epoch": "e1"}
    return json.dumps(event, separators=(",", ":")).encode()


class Redis:
    """The Redis end of the link, in memory: confirms each SUBSCRIBE at once."""

    def __init__(self) -> None:
        self.link: RawLink | None = None

    async def open_link(self, on_message: Any, on_run: Any = None) -> RawLink:
        """The hub's link, connected to this (a hub without runs gives no ``on_run``)."""
        link = (
            RawLink(on_message, PING_INTERVAL, on_run)
            if on_run
            else RawLink(on_message, PING_INTERVAL)
        )
        self.link = link
        self.link.connection_made(self)  # type: ignore[arg-type]
        return self.link

    def write(self, data: bytes) -> None:
        """What the link sends: a SUBSCRIBE is confirmed."""
        assert self.link is not None
        for command in unpack(data):
            if command[0] == b"SUBSCRIBE":
                for channel in command[1:]:
                    self.link.data_received(pack_command(b"subscribe", channel, b"1"))

    def is_closing(self) -> bool:
        """Never: the link lives for the measure."""
        return False

    def close(self) -> None:
        """The hub closes its link: the connection is lost."""
        assert self.link is not None
        asyncio.get_running_loop().call_soon(self.link.connection_lost, None)


def socket_transport(sock: socket.socket) -> SocketTransport:
    """A WebSocket transport whose raw frame writes are ``send`` calls on ``sock``."""
    protocol = SimpleNamespace(
        close_sent=False,
        writable=SimpleNamespace(is_set=lambda: True),
        conn=SimpleNamespace(extensions=[], state=State.OPEN),
        transport=SimpleNamespace(write=sock.send, is_closing=lambda: False),
    )
    return SocketTransport(SimpleNamespace(scope={SCOPE_KEY: protocol}))  # type: ignore[arg-type]


def drain(pairs: list[tuple[socket.socket, socket.socket]]) -> None:
    """Read what waits at the clients' ends, so no send blocks."""
    for _, client in pairs:
        try:
            while client.recv(1 << 20):  # bounded by what was sent
                pass
        except BlockingIOError:
            pass


async def measure(viewers: int, k: int, events: int) -> float:
    """CPU µs per delivered event, for ``viewers`` sockets and reads of ``k`` messages."""
    redis = Redis()
    hub = Hub(redis.open_link, "home")
    await hub.start()
    pairs = [socket.socketpair() for _ in range(viewers)]
    try:
        for server, client in pairs:
            server.setblocking(False)
            client.setblocking(False)
            viewer = Viewer(None, hub, socket_transport(server), queue_size=100)  # type: ignore[arg-type]
            await hub.join("ch", viewer)
        assert redis.link is not None
        redis.link.data_received(pack_command(b"message", b"ch", event(1)))  # the position
        seq, busy = 2, 0.0
        reads = max(events // k // max(viewers // 10, 1), DRAIN_EVERY)
        for read in range(reads):
            data = b"".join(pack_command(b"message", b"ch", event(seq + i)) for i in range(k))
            seq += k
            start = time.process_time()
            redis.link.data_received(data)
            busy += time.process_time() - start
            if read % DRAIN_EVERY == DRAIN_EVERY - 1:
                drain(pairs)
        return busy / (reads * k * viewers) * 1e6
    finally:
        for server, client in pairs:
            server.close()
            client.close()
        await hub.close()


def main() -> None:
    """Measure every shape, print and write the figures."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=None)
    parser.add_argument("--events", type=int, default=EVENTS_PER_VIEWER)
    args = parser.parse_args()
    results = []
    for viewers, k in SHAPES:
        us = asyncio.run(measure(viewers, k, args.events))
        print(f"{viewers:>5} viewers, {k} messages a read: {us:.2f} µs per delivered event")
        results.append({"viewers": viewers, "messages_per_read": k, "cpu_us_per_event": us})
    if args.out:
        Path(args.out).write_text(json.dumps({"results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
