"""Worker processes: ``thoughtwire worker``, and the embedded mode's in-process workers."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import AsyncIterator
from functools import partial

from thoughtwire.shared import loops
from thoughtwire.shared.bus import Bus
from thoughtwire.shared.grants import Budget
from thoughtwire.shared.keys import Keys
from thoughtwire.shared.redis import RedisFactory
from thoughtwire.shared.redis.pubsub import channel_messages
from thoughtwire.shared.settings import Settings
from thoughtwire.shared.vocab import Decision
from thoughtwire.worker import metrics
from thoughtwire.worker.agents import build_agents
from thoughtwire.worker.approvals import ApprovalPolicy
from thoughtwire.worker.attempt import RunLimits
from thoughtwire.worker.runner import Worker

logger = logging.getLogger("thoughtwire.worker")


async def serve(
    settings: Settings, factory: RedisFactory, stop: asyncio.Event, *, metrics_port: int = 0
) -> None:
    """Run one worker until ``stop`` is set; with metrics on, its metrics port too
    (``metrics_port``; 0: none, as for the embedded mode's, whose frontend serves them)."""
    redis = factory.commands()
    try:
        bus = Bus(
            redis,
            Keys(settings.key_prefix),
            log_maxlen=settings.log_maxlen,
            log_ttl=settings.log_ttl,
            wait_replicas=settings.redis_wait_replicas,
            wait_timeout_ms=settings.redis_wait_timeout_ms,
        )
        limits = RunLimits(
            lease_ms=int(settings.lease_seconds * 1000),
            redis_retry_seconds=settings.redis_retry_seconds,
            disconnect_grace=settings.disconnect_grace,
            coalesce_window=settings.coalesce_ms / 1000,
            memory_turns=settings.memory_turns,
            approval=ApprovalPolicy(
                settings.approval_timeout,
                Decision(settings.approval_default),
                settings.redis_retry_seconds,
            ),
            budget=Budget(settings.budget_tokens_per_minute, settings.budget_tokens_per_day),
        )
        worker = Worker(
            bus,
            build_agents(settings),
            settings.agent,
            concurrency=settings.worker_concurrency,
            limits=limits,
            max_attempts=settings.max_attempts,
            listen=partial(channel_messages, factory),
        )
        logger.info("%s claiming jobs (agent: %s)", worker.name, settings.agent)
        if settings.metrics:
            metrics.install()
        probes = metrics.Probes(
            asyncio.get_running_loop(),
            bus,
            lambda: worker.consuming and not stop.is_set(),
            metrics_on=settings.metrics,
        )
        async with metrics.serving(metrics_port, probes):
            await worker.run(stop, drain_timeout=settings.drain_timeout)
        ran = ", ".join(f"{n} {outcome}" for outcome, n in worker.outcomes.items()) or "none"
        logger.info("%s stopped; runs: %s", worker.name, ran)
    finally:
        await redis.aclose()


def main(settings: Settings) -> None:
    """The ``thoughtwire worker`` process: SIGTERM and SIGINT only set the stop flag."""

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        factory = RedisFactory(settings)
        async with factory.following():  # behind Sentinel: the master, across failovers
            await serve(settings, factory, stop, metrics_port=settings.metrics_port)

    loops.run(run())


@contextlib.asynccontextmanager
async def in_process(settings: Settings, factory: RedisFactory, count: int) -> AsyncIterator[None]:
    """Run ``count`` workers as tasks beside a frontend, on the same Redis."""
    stop = asyncio.Event()
    tasks = [
        asyncio.create_task(serve(settings, factory, stop), name=f"worker-{i}")
        for i in range(count)
    ]
    try:
        yield
    finally:
        stop.set()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        for result in results:
            if isinstance(result, Exception):
                logger.error("in-process worker failed", exc_info=result)
