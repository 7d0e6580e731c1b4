"""Grants and limits in Redis: session owners, per-user slots and rates.

Every rule about who may hold what lives here, with its Redis calls, so frontends and
workers meet the same limits and each rule has one home:

* **Session owners.** The first user to use a session owns it (``CLAIM``).
* **Slots.** A user holds at most a number of concurrent runs and of open connections
  (sockets and SSE streams together). A slot is a member of a sorted set scored by when
  it lapses, on Redis' clock (``ACQUIRE``), so the slots of a process that died come
  back by themselves.
* **The run slot** is taken by :meth:`Grants.take_run` when a frontend queues a run and
  given back by :meth:`Grants.free_run`, the one place it is freed: by the frontend when
  nothing new was queued (the submit failed and its run was withdrawn or never
  admitted, or it was an idempotent repeat), and by the bus when the run's job leaves
  the queue (done, error, cancelled, dead-lettered), when a run whose state Redis lost
  is ended (``END_LOST``), or when a run never queued is ended once its frontend went
  (``WITHDRAW``: the run's record names its user).

  Why not in the terminal append script itself: a script's keys must share one Redis
  Cluster slot, and a user's slot set (hash tag: the user's digest) and a session's keys
  (hash tag: the session) do not. Freeing twice is harmless (ZREM of a member gone).
* **Rates.** Requests per user in a sliding window of two fixed-window counters
  (``COUNT``).
* **Token budgets.** Tokens per user in fixed windows (a minute, a UTC day), reserved by
  the workers before runs write them (``RESERVE``, ``GIVE_BACK``) and read by the
  frontends before a run is queued. A run without a user charges :data:`ANONYMOUS`. A
  reservation never grants past a limit except for the one thought that takes what
  remains, so a window's count stays under its limit plus one thought, however many
  runs are in flight (``worker/usage.py``).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from thoughtwire.shared import scripts
from thoughtwire.shared.keys import Keys
from thoughtwire.shared.redis import Batcher, Redis
from thoughtwire.shared.redis import Script as AsyncScript

RATE_WINDOW = 60  # seconds of the sliding rate window
RUN_SLOT_MS = 3_600_000  # a run's slot lapses after an hour even if nobody frees it
# A connection's slot lapses unless its frontend refreshes it, so the slots of a
# frontend killed outright (kill -9, a lost node) come back within this long. Refreshes
# go a user at a time, one ZADD for all of that user's slots (and one PEXPIRE), so a
# short lifetime does not cost a Redis write per connection.
SOCKET_SLOT_MS = 6_000
SOCKET_REFRESH_SECONDS = 2.0

# Token budget windows: name and length in seconds. Fixed windows on the Unix clock, so
# the day is a UTC day; a window's counter outlives it by BUDGET_GRACE seconds only.
BUDGET_WINDOWS = (("minute", 60), ("day", 86_400))
BUDGET_GRACE = 60
ANONYMOUS = "anonymous"  # whose budget a run without a user charges (authentication off)


@dataclass(frozen=True, slots=True)
class Budget:
    """Tokens each user may use per window, across frontends and workers (0: no limit)."""

    per_minute: int = 0
    per_day: int = 0

    @property
    def limits(self) -> tuple[int, ...]:
        """The limit of each window of :data:`BUDGET_WINDOWS`, in that order."""
        return (self.per_minute, self.per_day)

    @property
    def enabled(self) -> bool:
        """Whether any window has a limit: without one, nothing is counted."""
        return any(self.limits)

    def spent(self, used: Sequence[int]) -> bool:
        """Whether counts ``used`` (one per window) reach a limit: nothing more may run."""
        return any(limit and n >= limit for limit, n in zip(self.limits, used, strict=True))

    def report(self, used: Sequence[int], now: float) -> dict[str, dict[str, int | None]]:
        """Per window: limit, used, remaining (None: no limit) and resets_at (Unix ms)."""
        windows = {}
        for (name, seconds), limit, n in zip(BUDGET_WINDOWS, self.limits, used, strict=True):
            windows[name] = {
                "limit": limit or None,
                "used": n,
                "remaining": max(0, limit - n) if limit else None,
                "resets_at": (int(now // seconds) + 1) * seconds * 1000,
            }
        return windows


NO_BUDGET = Budget()


def budget_windows(now: float) -> tuple[int, ...]:
    """The number of each window of :data:`BUDGET_WINDOWS` that ``now`` (Unix seconds) is in."""
    return tuple(int(now // seconds) for _name, seconds in BUDGET_WINDOWS)


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


class Grants:
    """Session owners, per-user slots and rates: the Redis side of every grant and limit."""

    def __init__(self, redis: Redis, keys: Keys, batch: Batcher, *, ttl: int) -> None:
        self._keys = keys
        self._batch = batch
        self._ttl = ttl
        # How far Redis' clock is ahead of this process's (ms), as the last slot taken saw it.
        self._redis_ahead_ms = 0
        self._redis = redis
        self._acquire = redis.register_script(scripts.ACQUIRE)
        self._count = redis.register_script(scripts.COUNT)
        self._claim = redis.register_script(scripts.CLAIM)
        self._charge = redis.register_script(scripts.CHARGE)
        self._reserve = redis.register_script(scripts.RESERVE)
        self._give_back = redis.register_script(scripts.GIVE_BACK)

    def _script(self, script: AsyncScript, keys: Sequence[Any], args: Sequence[Any]) -> Any:
        return self._batch.script(script, keys, args)

    # --- session owners -------------------------------------------------------

    async def claim_session(self, session: str, user: str) -> str:
        """The session's owner: ``user``, if nobody owned it yet."""
        key = self._keys.session_owner(session)
        return _text(await self._script(self._claim, (key,), (user, self._ttl)))

    async def session_owner(self, session: str) -> str | None:
        """The user who owns ``session``, or None if nobody has claimed it."""
        owner = await self._redis.get(self._keys.session_owner(session))
        return None if owner is None else _text(owner)

    # --- the run slot: taken here, freed here ----------------------------------

    async def take_run(self, user: str, run: str, limit: int) -> bool:
        """Hold one of ``user``'s ``limit`` concurrent-run slots for ``run``."""
        return await self._take(self._keys.user_runs(user), run, RUN_SLOT_MS, limit)

    async def free_run(self, user: str | None, run: str) -> None:
        """Give ``run``'s slot back: the one place a run slot is freed (twice is harmless)."""
        if user is not None:
            await self._batch.commands(("ZREM", self._keys.user_runs(user), run))

    async def runs_held(self, user: str) -> int:
        """How many run slots ``user`` holds now (lapsed ones included until the next take)."""
        return int(await self._redis.zcard(self._keys.user_runs(user)))

    # --- connection slots --------------------------------------------------------

    async def take_socket(self, user: str, connection: str, limit: int) -> bool:
        """Hold one of ``user``'s ``limit`` connection slots (sockets and SSE streams)."""
        return await self._take(self._keys.user_sockets(user), connection, SOCKET_SLOT_MS, limit)

    async def refresh_sockets(self, user: str, connections: Sequence[str]) -> None:
        """Renew ``user``'s held connection slots: one ZADD (and the set's expiry)."""
        key = self._keys.user_sockets(user)
        # On Redis' clock, as the slots were taken: read off the last take, so that a
        # refresh stays one ZADD rather than a script that asks Redis the time.
        expires = _now_ms() + self._redis_ahead_ms + SOCKET_SLOT_MS
        scored = [part for member in connections for part in (expires, member)]
        replies = await self._batch.commands(
            ("ZADD", key, *scored), ("PEXPIRE", key, SOCKET_SLOT_MS)
        )
        for reply in replies:
            if isinstance(reply, Exception):
                raise reply

    async def free_socket(self, user: str, connection: str) -> None:
        """Give a connection's slot back."""
        await self._redis.zrem(self._keys.user_sockets(user), connection)

    async def _take(self, key: str, member: str, ttl_ms: int, limit: int) -> bool:
        held, now = await self._script(self._acquire, (key,), (member, ttl_ms, limit))
        self._redis_ahead_ms = int(now) - _now_ms()
        return bool(held)

    # --- rates -------------------------------------------------------------------

    async def count(self, user: str, now: float) -> tuple[int, int]:
        """Count one more request by ``user`` at ``now`` (Unix seconds).

        Returns this window's count, this request included, and the previous
        window's: the sliding count is the first plus the share of the second still
        inside the sliding window.
        """
        window = int(now // RATE_WINDOW)
        keys = [self._keys.user_rate(user, window), self._keys.user_rate(user, window - 1)]
        current, previous = await self._script(self._count, keys, (RATE_WINDOW,))
        return int(current), int(previous)

    # --- token budgets -------------------------------------------------------------

    def _budget_keys(self, user: str, now: float) -> list[str]:
        return [
            self._keys.user_budget(user, name, number)
            for (name, _seconds), number in zip(BUDGET_WINDOWS, budget_windows(now), strict=True)
        ]

    async def reserve(
        self, user: str, budget: Budget, need: int, want: int, now: float
    ) -> tuple[int, int]:
        """Reserve up to ``want`` tokens of ``user``'s ``budget`` at ``now``: returns
        ``(granted, over)``, ``(0, 0)`` when nothing remains, and ``over`` > 0 only for the
        last grant, when less than ``need`` remained (``RESERVE``)."""
        ttls = [seconds + BUDGET_GRACE for _name, seconds in BUDGET_WINDOWS]
        limits = [n for pair in zip(budget.limits, ttls, strict=True) for n in pair]
        keys = self._budget_keys(user, now)
        granted, over = await self._script(self._reserve, keys, (need, max(1, want), *limits))
        return int(granted), int(over)

    async def give_back(self, user: str, tokens: int, now: float) -> None:
        """Give back ``tokens`` reserved at ``now`` and not used, to the windows of then."""
        await self._script(self._give_back, self._budget_keys(user, now), (tokens,))

    async def charge(self, user: str, tokens: int, now: float) -> tuple[int, ...]:
        """Add ``tokens`` to ``user``'s count in each budget window at ``now`` (Unix
        seconds); returns the counts after, one per window of :data:`BUDGET_WINDOWS`."""
        ttls = [seconds + BUDGET_GRACE for _name, seconds in BUDGET_WINDOWS]
        used = await self._script(self._charge, self._budget_keys(user, now), (tokens, *ttls))
        return tuple(int(n) for n in used)

    async def budget_used(self, user: str, now: float) -> tuple[int, ...]:
        """``user``'s token count in each budget window at ``now``, without charging."""
        (reply,) = await self._batch.commands(("MGET", *self._budget_keys(user, now)))
        if isinstance(reply, Exception):
            raise reply
        return tuple(int(n or 0) for n in reply)
