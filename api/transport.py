"""A transport: where a viewer's ready frames go, one client's socket or stream.

Data flows one way: hub → viewer → transport. A viewer (:mod:`thoughtwire.api.viewer`) owns the
client's position, its recovery from the log and the slow-client policy (a bounded
queue, 4008 when it is full); it hands each frame, in order, to its transport. Like
centrifuge's ``Transport``, this contract has no read method: a transport gives
nothing back to its viewer but whether it took a frame, and never reads a viewer's
queue.

Implementations: :class:`thoughtwire.api.connection.SocketTransport` (a WebSocket) and
:class:`thoughtwire.api.sse.EventStream` (server-sent events).

A third transport is one file with one class that has these four methods:

* ``write(frame, wire)``: take the frame now, without waiting, or return False;
* ``write_run(frames, wire)``: the same for several frames at once, all or none;
* ``send(frame)``: take the frame, waiting while the client is behind; False once the
  transport has ended (the client left, or a send failed);
* ``close(code, reason)``: end now, with that close code (what waits is the viewer's
  to drop; a transport holds one frame at most).

Its endpoint makes a ``Viewer(bus, hub, transport, queue_size=...)``, calls
``viewer.follow(...)``, and ``await viewer.detach()`` once the transport has ended.
"""

from __future__ import annotations

from typing import Protocol


class Transport(Protocol):
    """A sink for one client's frames; the viewer is its only writer.

    Guarantee: frames reach the client in the order the viewer hands them over, none
    twice. The viewer calls ``write`` only when nothing of its own is waiting or being
    sent, and never calls ``write`` or ``send`` while a ``send`` is in progress, so a
    transport keeps no queue: backpressure is ``write`` returning False, after which
    the viewer queues (bounded) and offers each frame to ``send`` in turn. Once
    ``close`` has been called, or ``send`` returned False, the viewer hands over
    nothing more.
    """

    def write(self, frame: str, wire: bytes | None) -> bool:
        """Take ``frame`` at once, or return False (nothing taken) when pushing back.

        ``wire`` is the frame ready-made as WebSocket bytes (:mod:`thoughtwire.api.wire`), when the
        hub made it: a transport that writes exactly those bytes may use them. Must
        not block, and must not call back into the viewer.
        """
        ...

    def write_run(self, frames: list[str], wire: bytes) -> bool:
        """Take all of ``frames`` at once, in order, or return False (none taken).

        ``wire`` is the frames ready-made as WebSocket bytes, joined. Must not block,
        and must not call back into the viewer. A transport that cannot take several
        frames in one go returns False: the viewer then hands them over one by one.
        """
        ...

    async def send(self, frame: str) -> bool:
        """Take ``frame``, waiting while the client is behind; False once ended.

        A failure is the transport's own to report and end on; the viewer only stops.
        """
        ...

    def close(self, code: int, reason: str) -> None:
        """End now with ``code`` (a :class:`thoughtwire.shared.closecodes.Close`); idempotent."""
        ...
