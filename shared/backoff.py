"""Capped exponential backoff with full jitter, and a retry helper built on it."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import TypeVar

from thoughtwire.shared.redis import RedisConnectionError, RedisTimeoutError

T = TypeVar("T")

# Errors that mean "Redis is not there right now", as opposed to a bad command.
UNAVAILABLE = (RedisConnectionError, RedisTimeoutError, ConnectionError, OSError)


def delays(first: float = 0.05, cap: float = 2.0) -> Iterator[float]:
    """first, 2*first, 4*first, ... capped, each scaled by a random factor in [0.5, 1]."""
    delay = first
    while True:
        yield delay * random.uniform(0.5, 1.0)
        delay = min(delay * 2, cap)


async def retry(op: Callable[[], Awaitable[T]], *, seconds: float) -> T:
    """Run ``op`` until it does not fail with an :data:`UNAVAILABLE` error, for at most
    ``seconds``; then the last error is raised."""
    deadline = time.monotonic() + seconds
    backoff: Iterator[float] | None = None  # made on the first failure: most calls succeed
    while True:
        try:
            return await op()
        except UNAVAILABLE:
            backoff = backoff or delays()
            delay = next(backoff)
            if time.monotonic() + delay > deadline:
                raise
        await asyncio.sleep(delay)
