"""A minimal WebSocket client for the load processes: as little CPU per frame as possible.

The load processes share the machine's cores with the systems they measure, so every
microsecond they spend per frame is taken from the servers and shows up in every
latency. A general client (python-websockets, python-socketio) costs 30-40 µs a frame;
this one parses all the frames of one read in a loop and hands text frames to a
callback, at a few µs each. It speaks just what the benchmark needs: the opening
handshake, unfragmented text frames, ping, close. No extensions.

It reads its socket itself, with ``recvmsg``, to get the kernel's receive stamp
(``SO_TIMESTAMPNS``): :attr:`WireClient.received_at` is when the bytes of the current
read reached this machine's socket, not when this busy process got round to them. On
loopback the stamp is taken as the sender's ``send`` hands the bytes over. With many
sockets per load process, the last one read in a busy loop would otherwise be charged
the time spent on all the others.
"""

from __future__ import annotations

import asyncio
import base64
import os
import socket
import struct
import time
from collections.abc import Callable
from urllib.parse import urlsplit

MASK = b"\x00\x00\x00\x00"  # a client must mask; a zero mask leaves the payload as is
SO_TIMESTAMPNS = getattr(socket, "SO_TIMESTAMPNS", 35)  # Linux's value
STAMP = struct.Struct("qq")  # struct timespec
READ_SIZE = 256 * 1024


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


class WireClient:
    """One client connection; ``on_text(client, payload)`` gets every text frame, as bytes
    (from the first frame on, which may come with the handshake's reply)."""

    def __init__(self, sock: socket.socket, on_text: Callable[[WireClient, bytes], None]) -> None:
        self.on_text = on_text
        self.received_at = 0.0  # Unix ms: when the frames being handed on reached the socket
        self.opened: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._sock: socket.socket | None = sock
        self._loop = asyncio.get_running_loop()
        self._ancillary = socket.CMSG_SPACE(STAMP.size)
        self._buffer = b""
        self._unsent = b""  # what the kernel would not take yet
        self._open = False

    @classmethod
    async def connect(
        cls,
        url: str,
        on_text: Callable[[WireClient, bytes], None],
        rcvbuf: int = 0,
        mss: int = 0,
    ) -> WireClient:
        """Open a WebSocket to ``url``; ``rcvbuf`` > 0 caps the kernel's receive buffer
        (set before connecting, so the window offered to the server is small from the
        start, as on a slow link). ``mss`` > 0 caps the segment size the server may
        send: on loopback (a 64 KiB MTU) the server's send buffer starts at about 1 MiB,
        sized from ten segments, and would take a long pause whole; at an Ethernet
        segment size it starts at tens of KiB, as towards a phone."""
        parts = urlsplit(url)
        path = parts.path + (f"?{parts.query}" if parts.query else "")
        loop = asyncio.get_running_loop()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        if rcvbuf > 0:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        if mss > 0:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG, mss)
        try:
            await loop.sock_connect(sock, (parts.hostname or "127.0.0.1", parts.port or 80))
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
        except BaseException:
            sock.close()
            raise
        client = cls(sock, on_text)
        loop.add_reader(sock.fileno(), client._readable)
        key = base64.b64encode(os.urandom(16)).decode()
        client._write(
            (
                f"GET {path} HTTP/1.1\r\nHost: {parts.netloc}\r\nUpgrade: websocket\r\n"
                f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                "Sec-WebSocket-Version: 13\r\n\r\n"
            ).encode()
        )
        await client.opened
        return client

    def send_text(self, text: str) -> None:
        self._write(encode_text(text))

    def close(self) -> None:
        if self._sock is not None:
            self._write(_frame(0x8, (1000).to_bytes(2, "big")))
            self._lost(None)

    # --- the socket -------------------------------------------------------------

    def _write(self, data: bytes) -> None:
        if self._sock is None:
            return
        if self._unsent:
            self._unsent += data
            return
        try:
            sent = self._sock.send(data)
        except BlockingIOError:
            sent = 0
        except OSError as exc:
            self._lost(exc)
            return
        if sent < len(data):
            self._unsent = data[sent:]
            self._loop.add_writer(self._sock.fileno(), self._writable)

    def _writable(self) -> None:
        assert self._sock is not None
        try:
            sent = self._sock.send(self._unsent)
        except BlockingIOError:
            return
        except OSError as exc:
            self._lost(exc)
            return
        self._unsent = self._unsent[sent:]
        if not self._unsent:
            self._loop.remove_writer(self._sock.fileno())

    def _readable(self) -> None:
        assert self._sock is not None
        try:
            data, ancillary, _flags, _address = self._sock.recvmsg(READ_SIZE, self._ancillary)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._lost(exc)
            return
        if not data:
            self._lost(None)
            return
        for level, kind, stamp in ancillary:
            if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS:
                seconds, nanoseconds = STAMP.unpack(stamp)
                self.received_at = seconds * 1e3 + nanoseconds / 1e6
                break
        else:  # the kernel had no stamp for this read
            self.received_at = time.time() * 1e3
        self._received(data)

    def _lost(self, exc: Exception | None) -> None:
        sock, self._sock = self._sock, None
        if sock is None:
            return
        self._loop.remove_reader(sock.fileno())
        if self._unsent:
            self._loop.remove_writer(sock.fileno())
        sock.close()
        if not self.opened.done():
            self.opened.set_exception(exc or ConnectionError("closed during the handshake"))
        if not self.closed.done():
            self.closed.set_result(None)

    # --- the protocol -----------------------------------------------------------

    def _received(self, data: bytes) -> None:
        buffer = self._buffer + data if self._buffer else data
        if not self._open:
            end = buffer.find(b"\r\n\r\n")
            if end < 0:
                self._buffer = buffer
                return
            status = buffer[: buffer.find(b"\r\n")]
            if b" 101 " not in status + b" ":
                self._lost(ConnectionError(status.decode(errors="replace")))
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
            elif opcode == 0x9:
                self._write(_frame(0xA, payload))
            elif opcode == 0x8:
                self.close()
                break
        return buffer[i:]
