"""Presence in Redis: how many sockets watch a session, and which users, cluster-wide.

Each frontend writes one entry per session it has watchers on: the JSON
``{user: sockets}`` of its own sockets there, in the session's presence hash, with
when it lapses in a sorted set beside it (both in the session's Cluster slot). A
frontend refreshes its entries well within their time to live, so the entries of a
frontend that died (kill -9) lapse by themselves, and the next call of any frontend
on that session drops them.

The figures are summed in the ``PRESENCE`` script: sockets and distinct users exact,
however many; names sorted and cut to a cap, so a frame stays small. The script
publishes a ``presence`` frame on the session's presence channel when the figures
changed, at most once an interval whoever asks, and tells a caller whose change must
wait when to ask again: the guarantee is one frame per change at most, each within
an interval of its change for a caller that asks again when told.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import orjson

from thoughtwire.shared import scripts
from thoughtwire.shared.keys import Keys
from thoughtwire.shared.redis import Batcher, Redis, register_script
from thoughtwire.shared.redis import Script as AsyncScript


@dataclass(frozen=True, slots=True)
class Figures:
    """A session's presence, as the script summed it; times are Redis' clock (Unix ms)."""

    sockets: int
    users: int
    frame: str  # the ``presence`` frame of these figures
    due_ms: int  # when a change held back by the interval may be published; 0: none
    lapse_ms: int  # when the first entry still held lapses; 0: none held
    now_ms: int
    published: bool = False  # this call published ``frame``

    def names(self) -> list[str]:
        """The first names, in order, as in the frame."""
        names: list[str] = orjson.loads(self.frame)["names"]
        return names


class Presence:
    """The Redis side of presence: frontends' entries written, summed and announced."""

    def __init__(self, redis: Redis, keys: Keys, batch: Batcher) -> None:
        self._keys = keys
        self._batch = batch
        # Publishes on the session's presence channel: sharded on a cluster.
        self._script: AsyncScript = register_script(redis, scripts.PRESENCE)

    def channel(self, session: str) -> str:
        """The channel ``session``'s ``presence`` frames are published on."""
        return self._keys.session_presence_channel(session)

    async def put(
        self,
        session: str,
        node: str,
        held: Mapping[str, int],
        *,
        ttl_ms: int,
        interval_ms: int,
        cap: int,
    ) -> Figures:
        """Write frontend ``node``'s sockets on ``session`` by user (none: its entry goes),
        publish the figures if they changed and are due, and return them."""
        entry = orjson.dumps(dict(held)).decode() if held else ""
        return await self._call(session, (node, entry, ttl_ms, interval_ms, cap, session, 1))

    async def read(self, session: str, *, cap: int) -> Figures:
        """The session's figures now, writing no entry and publishing nothing."""
        return await self._call(session, ("", "", 1, 1, cap, session, 0))

    async def _call(self, session: str, args: tuple[Any, ...]) -> Figures:
        keys = self._keys
        reply = await self._batch.script(
            self._script,
            (
                keys.session_presence(session),
                keys.session_presence_expiry(session),
                keys.session_presence_channel(session),
            ),
            args,
        )
        if isinstance(reply, Exception):
            raise reply
        sockets, users, frame, due, lapse, now, published = reply
        text = frame.decode() if isinstance(frame, bytes) else str(frame)
        return Figures(
            int(sockets), int(users), text, int(due), int(lapse), int(now), bool(published)
        )
