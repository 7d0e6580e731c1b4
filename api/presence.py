"""Presence, the frontend's side: the sockets it holds per session, kept in Redis.

:class:`Watching` counts this frontend's watchers (sockets and SSE streams) per
session and user, and one task writes each session's count to Redis
(:mod:`thoughtwire.shared.presence`): shortly after a change, so a burst of joins is
one write, and every ``presence_refresh`` seconds, so its entries never lapse while
it lives. One call per session, whatever the number of its sockets here; the
``presence`` frame it may publish is framed once per frontend by the hub and reaches
the sockets that asked for it (:class:`Watch`, ``?presence=1``) on the presence channel.

When Redis holds a change back (a frame went out less than ``presence_interval``
ago) or another frontend's entry is about to lapse, the task calls again then, so
the frame that follows comes within an interval, or within ``presence_ttl`` and an
interval of a frontend's death.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from thoughtwire.api.viewer import Viewer
from thoughtwire.shared.backoff import UNAVAILABLE
from thoughtwire.shared.presence import Figures, Presence
from thoughtwire.shared.redis import RedisError
from thoughtwire.shared.settings import Settings

logger = logging.getLogger("thoughtwire.presence")

SETTLE_SECONDS = 0.05  # a change waits this long for others of the same burst
RETRY_SECONDS = 1.0  # after a failed write
LAPSE_MARGIN_SECONDS = 0.05  # past an entry's lapse, so Redis sees it gone
CLOSE_SECONDS = 1.0  # the last writes of a stopping frontend


class Watching:
    """This frontend's watchers per session and user, written to Redis by :meth:`run`."""

    def __init__(self, store: Presence, node: str, settings: Settings) -> None:
        self._store = store
        self._node = node
        self._ttl_ms = int(settings.presence_ttl * 1000)
        # A refresh must come before the entry lapses, whatever the settings say.
        self._refresh = min(settings.presence_refresh, settings.presence_ttl / 2)
        self._interval_ms = int(settings.presence_interval * 1000)
        self._cap = settings.presence_names
        self._held: dict[str, dict[str, int]] = {}  # session -> user -> watchers here
        self._due: dict[str, float] = {}  # session -> when (loop time) to write it next
        # Viewers that asked for frames and joined since the session's last write: the
        # figures reach them with the next write, whether or not they changed.
        self._greet: dict[str, list[Viewer]] = {}
        self._wake = asyncio.Event()

    def held(self, session: str) -> dict[str, int]:
        """This frontend's watchers of ``session``, by user."""
        return dict(self._held.get(session, {}))

    def watch(self, session: str, user: str, greet: Viewer | None = None) -> None:
        """One more watcher of ``session`` here, as ``user``; ``greet``, a viewer to be
        told the figures even if its arrival leaves them as they were (a reconnect)."""
        if greet is not None:
            self._greet.setdefault(session, []).append(greet)
        users = self._held.setdefault(session, {})
        users[user] = users.get(user, 0) + 1
        self._soon(session)

    def unwatch(self, session: str, user: str) -> None:
        """One watcher of ``session`` here left."""
        users = self._held.get(session)
        if users is None or user not in users:
            return
        users[user] -= 1
        if users[user] <= 0:
            del users[user]
        if not users:
            del self._held[session]
        self._soon(session)

    def channel(self, session: str) -> str:
        """The channel ``session``'s presence frames come on."""
        return self._store.channel(session)

    async def read(self, session: str) -> Figures:
        """The session's figures across every frontend."""
        return await self._store.read(session, cap=self._cap)

    def _soon(self, session: str) -> None:
        at = asyncio.get_running_loop().time() + SETTLE_SECONDS
        if self._due.get(session, at + 1) > at:
            self._due[session] = at
            self._wake.set()

    async def run(self) -> None:
        """Write what is due, for the frontend's whole life."""
        while True:
            await self._sleep()
            await self._flush()

    async def _sleep(self) -> None:
        self._wake.clear()
        now = asyncio.get_running_loop().time()
        delay = min(self._due.values(), default=now + self._refresh) - now
        if delay > 0:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await self._wake.wait()

    async def _flush(self) -> None:
        now = asyncio.get_running_loop().time()
        sessions = [session for session, at in self._due.items() if at <= now]
        for session in sessions:
            del self._due[session]
        # Pipelined together (shared/redis/pipeline.py): one round trip for the lot.
        results = await asyncio.gather(
            *(self._put(session) for session in sessions), return_exceptions=True
        )
        for session, result in zip(sessions, results, strict=True):
            if isinstance(result, asyncio.CancelledError):
                raise result
            if isinstance(result, BaseException):
                if not isinstance(result, (*UNAVAILABLE, RedisError)):
                    raise result
                logger.warning("presence of %s not written (%r); retrying", session, result)
                self._at(session, RETRY_SECONDS)

    async def _put(self, session: str) -> None:
        held = self._held.get(session, {})
        greet = self._greet.pop(session, [])
        try:
            figures = await self._store.put(
                session,
                self._node,
                held,
                ttl_ms=self._ttl_ms,
                interval_ms=self._interval_ms,
                cap=self._cap,
            )
        except BaseException:
            self._greet.setdefault(session, []).extend(greet)  # for the retry
            raise
        self._schedule(session, figures)
        # A frame published now, or held back to publish later, reaches them on the
        # channel; otherwise nothing changed, and they are told the figures as they are.
        if not figures.published and not figures.due_ms:
            for viewer in greet:
                viewer.put(figures.frame)

    def _schedule(self, session: str, figures: Figures) -> None:
        """When to write ``session`` next: to refresh, to publish a held-back change, or
        to see another frontend's entry lapse; never, once nothing is held or pending."""
        delays = []
        if figures.due_ms:
            delays.append((figures.due_ms - figures.now_ms) / 1000)
        if session in self._held:
            delays.append(self._refresh)
            if figures.lapse_ms:
                delays.append((figures.lapse_ms - figures.now_ms) / 1000 + LAPSE_MARGIN_SECONDS)
        if delays:
            self._at(session, max(0.0, min(delays)))

    def _at(self, session: str, delay: float) -> None:
        at = asyncio.get_running_loop().time() + delay
        if self._due.get(session, at + 1) > at:  # a change meanwhile may want it sooner
            self._due[session] = at

    async def close(self) -> None:
        """Take this frontend's entries out at once, in one bounded try."""
        sessions = set(self._held) | set(self._due)
        self._held.clear()
        self._greet.clear()
        with contextlib.suppress(TimeoutError, *UNAVAILABLE, RedisError):
            async with asyncio.timeout(CLOSE_SECONDS):
                await asyncio.gather(*(self._put(session) for session in sessions))


class Watch:
    """One socket's or stream's place in its session's presence, moved as it follows."""

    __slots__ = ("frames", "session", "user", "viewer", "watching")

    def __init__(self, watching: Watching, viewer: Viewer, user: str, *, frames: bool) -> None:
        self.watching = watching
        self.viewer = viewer
        self.user = user
        self.frames = frames  # whether the client gets the session's presence frames
        self.session: str | None = None

    async def start(self, session: str) -> None:
        """Count as a watcher of ``session``, having joined its presence frames if asked."""
        await self.stop()
        if self.frames:
            await self.viewer.join(self.watching.channel(session))
        self.session = session
        self.watching.watch(session, self.user, self.viewer if self.frames else None)

    async def stop(self) -> None:
        """Stop counting, and leave the presence frames. Idempotent."""
        session, self.session = self.session, None
        if session is None:
            return
        self.watching.unwatch(session, self.user)
        if self.frames:
            await self.viewer.leave(self.watching.channel(session))
