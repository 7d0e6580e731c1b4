"""Authentication: who a request is, from a JWT; and the viewer tokens owners mint.

A client sends its token in one of three ways: ``?token=`` (browsers' sockets),
``Authorization: Bearer`` (everything else), or, for browser sockets that should not
put it in a URL, as a WebSocket subprotocol ``bearer.<token>`` next to
``thoughtwire.v1``.

Checks: the algorithm is pinned by the key that is configured for it (HS256 with
``JWT_SECRET``; RS256/ES256 with ``JWT_PUBLIC_KEY`` or ``JWKS_URL``), so ``alg: none``
and HS/RS confusion cannot pass; ``exp`` and a non-empty ``sub`` are required; ``nbf`` and ``iat``
are honoured with a small leeway; ``aud`` and ``iss`` are checked when configured.

PyJWT is imported where a token is read or made, not at the top: with cryptography
installed it loads cryptography's OpenSSL bindings, about 9 MB in every process,
which a frontend without authentication never uses.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from thoughtwire.shared.closecodes import Close
from thoughtwire.shared.settings import Settings
from thoughtwire.shared.vocab import ViewScope

if TYPE_CHECKING:
    from jwt import PyJWKClient

logger = logging.getLogger("thoughtwire.auth")

LEEWAY_SECONDS = 10
SUBPROTOCOL = "thoughtwire.v1"
BEARER_PROTOCOL = "bearer."
VIEWER_SCOPE = "view"
VIEWER_AUDIENCE = "thoughtwire:viewer"
# The claim that holds a viewer token's scope (absent: full). Not ``scope``, which says
# the token is a viewer's: a frontend that predates scopes reads this token as a full
# viewer's, never as its owner's.
VIEW_CLAIM = "view"
SCOPES = frozenset(scope.value for scope in ViewScope)


class AuthError(Exception):
    """A request that cannot go on; ``code`` is its close code, the message is safe to show."""

    def __init__(self, message: str, code: int = Close.UNAUTHORIZED) -> None:
        super().__init__(message)
        self.code = code
        self.message = message

    @property
    def status(self) -> int:
        """The HTTP status of this refusal: 401 unauthenticated, 403 refused."""
        return 401 if self.code == Close.UNAUTHORIZED else 403


@dataclass(frozen=True)
class Principal:
    """Who is asking: a user, or a viewer holding a read-only grant for one session."""

    user: str
    expires: float | None = None
    viewer_of: str | None = None  # the one session a viewer token may read
    granted_by: str | None = None  # the owner who minted the viewer token
    scope: ViewScope = ViewScope.FULL  # what a viewer token shows; fixed when it is minted

    def can_read(self, session: str, owner: str | None) -> bool:
        """Whether this principal may follow ``session``, owned by ``owner``."""
        if self.viewer_of is not None:
            # A session's name outlives its owner's claim (it lapses with the log): once
            # another user holds the name, the old owner's links must not show it.
            return self.viewer_of == session and owner == self.granted_by
        return owner is None or owner == self.user

    def can_write(self, session: str, owner: str | None) -> bool:
        """Whether this principal may prompt or cancel in ``session``; viewers never may."""
        return self.viewer_of is None and (owner is None or owner == self.user)


ANONYMOUS = Principal("anonymous")


class Authenticator:
    """Checks tokens (HS256 secret, PEM key or JWKS) and mints viewer tokens."""

    def __init__(self, settings: Settings) -> None:
        self.enabled = settings.auth_enabled
        self._secret = settings.jwt_secret
        self._public_key = settings.jwt_public_key
        if self.enabled:
            # Loaded now, so that the first request to need it does not stall the loop.
            import jwt  # noqa: F401
        self._jwks: PyJWKClient | None = None
        if settings.jwks_url:
            from jwt import PyJWKClient

            self._jwks = PyJWKClient(settings.jwks_url, cache_keys=True)
        self._audience = settings.jwt_audience
        self._issuer = settings.jwt_issuer
        self.viewer_ttl = settings.viewer_token_ttl

    async def principal(self, token: str | None) -> Principal:
        """:meth:`authenticate`, with a key from ``JWKS_URL`` looked up off the event loop.

        PyJWT fetches the key set with a blocking request when a token names a ``kid``
        it has not cached, or its cache is stale: on the loop, a key set server slow to
        answer would freeze every socket of this frontend for up to PyJWT's 30 s
        timeout, and anyone can send a token naming a made-up ``kid``.
        """
        if self._jwks is None:
            return self.authenticate(token)
        return await asyncio.to_thread(self.authenticate, token)

    def authenticate(self, token: str | None) -> Principal:
        """The principal a token names; raises :class:`AuthError` (4001) otherwise."""
        if not self.enabled:
            return ANONYMOUS
        if not token:
            raise AuthError("missing token")
        import jwt

        try:
            header = jwt.get_unverified_header(token)
        except jwt.InvalidTokenError:
            raise AuthError("invalid token") from None
        claims = self._decode(token, str(header.get("alg", "")), header)
        # An empty subject would make every such token one shared identity.
        subject = _named(claims, "sub")
        if claims.get("scope") == VIEWER_SCOPE:
            session = _named(claims, "sid")
            return Principal(
                f"viewer:{subject}",
                float(claims["exp"]),
                viewer_of=session,
                granted_by=subject,
                scope=_scope(claims),
            )
        return Principal(subject, float(claims["exp"]))

    def _decode(self, token: str, alg: str, header: Mapping[str, Any]) -> dict[str, Any]:
        import jwt

        key: Any
        if alg == "HS256" and self._secret:
            key = self._secret
        elif alg in ("RS256", "ES256") and self._public_key:
            key = self._public_key
        elif alg in ("RS256", "ES256") and self._jwks is not None:
            try:
                key = self._jwks.get_signing_key_from_jwt(token).key
            except jwt.PyJWTError:  # no key for it, or a token or key it cannot read
                raise AuthError("invalid token") from None
        else:
            raise AuthError("invalid token")  # none, or an algorithm with no key for it
        viewer = header.get("typ") == "viewer+jwt"
        options = {"require": ["exp", "sub"], "verify_aud": bool(self._audience) or viewer}
        try:
            return jwt.decode(
                token,
                key,
                algorithms=[alg],
                audience=VIEWER_AUDIENCE if viewer else self._audience,
                issuer=None if viewer else self._issuer,
                leeway=LEEWAY_SECONDS,
                options=options,  # type: ignore[arg-type]
            )
        except jwt.ExpiredSignatureError:
            raise AuthError("token expired") from None
        except jwt.ImmatureSignatureError:
            raise AuthError("token not valid yet") from None
        except jwt.PyJWTError:  # a bad token, or one the key cannot check (an EC
            # signature where the key is RSA raises a key error, not a token error)
            raise AuthError("invalid token") from None

    def viewer_token(
        self, owner: str, session: str, ttl: int | None = None, scope: ViewScope = ViewScope.FULL
    ) -> tuple[str, int]:
        """A short-lived, read-only token for one session, signed with ``JWT_SECRET``.

        ``scope`` is a claim of the token: what it shows is fixed for its life.
        """
        if not self._secret:
            raise AuthError("viewer tokens need JWT_SECRET on the server", Close.FORBIDDEN)
        import jwt

        lifetime = min(ttl or self.viewer_ttl, self.viewer_ttl)
        expires = int(time.time()) + lifetime
        claims = {
            "sub": owner,
            "sid": session,
            "scope": VIEWER_SCOPE,
            "aud": VIEWER_AUDIENCE,
            "exp": expires,
        }
        if scope is not ViewScope.FULL:
            claims[VIEW_CLAIM] = str(scope)
        return jwt.encode(
            claims, self._secret, algorithm="HS256", headers={"typ": "viewer+jwt"}
        ), expires


def _scope(claims: Mapping[str, Any]) -> ViewScope:
    """A viewer token's scope: full without the claim; a value not known is an invalid token."""
    value = claims.get(VIEW_CLAIM, ViewScope.FULL.value)
    if not isinstance(value, str) or value not in SCOPES:
        raise AuthError("invalid token")
    return ViewScope(value)


def _named(claims: Mapping[str, Any], name: str) -> str:
    """A claim that names someone or something: a non-empty string, or the token is invalid."""
    value = claims.get(name)
    if not isinstance(value, str) or not value:
        raise AuthError("invalid token")
    return value


def mint(secret: str, user: str, ttl: int) -> str:
    """A development token for ``user`` (``thoughtwire token``)."""
    import jwt

    now = int(time.time())
    return jwt.encode({"sub": user, "iat": now, "exp": now + ttl}, secret, algorithm="HS256")


def token_from(
    query: Mapping[str, str], headers: Mapping[str, str]
) -> tuple[str | None, str | None]:
    """``(token, subprotocol to accept)`` from a request's query, Authorization or subprotocols."""
    offered = [p.strip() for p in headers.get("sec-websocket-protocol", "").split(",") if p.strip()]
    for protocol in offered:
        if protocol.startswith(BEARER_PROTOCOL):
            return protocol[len(BEARER_PROTOCOL) :], SUBPROTOCOL if SUBPROTOCOL in offered else None
    accept = SUBPROTOCOL if SUBPROTOCOL in offered else None
    authorization = headers.get("authorization", "")
    if authorization.lower().startswith("bearer "):
        return authorization[7:].strip(), accept
    return query.get("token"), accept


LOOPBACK_HOSTS = frozenset({"localhost", "127.0.0.1", "[::1]"})
HOST_REFUSAL = "host not allowed: set THOUGHTWIRE_ALLOWED_HOSTS"


def host_allowed(headers: Mapping[str, str], settings: Settings) -> bool:
    """DNS-rebinding guard: the ``Host`` a request names must be one this frontend serves.

    A page on ``attacker.example`` whose name is made to resolve to 127.0.0.1 reaches
    a local frontend with ``Host`` and ``Origin`` both its own, so comparing the two
    proves nothing; the Host itself must be checked. Loopback names (any port) and
    ``THOUGHTWIRE_ALLOWED_HOSTS`` (``*``: any) always pass. Without authentication
    nothing else does; with it, any Host passes unless the setting names some.
    """
    allowed = settings.hosts
    if "*" in allowed or (settings.auth_enabled and not allowed):
        return True
    host = headers.get("host", "").strip().lower()
    name = _host_name(host)
    return name in LOOPBACK_HOSTS or name in allowed or host in allowed


def _host_name(host: str) -> str:
    """``host[:port]`` without its port; an IPv6 address keeps its brackets."""
    if host.startswith("["):
        return host[: host.find("]") + 1] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


ORIGIN_REFUSAL = "origin not allowed: set THOUGHTWIRE_ALLOWED_ORIGINS"
# Refused origins already warned about: each is logged once, and at most this many are
# remembered, as the Origin header is the requester's to choose (as api.lane does for hosts).
WARNED_ORIGINS = 64
_warned_origins: set[str] = set()


def origin_allowed(headers: Mapping[str, str], settings: Settings) -> bool:
    """Cross-site WebSocket hijacking guard: a browser's Origin must be allowed.

    Clients that send no Origin (not browsers) pass. Pages served by this frontend
    (same host) pass: the Host they are compared with has passed :func:`host_allowed`
    first, so an attacker cannot choose both. Others must be in
    ``THOUGHTWIRE_ALLOWED_ORIGINS`` (``*``: any), or be ``null`` or loopback origins
    where ``THOUGHTWIRE_ALLOW_LOCAL_ORIGINS`` is on.
    """
    origin = headers.get("origin")
    if not origin:
        return True
    allowed = settings.origins
    if "*" in allowed or origin.rstrip("/") in allowed:
        return True
    if settings.local_origins and local_origin(origin):
        return True
    host = headers.get("host", "")
    return origin.split("://", 1)[-1].rstrip("/") == host


def local_origin(origin: str) -> bool:
    """``null`` (a page opened from a file, or sandboxed) or http(s) on a loopback name."""
    if origin == "null":
        return True
    scheme, sep, rest = origin.lower().partition("://")
    if scheme not in ("http", "https") or not sep:
        return False
    host = rest.rstrip("/")
    name = _host_name(host)
    port = host[len(name) :]  # "" or ":<digits>"
    return name in LOOPBACK_HOSTS and (not port or (port[0] == ":" and port[1:].isdigit()))


def check_origin(headers: Mapping[str, str], settings: Settings, code: int) -> None:
    """Refuse a browser page of an origin that is not allowed, saying which setting allows it."""
    if origin_allowed(headers, settings):
        return
    origin = headers.get("origin", "")[:100]
    if origin not in _warned_origins and len(_warned_origins) < WARNED_ORIGINS:
        _warned_origins.add(origin)
        hint = (
            " (or THOUGHTWIRE_ALLOW_LOCAL_ORIGINS=1 for file:// and localhost pages)"
            if local_origin(origin)
            else ""
        )
        logger.warning(
            "refused a browser page from origin %r: if it should reach this frontend, "
            "add it to THOUGHTWIRE_ALLOWED_ORIGINS%s",
            origin,
            hint,
        )
    raise AuthError(ORIGIN_REFUSAL, code)
