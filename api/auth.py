"""Token checks for authenticated sockets (HS256 with ``JWT_SECRET``)."""

from __future__ import annotations

import jwt

LEEWAY_SECONDS = 10


class AuthError(Exception):
    """The token cannot be accepted; the message is safe to show the client."""


def verify(token: str | None, secret: str | None) -> str:
    """Return the user a token names, or raise :class:`AuthError`.

    The algorithm is pinned to HS256, so ``alg: none`` and algorithm confusion
    cannot get through. The user is ``sub`` (or the seed's ``user_id``).
    """
    if not secret:
        raise AuthError("authentication is not configured on this server")
    if not token:
        raise AuthError("missing token")
    try:
        claims = jwt.decode(token, secret, algorithms=["HS256"], leeway=LEEWAY_SECONDS)
    except jwt.ExpiredSignatureError:
        raise AuthError("token expired") from None
    except jwt.InvalidTokenError:
        raise AuthError("invalid token") from None
    user = claims.get("sub") or claims.get("user_id")
    if not isinstance(user, str) or not user:
        raise AuthError("token names no user")
    return user
