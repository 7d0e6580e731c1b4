"""Grants and limits: who may do what to which session, and how much, across all frontends.

* A session belongs to the first user who uses it. Only its owner may prompt it,
  cancel its runs or mint viewer tokens for it; its owner and holders of a viewer
  token for it may read it (follow, resume, SSE, job status).
* Per user: a rate of client frames and API calls per minute, a number of concurrent
  runs, a number of open sockets. The state is in Redis, so a user who spreads
  requests over several frontends meets the same limits.

With authentication off everything is allowed and nothing is counted: that mode is
for a laptop or a trusted network (``thoughtwire up`` binds 127.0.0.1).
"""

from __future__ import annotations

from api.auth import AuthError, Principal
from shared.bus import Bus
from shared.closecodes import Close
from shared.settings import Settings

RATE_WINDOW = 60
RUN_SLOT_MS = 3_600_000  # a run's slot lapses after an hour even if nobody frees it
SOCKET_SLOT_MS = 60_000  # a socket's slot lapses unless its frontend refreshes it
SOCKET_REFRESH_SECONDS = 20.0


class LimitError(AuthError):
    """Over a limit; the client should slow down (4029 / HTTP 429)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, Close.RATE_LIMITED)

    @property
    def status(self) -> int:
        return 429


class Guard:
    def __init__(self, settings: Settings, bus: Bus) -> None:
        self.enabled = settings.auth_enabled
        self.bus = bus
        self.settings = settings

    async def owner(self, principal: Principal, session: str) -> str | None:
        """The session's owner; a user (not a viewer) who is first to use it becomes it."""
        if not self.enabled:
            return None
        if principal.viewer_of is None:
            return await self.bus.claim_session(session, principal.user)
        return await self.bus.session_owner(session)

    async def check_read(self, principal: Principal, session: str) -> None:
        if self.enabled and not principal.can_read(session, await self.owner(principal, session)):
            raise AuthError("this session belongs to someone else", Close.FORBIDDEN)

    async def check_write(self, principal: Principal, session: str) -> None:
        if self.enabled and not principal.can_write(session, await self.owner(principal, session)):
            raise AuthError("this session is read-only for you", Close.FORBIDDEN)

    async def check_rate(self, principal: Principal) -> None:
        if not self.enabled:
            return
        if await self.bus.count(principal.user, RATE_WINDOW) > self.settings.rate_limit:
            raise LimitError(f"more than {self.settings.rate_limit} requests a minute; slow down")

    async def take_run(self, principal: Principal, run: str) -> str | None:
        """Hold a concurrent-run slot for ``run``; returns the user to free it for later."""
        if not self.enabled:
            return None
        key = self.bus.keys.user_runs(principal.user)
        if not await self.bus.acquire_slot(key, run, RUN_SLOT_MS, self.settings.max_runs_per_user):
            raise LimitError(
                f"{self.settings.max_runs_per_user} runs are already going; wait for one to end"
            )
        return principal.user

    async def take_socket(self, principal: Principal, socket_id: str) -> None:
        if not self.enabled:
            return
        key = self.bus.keys.user_sockets(principal.user)
        if not await self.bus.acquire_slot(
            key, socket_id, SOCKET_SLOT_MS, self.settings.max_sockets_per_user
        ):
            raise LimitError(f"{self.settings.max_sockets_per_user} sockets are already open")

    async def refresh_socket(self, user: str, socket_id: str) -> None:
        await self.bus.acquire_slot(
            self.bus.keys.user_sockets(user), socket_id, SOCKET_SLOT_MS, 2**31
        )

    async def free_socket(self, principal: Principal, socket_id: str) -> None:
        if self.enabled:
            await self.bus.release_slot(self.bus.keys.user_sockets(principal.user), socket_id)
