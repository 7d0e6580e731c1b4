"""Backoff and retry: how long a caller keeps trying while Redis is away."""

import pytest
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError

from thoughtwire.shared.backoff import delays, retry


def test_delays_double_up_to_the_cap_with_jitter():
    gaps = [d for d, _ in zip(delays(0.1, cap=0.8), range(6), strict=False)]
    for gap, base in zip(gaps, [0.1, 0.2, 0.4, 0.8, 0.8, 0.8], strict=True):
        assert base / 2 <= gap <= base


async def test_retry_goes_on_while_redis_is_away_and_returns_the_first_success():
    calls = []

    async def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise RedisConnectionError("connection refused")
        return "ok"

    assert await retry(flaky, seconds=5) == "ok"
    assert len(calls) == 3


async def test_retry_gives_up_at_its_deadline_and_never_retries_a_refused_command():
    async def away():
        raise RedisConnectionError("connection refused")

    with pytest.raises(RedisConnectionError):
        await retry(away, seconds=0.05)

    calls = []

    async def refused():
        calls.append(1)
        raise ResponseError("WRONGTYPE")

    with pytest.raises(ResponseError):
        await retry(refused, seconds=5)
    assert len(calls) == 1
