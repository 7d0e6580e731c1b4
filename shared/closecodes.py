"""WebSocket close codes and ``error`` reply codes, and what a client should do about each.

``RECONNECT`` codes mean "come back (to any frontend) and resume"; the others are
terminal until the client changes something (its token, its behaviour).
"""

from __future__ import annotations

from enum import IntEnum, StrEnum


class Close(IntEnum):
    """WebSocket close codes, each with what the client should do about it."""

    NORMAL = 1000  # the client or server finished; do not reconnect
    GOING_AWAY = 1001  # the frontend is stopping; reconnect
    POLICY = 1008  # the client broke a protocol rule; terminal
    TOO_BIG = 1009  # a frame exceeded the size limit; terminal for that frame
    INTERNAL = 1011  # unexpected server failure; reconnect with backoff
    RESTART = 1012  # the frontend is restarting (deploy); reconnect at once
    TRY_LATER = 1013  # the frontend cannot serve now (Redis down); reconnect with backoff
    UNAUTHORIZED = 4001  # missing, invalid or expired token; get a new token first
    FORBIDDEN = 4003  # the token does not grant this; terminal
    SLOW = 4008  # the client fell behind its send queue; reconnect and resume
    RATE_LIMITED = 4029  # too many requests; reconnect after a pause


RECONNECT = frozenset(
    {
        Close.GOING_AWAY,
        Close.INTERNAL,
        Close.RESTART,
        Close.TRY_LATER,
        Close.SLOW,
        Close.RATE_LIMITED,
    }
)


class ErrorCode(StrEnum):
    """The ``code`` of an ``error`` reply: the socket stays open unless a close follows."""

    BAD_JSON = "bad_json"  # a frame starting with '{' is not JSON; fix the client
    BAD_MESSAGE = "bad_message"  # a field of the wrong type, a bad id or position; fix it
    UNKNOWN_TYPE = "unknown_type"  # a message type the protocol does not have
    EMPTY_PROMPT = "empty_prompt"  # an empty or blank prompt
    TOO_LONG = "too_long"  # a prompt over max_prompt_chars; send a shorter one
    BAD_FRAME = "bad_frame"  # a binary frame; send text
    UNSUPPORTED = "unsupported"  # a message this endpoint does not take
    NOT_CONNECTED = "not_connected"  # a personal message to a client id nobody holds
    RATE_LIMITED = "rate_limited"  # over a per-user limit; slow down, then send it again
    UNAVAILABLE = "unavailable"  # Redis is briefly unreachable; send it again
    TOKEN_EXPIRED = "token_expired"  # an SSE stream's token expired; get a new one
    BUSY = "busy"  # a prompt with multitask "reject" while the session has an unfinished run
    BUDGET = "budget"  # the user's token budget is spent; wait for it to refill
    NOT_WAITING = "not_waiting"  # an approval for a call that is not waiting (or was decided)
