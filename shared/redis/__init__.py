"""Everything that speaks to Redis: connections, RESP, the pipeline and the pub/sub link.

This folder is the only code that opens a Redis connection or knows redis-py's and
hiredis' internals (tests/test_layout.py holds everyone else to it); the rest of the
code reaches Redis through the names re-exported here.

- :mod:`thoughtwire.shared.redis.connections`: :class:`RedisFactory`, the one place that decides
  how to reach Redis (one server, or the embedded in-process one; the seam for Cluster
  and Sentinel).
- :mod:`thoughtwire.shared.redis.resp`: the RESP encoder and the reply-reader core the two
  connections below share.
- :mod:`thoughtwire.shared.redis.pipeline`: :class:`Batcher`, many callers' calls in one round trip.
- :mod:`thoughtwire.shared.redis.pubsub`: the hub's pub/sub link, and one channel's messages (a
  worker's control channel).
- :mod:`thoughtwire.shared.redis.cluster`: Redis Cluster: its client, sharded channels, and the
  hub's link across masters.
"""

from __future__ import annotations

from redis.asyncio import Redis
from redis.commands.core import AsyncScript as Script
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoPermissionError, RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from thoughtwire.shared.redis.cluster import is_cluster, register_script, sharded
from thoughtwire.shared.redis.connections import RedisFactory
from thoughtwire.shared.redis.pipeline import Batcher

# Errors that mean "Redis is not there right now", as opposed to a refused command.
UNREACHABLE = (RedisConnectionError, RedisTimeoutError)

__all__ = [
    "UNREACHABLE",
    "Batcher",
    "NoPermissionError",
    "Redis",
    "RedisConnectionError",
    "RedisError",
    "RedisFactory",
    "RedisTimeoutError",
    "ResponseError",
    "Script",
    "is_cluster",
    "register_script",
    "sharded",
]
