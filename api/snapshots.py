"""A frontend's snapshot reads, shared by the viewers joining one session together.

A join storm (a link shared to a crowd, a frontend restarted) must cost one snapshot
read per frontend, not one per socket. So a read is single-flight per session: joins
that arrive while it is under way wait for it, and joins within
:data:`REUSE_SECONDS` of it take its result too (unless it found no events: a session
just made has some a moment later). Later joins take it while the log still ends at its
seq (a meta read tells): a finished session is read once, however many join it. An older snapshot is still right:
each viewer goes on from its seq with the log (:mod:`thoughtwire.api.recovery`), which
holds far more than a few seconds of events. A newer one is not, for a join: it would
fold in events made after the client was greeted (its own prompt's, say), which are to
come to it as events. So a read stops where the join that started it was greeted; the
joins greeted after it take it, and one greeted before it reads its own.
"""

from __future__ import annotations

import asyncio
import time
import weakref

from thoughtwire.shared.bus import Bus
from thoughtwire.shared.snapshots import Snapshot, current

REUSE_SECONDS = 2.0  # how long a snapshot read serves the joins that come after it
KEPT = 128  # sessions whose last read is remembered, at most (a snapshot can be ~100 KB)


class SnapshotReader:
    """Single-flight snapshot reads per session, for one frontend."""

    def __init__(self, bus: Bus) -> None:
        self.bus = bus
        self.reads = 0  # snapshot reads made, for tests and operators
        self._flights: dict[str, tuple[float, asyncio.Future[Snapshot | None]]] = {}

    async def get(self, session: str, upto: int | None = None) -> Snapshot | None:
        """The session's state at the end of its log, or None; see the module. With
        ``upto``, a state at that seq or before it: a shared read past it is not taken."""
        shared = await self._shared(session, upto)
        if shared is None or upto is None or shared.seq <= upto:
            return shared
        self.reads += 1  # a join's bound: the events after it are to come as events
        return await current(self.bus, session, upto)

    async def _shared(self, session: str, upto: int | None) -> Snapshot | None:
        """A read other joins may take too; a new one is bounded by ``upto``, so that the
        joins of a storm on a live session, each greeted after the first, take it."""
        now = time.monotonic()
        flight = self._flights.get(session)
        if flight is not None and not _spent(flight[1]):
            started, future = flight
            if now - started <= REUSE_SECONDS or not future.done():
                # shield: one viewer leaving must not cancel the read the others wait for.
                return await asyncio.shield(future)
            last = future.result()
            if last is not None and await self._unchanged(session, last):
                return last  # a quiet session: its last read is still its state
            newer = self._flights.get(session)
            if newer is not None and newer is not flight and not _spent(newer[1]):
                return await asyncio.shield(newer[1])  # another join started the read meanwhile
        flight = (now, asyncio.ensure_future(self._read(session, upto)))
        self._forget_old(now)
        self._flights[session] = flight
        return await asyncio.shield(flight[1])

    async def _unchanged(self, session: str, snapshot: Snapshot) -> bool:
        """Whether the log still ends where ``snapshot`` does (a meta read, no snapshot read)."""
        meta = await self.bus.meta(session)
        return (meta.epoch, meta.last_seq) == (snapshot.epoch, snapshot.seq)

    async def _read(self, session: str, upto: int | None) -> Snapshot | None:
        self.reads += 1
        return await current(self.bus, session, upto)

    def _forget_old(self, now: float) -> None:
        """Drop reads past their reuse, so the map stays bounded."""
        if len(self._flights) < KEPT:
            return
        for session, (started, future) in list(self._flights.items()):
            if future.done() and now - started > REUSE_SECONDS:
                del self._flights[session]
        while len(self._flights) >= KEPT:  # all still fresh: the oldest goes
            del self._flights[next(iter(self._flights))]


def _spent(future: asyncio.Future[Snapshot | None]) -> bool:
    """A read not to reuse: it failed, or found no events (a new session soon has some)."""
    if not future.done():
        return False
    return future.cancelled() or future.exception() is not None or future.result() is None


_readers: weakref.WeakKeyDictionary[Bus, SnapshotReader] = weakref.WeakKeyDictionary()


def reader(bus: Bus) -> SnapshotReader:
    """The frontend's one reader over ``bus`` (a frontend has one bus)."""
    found = _readers.get(bus)
    if found is None:
        found = _readers[bus] = SnapshotReader(bus)
    return found
