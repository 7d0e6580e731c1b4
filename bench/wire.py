"""A minimal WebSocket client for the load processes: as little CPU per frame as possible.

The load processes share the machine's cores with the systems they measure, so every
microsecond they spend per frame is taken from the servers and shows up in every
latency. A general client (python-websockets, python-socketio) costs 30-40 µs a frame;
this one parses all the frames of one read in a loop and hands text frames to a
callback, at a few µs each. It speaks just what the benchmark needs: the opening
handshake, unfragmented text frames, ping, close. No extensions.
"""

from __future__ import annotations

import asyncio
import base64
import os
from collections.abc import Callable
from urllib.parse import urlsplit

MASK = b"\x00\x00\x00\x00"  # a client must mask; a zero mask leaves the payload as is


def encode_text(text: str) -> bytes:
    """A masked text frame, as a client sends it."""
    return _frame(0x1, text.encode())


def _frame(opcode: int, payload: bytes) -> bytes:
    n = len(payload)
    if n < 126:
        header = bytes((0x80 | opcode, 0x80 | n))
    elif n < 1 << 16:
        header = bytes((0x80 | opcode, 0x80 | 126)) + n.to_bytes(2, "big")
    else:
        header = bytes((0x80 | opcode, 0x80 | 127)) + n.to_bytes(8, "big")
    return header + MASK + payload


class WireClient(asyncio.Protocol):
    """One client connection; ``on_text(client, payload)`` gets every text frame, as bytes
    (from the first frame on, which may come with the handshake's reply)."""

    def __init__(self, on_text: Callable[[WireClient, bytes], None]) -> None:
        self.on_text = on_text
        self.transport: asyncio.Transport | None = None
        self.opened: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._buffer = b""
        self._open = False

    @classmethod
    async def connect(cls, url: str, on_text: Callable[[WireClient, bytes], None]) -> WireClient:
        parts = urlsplit(url)
        path = parts.path + (f"?{parts.query}" if parts.query else "")
        loop = asyncio.get_running_loop()
        _transport, client = await loop.create_connection(
            lambda: cls(on_text), parts.hostname, parts.port
        )
        key = base64.b64encode(os.urandom(16)).decode()
        assert client.transport is not None
        client.transport.write(
            (
                f"GET {path} HTTP/1.1\r\nHost: {parts.netloc}\r\nUpgrade: websocket\r\n"
                f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                "Sec-WebSocket-Version: 13\r\n\r\n"
            ).encode()
        )
        await client.opened
        return client

    def send_text(self, text: str) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(encode_text(text))

    def close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(_frame(0x8, (1000).to_bytes(2, "big")))
            self.transport.close()

    # --- asyncio.Protocol -------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is not a subclass

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.opened.done():
            self.opened.set_exception(exc or ConnectionError("closed during the handshake"))
        if not self.closed.done():
            self.closed.set_result(None)

    def data_received(self, data: bytes) -> None:
        buffer = self._buffer + data if self._buffer else data
        if not self._open:
            end = buffer.find(b"\r\n\r\n")
            if end < 0:
                self._buffer = buffer
                return
            status = buffer[: buffer.find(b"\r\n")]
            if b" 101 " not in status + b" ":
                self.opened.set_exception(ConnectionError(status.decode(errors="replace")))
                assert self.transport is not None
                self.transport.close()
                return
            self._open = True
            self.opened.set_result(None)
            buffer = buffer[end + 4 :]
        self._buffer = self._frames(buffer)

    def _frames(self, buffer: bytes) -> bytes:
        """Hand every whole frame in ``buffer`` on; return what is left of it."""
        i, n = 0, len(buffer)
        while n - i >= 2:
            length = buffer[i + 1] & 0x7F
            head = 2
            if length == 126:
                if n - i < 4:
                    break
                length, head = int.from_bytes(buffer[i + 2 : i + 4], "big"), 4
            elif length == 127:
                if n - i < 10:
                    break
                length, head = int.from_bytes(buffer[i + 2 : i + 10], "big"), 10
            if n - i < head + length:
                break
            opcode = buffer[i] & 0x0F
            payload = buffer[i + head : i + head + length]
            i += head + length
            if opcode == 0x1:
                self.on_text(self, payload)
            elif opcode == 0x9 and self.transport is not None:
                self.transport.write(_frame(0xA, payload))
            elif opcode == 0x8:
                self.close()
                break
        return buffer[i:]
