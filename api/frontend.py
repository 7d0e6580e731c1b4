"""A frontend process's state: its Redis clients, bus and hub, owned by one lifespan."""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from redis.asyncio import Redis
from redis.exceptions import RedisError

from api.hub import Hub
from shared.bus import Bus
from shared.connections import RedisFactory
from shared.keys import Keys
from shared.protocol import Job
from shared.settings import Settings

READY_TIMEOUT = 2.0


def new_id() -> str:
    """A fresh session or run id: 16 characters of [A-Za-z0-9_-]."""
    return secrets.token_urlsafe(12)


@dataclass
class Frontend:
    """What every socket handler needs; one per process, built by :func:`running`."""

    settings: Settings
    keys: Keys
    redis: Redis
    bus: Bus
    hub: Hub
    node: str
    draining: bool = field(default=False)

    async def start_run(self, session: str, prompt: str, agent: str | None = None) -> str:
        """Queue a prompt for the workers; returns the run id."""
        run = new_id()
        await self.bus.submit(Job(run=run, session=session, prompt=prompt, agent=agent))
        return run

    async def ready(self) -> bool:
        """Redis answers and this frontend is not draining."""
        if self.draining or not self.hub.healthy:
            return False
        try:
            async with asyncio.timeout(READY_TIMEOUT):
                await self.redis.ping()
        except (TimeoutError, RedisError, OSError):
            return False
        return True


@contextlib.asynccontextmanager
async def running(settings: Settings, factory: RedisFactory) -> AsyncIterator[Frontend]:
    """Open the clients and start the hub; tear down in reverse order."""
    keys = Keys(settings.key_prefix)
    node = new_id()
    redis = factory.commands()
    hub = Hub(factory.pubsub, keys.node_channel(node))
    try:
        await hub.start()
        bus = Bus(redis, keys, log_maxlen=settings.log_maxlen, log_ttl=settings.log_ttl)
        frontend = Frontend(settings=settings, keys=keys, redis=redis, bus=bus, hub=hub, node=node)
        yield frontend
        frontend.draining = True
    finally:
        await hub.close()
        await redis.aclose()
