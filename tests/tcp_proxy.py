"""A TCP proxy for tests, in a thread of its own: switch where it forwards, or go silent.

Processes under test reach Redis through it. :meth:`TcpProxy.switch` points it at
another server and drops every connection, as a failover does (clients reconnect and
land on the new master). :meth:`TcpProxy.silence_subscribers` stops forwarding what
the server sends on every pub/sub connection open at that moment, while the sockets
stay open both ways: the client's link looks connected, its pings go out, and nothing
comes back, not even the messages it is subscribed to. Connections opened after it
are forwarded as usual.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from dataclasses import dataclass, field

CHUNK = 65536
SUBSCRIBE = b"\r\nSUBSCRIBE\r\n"  # as RESP carries the command's name


@dataclass(eq=False)
class _Pipe:
    client: asyncio.StreamWriter
    server: asyncio.StreamWriter | None = None
    subscriber: bool = False  # it sent a SUBSCRIBE: a pub/sub connection
    silent: bool = False  # what the server sends is dropped
    tasks: list[asyncio.Task[None]] = field(default_factory=list)

    def close(self) -> None:
        for writer in (self.client, self.server):
            if writer is not None:
                writer.close()


class TcpProxy:
    """Forwards loopback connections on :attr:`port` to a Redis at ``target`` (a port)."""

    def __init__(self, target: int) -> None:
        self.target = target
        self.port = 0
        self._pipes: set[_Pipe] = set()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server: asyncio.Server | None = None

    def start(self) -> TcpProxy:
        """Listen on a free port; returns once it does."""
        self._thread.start()
        self._call(self._listen())
        return self

    @property
    def url(self) -> str:
        """The Redis URL that reaches the proxied server."""
        return f"redis://127.0.0.1:{self.port}/0"

    def switch(self, target: int) -> None:
        """Forward new connections to ``target``, and drop every open one."""
        self._call(self._switch(target))

    def silence_subscribers(self) -> int:
        """Drop what the server sends on every open pub/sub connection; returns how many."""
        return int(self._call(self._silence()))

    def stop(self) -> None:
        """Drop every connection and stop listening; idempotent."""
        if self._thread.is_alive():
            self._call(self._stop())
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
            self._loop.close()

    def _call(self, coro):  # type: ignore[no-untyped-def]
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(10)

    async def _listen(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _switch(self, target: int) -> None:
        self.target = target
        for pipe in list(self._pipes):
            pipe.close()

    async def _silence(self) -> int:
        silenced = [pipe for pipe in self._pipes if pipe.subscriber]
        for pipe in silenced:
            pipe.silent = True
        return len(silenced)

    async def _stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for pipe in list(self._pipes):
            pipe.close()
            for task in pipe.tasks:
                task.cancel()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        pipe = _Pipe(writer)
        self._pipes.add(pipe)
        try:
            upstream, pipe.server = await asyncio.open_connection("127.0.0.1", self.target)
        except OSError:
            writer.close()
            self._pipes.discard(pipe)
            return
        pipe.tasks = [
            asyncio.create_task(self._copy(reader, pipe.server, pipe, upward=True)),
            asyncio.create_task(self._copy(upstream, writer, pipe, upward=False)),
        ]
        try:
            await asyncio.wait(pipe.tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            pipe.close()
            for task in pipe.tasks:
                task.cancel()
            self._pipes.discard(pipe)

    @staticmethod
    async def _copy(
        source: asyncio.StreamReader, sink: asyncio.StreamWriter, pipe: _Pipe, *, upward: bool
    ) -> None:
        with contextlib.suppress(OSError, asyncio.IncompleteReadError):
            while data := await source.read(CHUNK):
                if upward and SUBSCRIBE in data.upper():
                    pipe.subscriber = True
                if not upward and pipe.silent:
                    continue  # read and dropped: the socket stays open, nothing arrives
                sink.write(data)
                await sink.drain()
