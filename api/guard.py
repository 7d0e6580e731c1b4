"""The frontend's side of grants and limits (:mod:`thoughtwire.shared.grants`).

Who may do what to which session, and how much, across all frontends:

* A session belongs to the first user who uses it. Only its owner may prompt it,
  cancel its runs or mint viewer tokens for it; its owner and holders of a viewer
  token for it may read it (follow, resume, SSE, job status).
* Per user: a rate of client frames and API calls per minute, a number of concurrent
  runs, a number of open connections (sockets and SSE streams together). The state
  is in Redis, so a user who spreads requests over several frontends meets the same
  limits.
* A refusal costs Redis nothing once this frontend knows the user is over the rate:
  it refuses locally until the sliding window can have room again, and only then
  asks Redis. Only requests it lets through (and the one that finds the user over)
  are counted, so the count that every frontend reads stays the same.

With authentication off everything is allowed and nothing is counted: that mode is
for a laptop or a trusted network (``thoughtwire up`` binds 127.0.0.1).
"""

from __future__ import annotations

import asyncio
import math
import time

from thoughtwire.api.auth import AuthError, Principal
from thoughtwire.shared.bus import Bus
from thoughtwire.shared.closecodes import Close, ErrorCode
from thoughtwire.shared.grants import (
    RATE_WINDOW,
    SOCKET_REFRESH_SECONDS,
    SOCKET_SLOT_MS,
    Budget,
)
from thoughtwire.shared.settings import Settings

__all__ = [
    "SOCKET_REFRESH_SECONDS",
    "SOCKET_SLOT_MS",
    "BudgetError",
    "Guard",
    "LimitError",
    "room_at",
]

# Users over the rate that a frontend remembers; past it, those whose wait is over are
# dropped (the user id is the client's to choose, so the table must not grow unbounded).
HOLDOFFS = 4096
GONE = "this session has ended and expired"  # a viewer link's, once its session is gone


class LimitError(AuthError):
    """Over a limit; the client should slow down (4029 / HTTP 429)."""

    error_code = ErrorCode.RATE_LIMITED  # the ``code`` of the ``error`` reply and HTTP body

    def __init__(self, message: str) -> None:
        super().__init__(message, Close.RATE_LIMITED)

    @property
    def status(self) -> int:
        """The HTTP status of a limit: 429."""
        return 429


class BudgetError(LimitError):
    """The user's token budget is spent: a prompt is refused (``budget`` / HTTP 429)."""

    error_code = ErrorCode.BUDGET


def room_at(current: int, previous: int, window: int, seconds: int, limit: int) -> float:
    """When the next request could fit the sliding window again (Unix seconds).

    ``current`` and ``previous`` are the counts of window number ``window`` (this
    request included) and of the one before; the sliding count of a request at
    ``t`` is its window's count plus the share of the previous window still inside
    the last ``seconds``. More requests (from other frontends) only make the true
    time later, so this is the earliest moment worth asking Redis again.
    """
    if current + 1 <= limit:  # room in this window, once enough of the previous one slides out
        if previous == 0 or limit - current >= previous:
            return float(window * seconds)
        return (window + 1 - (limit - current) / previous) * seconds
    # None in this window; in the next, this window's count slides out the same way.
    return (window + 2 - limit / current) * seconds


class Guard:
    """The checks every transport makes: grants on sessions and per-user limits."""

    def __init__(self, settings: Settings, bus: Bus) -> None:
        self.enabled = settings.auth_enabled
        self.grants = bus.grants
        self.settings = settings
        # Token budgets hold with authentication off too: everyone is then "anonymous".
        self.budget = Budget(settings.budget_tokens_per_minute, settings.budget_tokens_per_day)
        # Connections (sockets and SSE streams) holding a slot here, id -> user: refreshed.
        self.held: dict[str, str] = {}
        # Users known to be over the rate, until when (monotonic) nothing is worth asking
        # Redis: a wall clock stepped back would otherwise lengthen every refusal by the step.
        self._over: dict[str, float] = {}

    async def owner(self, principal: Principal, session: str) -> str | None:
        """The session's owner; a user (not a viewer) who is first to use it becomes it."""
        if not self.enabled:
            return None
        if principal.viewer_of is None:
            return await self.grants.claim_session(session, principal.user)
        return await self.grants.session_owner(session)

    async def check_read(self, principal: Principal, session: str) -> None:
        """Refuse (4003 / 403) unless ``principal`` may read ``session``."""
        if not self.enabled:
            return
        owner = await self.owner(principal, session)
        if not principal.can_read(session, owner):
            # A viewer's session with no owner any more has expired (its token names it,
            # so saying so tells the holder nothing new).
            gone = principal.viewer_of == session and owner is None
            reason = GONE if gone else "this session belongs to someone else"
            raise AuthError(reason, Close.FORBIDDEN)

    def check_writer(self, principal: Principal) -> None:
        """Refuse (4003 / 403) a principal that may write no session at all (a viewer),
        before anything is looked up: a viewer hears the same answer for every run."""
        if self.enabled and principal.viewer_of is not None:
            raise AuthError("this session is read-only for you", Close.FORBIDDEN)

    async def check_write(self, principal: Principal, session: str) -> None:
        """Refuse (4003 / 403) unless ``principal`` may prompt ``session`` or cancel its runs."""
        if self.enabled and not principal.can_write(session, await self.owner(principal, session)):
            raise AuthError("this session is read-only for you", Close.FORBIDDEN)

    async def check_rate(self, principal: Principal) -> None:
        """Count one request; refuse (4029 / 429) past the rate, locally while known over."""
        if not self.enabled:
            return
        user, limit, now = principal.user, self.settings.rate_limit, time.time()
        until = self._over.get(user)
        if until is not None:
            if time.monotonic() < until:
                raise self._over_rate()
            del self._over[user]
        current, previous = await self.grants.count(user, now)
        window = int(now // RATE_WINDOW)
        share = 1 - (now / RATE_WINDOW - window)
        if current + math.floor(previous * share) <= limit:
            return
        # At least the spacing of allowed requests, so rounding never asks Redis per frame.
        soonest = now + RATE_WINDOW / max(limit, 1)
        room = max(soonest, room_at(current, previous, window, RATE_WINDOW, limit))
        self._hold_off(user, room - now)
        raise self._over_rate()

    def _over_rate(self) -> LimitError:
        return LimitError(f"more than {self.settings.rate_limit} requests a minute; slow down")

    def _hold_off(self, user: str, seconds: float) -> None:
        now = time.monotonic()
        if len(self._over) >= HOLDOFFS:
            self._over = {u: t for u, t in self._over.items() if t > now}
            if len(self._over) >= HOLDOFFS:  # all still waiting: forget the oldest
                del self._over[next(iter(self._over))]
        self._over[user] = now + seconds

    async def check_budget(self, principal: Principal) -> None:
        """Refuse (``budget`` / 429) a prompt while the user's token budget is spent."""
        if self.budget.enabled:
            used = await self.grants.budget_used(principal.user, time.time())
            if self.budget.spent(used):
                raise BudgetError("the token budget is spent; GET /v1/budget says when it refills")

    async def budget_report(self, principal: Principal) -> dict[str, dict[str, int | None]]:
        """The user's budget per window: limit, used, remaining, resets_at (Unix ms)."""
        now = time.time()
        return self.budget.report(await self.grants.budget_used(principal.user, now), now)

    async def take_run(self, principal: Principal, run: str) -> str | None:
        """Hold a concurrent-run slot for ``run``; returns the user to free it for later."""
        if not self.enabled:
            return None
        limit = self.settings.max_runs_per_user
        if not await self.grants.take_run(principal.user, run, limit):
            raise LimitError(f"{limit} runs are already going; wait for one to end")
        return principal.user

    async def free_run(self, user: str | None, run: str) -> None:
        """Give back the slot :meth:`take_run` took, when nothing new was queued for it."""
        await self.grants.free_run(user, run)

    async def take_socket(self, principal: Principal, connection: str) -> None:
        """Hold one of the user's connection slots, shared by sockets and SSE streams.

        The slot is refreshed (:meth:`refresh_sockets`) until :meth:`free_socket`,
        which every holder calls however its connection ends.
        """
        if not self.enabled:
            return
        limit = self.settings.max_sockets_per_user
        if not await self.grants.take_socket(principal.user, connection, limit):
            raise LimitError(
                f"{limit} sockets and event streams are already open for this user; close one"
            )
        self.held[connection] = principal.user

    async def refresh_sockets(self) -> None:
        """Renew every slot this frontend holds: one ZADD and one PEXPIRE per user."""
        by_user: dict[str, list[str]] = {}
        for connection, user in self.held.items():
            by_user.setdefault(user, []).append(connection)
        results = await asyncio.gather(
            *(self.grants.refresh_sockets(user, held) for user, held in by_user.items()),
            return_exceptions=True,
        )
        for result in results:
            if isinstance(result, BaseException):
                raise result

    async def free_socket(self, principal: Principal, connection: str) -> None:
        """Give a connection's slot back (it is no longer refreshed even if Redis fails)."""
        if self.held.pop(connection, None) is not None:
            await self.grants.free_socket(principal.user, connection)
