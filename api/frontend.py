"""A frontend process's state: its Redis clients, bus and hub, owned by one lifespan."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from functools import partial
from typing import Literal

from thoughtwire.api.auth import Authenticator, Principal
from thoughtwire.api.guard import SOCKET_REFRESH_SECONDS, Guard
from thoughtwire.api.hub import Hub
from thoughtwire.api.presence import Watching
from thoughtwire.api.runs import Runs
from thoughtwire.shared.backoff import UNAVAILABLE, retry
from thoughtwire.shared.bus import SUBMIT_RETRY_SECONDS, Bus, Busy, Keyed, KeyReused, NotKeyed
from thoughtwire.shared.closecodes import Close
from thoughtwire.shared.keys import Keys
from thoughtwire.shared.protocol import Job
from thoughtwire.shared.redis import Redis, RedisError, RedisFactory
from thoughtwire.shared.redis.pubsub import open_link
from thoughtwire.shared.settings import Settings
from thoughtwire.shared.vocab import DecidedBy, Decision, Multitask, OnDisconnect

logger = logging.getLogger("thoughtwire.frontend")

READY_TIMEOUT = 1.0  # Redis (behind Sentinel: the master) answers a PING within this
READY_CACHE = 1.0  # seconds a PING's outcome answers /readyz: probes do not hammer Redis
DRAIN_BATCHES = 10
WITHDRAW_SECONDS = 1.0  # one try at withdrawing a run never queued; workers end it otherwise


def new_id() -> str:
    """A fresh session or run id: 16 characters of [A-Za-z0-9_-]."""
    return secrets.token_urlsafe(12)


@dataclass
class Frontend:
    """What every socket handler needs; one per process, built by :func:`running`."""

    settings: Settings
    redis: Redis
    bus: Bus
    hub: Hub
    node: str
    auth: Authenticator
    guard: Guard
    # The runs this frontend queued, until they end: it ends those Redis lost (api/runs.py).
    runs: Runs
    draining: bool = field(default=False)
    # Who watches each session, counted here and summed in Redis (api/presence.py).
    presence: Watching | None = field(default=None)
    # Withdrawals of runs admitted but not queued, until they end (each bounded: 1 s).
    withdrawals: set[asyncio.Task[None]] = field(default_factory=set)
    # When Redis was last asked for /readyz, and whether it answered.
    pinged: tuple[float, bool] | None = field(default=None)
    # Sockets and event streams open now, by endpoint and transport (api/metrics.py).
    open_sockets: Counter[tuple[str, str]] = field(default_factory=Counter)

    async def start_run(
        self,
        principal: Principal,
        session: str,
        prompt: str,
        agent: str | None = None,
        *,
        on_disconnect: OnDisconnect = OnDisconnect.CONTINUE,
        idempotency_key: str | None = None,
        multitask: Multitask | None = None,
        keyed: Keyed | Literal[False] | None = False,
    ) -> tuple[str, str, bool]:
        """Queue a prompt, if the principal may; returns ``(run, session, created)``.
        ``keyed``: what the idempotency key names, if the caller has looked it up
        (:meth:`keyed_run`) just before; False: not looked up yet.

        Raises :class:`~thoughtwire.shared.bus.Busy` for a ``reject`` prompt while the
        session has an unfinished run (``multitask`` None: the configured default), and
        :class:`~thoughtwire.shared.bus.KeyReused` for a key taken by a different prompt.
        """
        await self.guard.check_write(principal, session)
        await self.guard.check_budget(principal)  # budget: refused before anything is queued
        if idempotency_key is None:
            keyed = None
        elif keyed is False:
            keyed = await self.keyed_run(principal, idempotency_key)
        job = Job(
            run=new_id(),
            session=session,
            prompt=prompt,
            agent=agent,
            on_disconnect=on_disconnect,
            user=principal.user if self.guard.enabled else None,
            multitask=multitask or Multitask(self.settings.multitask),
        )
        if keyed is not None:
            if not keyed.names(job):
                raise KeyReused(idempotency_key or "")
            with contextlib.suppress(NotKeyed):  # freed since: a new prompt after all
                return await self._submit(job, principal, idempotency_key, keyed)
        return await self._submit(job, principal, idempotency_key, None)

    async def keyed_run(self, principal: Principal, idempotency_key: str) -> Keyed | None:
        """The run ``principal``'s idempotency key names, if any; riding through a Redis
        blip as a submit does (``SUBMIT_RETRY_SECONDS``)."""
        return await retry(
            partial(self.bus.keyed_run, principal.user, idempotency_key),
            seconds=SUBMIT_RETRY_SECONDS,
        )

    async def _submit(
        self, job: Job, principal: Principal, idempotency_key: str | None, keyed: Keyed | None
    ) -> tuple[str, str, bool]:
        """Take the prompt's run slot and queue ``job``; ``keyed``: the run its key named.

        The slot is a new run's; or, for a prompt sent again for a run its first frontend
        admitted and lost, that run's own (taken again while held, it is not counted
        twice; lapsed, it is taken anew, under the limit); or none for a plain repeat.
        """
        lost = keyed is not None and keyed.lost and keyed.session == job.session
        slot = job.run if keyed is None else keyed.run if lost else None
        if slot is not None:
            await self.guard.take_run(principal, slot)
        try:
            # Retrying may queue the job twice if a reply was lost; the run's state
            # lets only one of the copies run.
            submitted = await retry(
                partial(
                    self.bus.submit,
                    job,
                    idempotency_key,
                    user=principal.user,
                    repeat=keyed is not None,
                ),
                seconds=SUBMIT_RETRY_SECONDS,
            )
        except (Busy, NotKeyed, KeyReused):
            if slot is not None:
                await self.guard.free_run(job.user, slot)  # refused: nothing of it was kept
            raise
        except BaseException:
            # Whatever stopped it (Redis away past the retries, the socket closed, drained
            # or its token expired while the submit retried), the run may have been
            # admitted: withdraw it, or the session's next runs wait for it.
            mine = job.user if slot == job.run else None
            await self._withdraw(job, idempotency_key, principal.user, mine)
            raise
        if not submitted[2] and slot == job.run:  # a repeat after all: no new run
            await self.guard.free_run(job.user, job.run)
        elif slot is not None and slot != job.run:
            await self._free_if_ended(job.user, submitted[1], slot)
        self.runs.follow(submitted[1], submitted[0], job.user)
        return submitted

    async def _free_if_ended(self, user: str | None, session: str, run: str) -> None:
        """Give back the slot a prompt sent again took for its lost ``run``, if that run has
        ended meanwhile (as never queued: that end gave the slot back before this prompt
        took it again); a run this prompt queued, or that runs, keeps it until its end.
        Unanswered, the slot lapses."""
        with contextlib.suppress(*UNAVAILABLE, RedisError):
            if await self.bus.run_ended(session, run):
                await self.guard.free_run(user, run)

    async def _withdraw(
        self, job: Job, idempotency_key: str | None, user: str, slot: str | None
    ) -> None:
        """Queueing ``job`` failed, maybe after its run was admitted: end that run, so the
        session's next runs do not wait for it, and give its run slot (``slot``'s) back.

        One try, bounded, and shielded: a second cancel of the caller (a socket closed
        while it drains) does not cut it short; it goes on in a task the frontend keeps.
        If it fails too, the workers, or the session's next ``reject`` prompt, end the run
        once it has gone unqueued too long (``Bus.never_queued``).
        """
        task = asyncio.create_task(self._withdraw_once(job, idempotency_key, user, slot))
        self.withdrawals.add(task)
        task.add_done_callback(self.withdrawals.discard)
        await asyncio.shield(task)

    async def _withdraw_once(
        self, job: Job, idempotency_key: str | None, user: str, slot: str | None
    ) -> None:
        try:
            async with asyncio.timeout(WITHDRAW_SECONDS):
                withdrawn = await self.bus.withdraw(job, idempotency_key, user=user)
                if withdrawn:
                    logger.warning("run %s: admitted but not queued; withdrawn", job.run)
                # Its job reached the stream after all and a worker started it: the slot
                # stays with the run, whose end gives it back.
                if withdrawn or await self.bus.run_ended(job.session, job.run):
                    await self.guard.free_run(slot, job.run)
        except (TimeoutError, *UNAVAILABLE, RedisError) as exc:
            logger.warning("run %s: not queued, and not withdrawn either (%r)", job.run, exc)

    async def approve(
        self, principal: Principal, run: str, call_id: str, decision: Decision, reason: str | None
    ) -> bool:
        """Answer the approval ``run`` waits for on ``call_id``, if the principal may write
        its session (4003 / 403 otherwise); False when it waits for none."""
        self.guard.check_writer(principal)
        session = await self.bus.run_session(run)
        if session is None:
            return False
        await self.guard.check_write(principal, session)
        return await self.bus.decide(session, run, call_id, decision, reason, DecidedBy.USER)

    async def refresh_sockets(self) -> None:
        """Keep the connection slots (sockets, SSE streams) held here alive, while it lives."""
        while True:
            await asyncio.sleep(SOCKET_REFRESH_SECONDS)
            # A missed refresh is made up by the next: a slot outlasts two missed ones.
            with contextlib.suppress(RedisError, OSError):
                await self.guard.refresh_sockets()

    async def drain(self) -> None:
        """Stop taking sockets, then tell every open one to reconnect elsewhere.

        ``/readyz`` turns 503 at once. Sockets get ``reconnect`` and close 1012 in
        batches spread over ``drain_window``, so the other frontends are not hit by
        all of them in the same instant.
        """
        self.draining = True
        viewers = list(self.hub.viewers())
        batches = min(DRAIN_BATCHES, len(viewers)) or 1
        pause = self.settings.drain_window / batches
        for i in range(batches):
            for viewer in viewers[i::batches]:
                viewer.close(Close.RESTART, "frontend restarting; reconnect and resume")
            await asyncio.sleep(pause)

    async def ready(self) -> bool:
        """Redis answers (behind Sentinel: the master) and this frontend is not draining.

        Redis is asked at most once every READY_CACHE seconds, however often probes come;
        a pub/sub link that is down says "not ready" at once.
        """
        if self.draining or not self.hub.healthy:
            return False
        if self.pinged is not None and time.monotonic() - self.pinged[0] < READY_CACHE:
            return self.pinged[1]
        try:
            async with asyncio.timeout(READY_TIMEOUT):
                await self.redis.ping()
            answered = True
        except (TimeoutError, RedisError, OSError):
            answered = False
        self.pinged = (time.monotonic(), answered)
        return answered


@contextlib.asynccontextmanager
async def running(settings: Settings, factory: RedisFactory) -> AsyncIterator[Frontend]:
    """Open the clients and start the hub; tear down in reverse order."""
    node = new_id()
    redis = factory.commands()
    bus = Bus(
        redis, Keys(settings.key_prefix), log_maxlen=settings.log_maxlen, log_ttl=settings.log_ttl
    )
    hub = Hub(
        partial(open_link, factory),
        bus.node_channel(node),
        publish=bus.publish,
        probe_interval=settings.pubsub_probe_interval,
        probe_channel=partial(bus.probe_channel, node),
    )
    refresher: asyncio.Task[None] | None = None
    watcher: asyncio.Task[None] | None = None
    presence: asyncio.Task[None] | None = None
    frontend: Frontend | None = None
    try:
        await hub.start()
        await bus.check_incarnations()  # warns if a failover's lost writes go unseen
        frontend = Frontend(
            settings=settings,
            redis=redis,
            bus=bus,
            hub=hub,
            node=node,
            auth=Authenticator(settings),
            guard=Guard(settings, bus),
            runs=Runs(bus, limit=settings.tracked_runs, lease_seconds=settings.lease_seconds),
            presence=Watching(bus.presence, node, settings),
        )
        assert frontend.presence is not None
        presence = asyncio.create_task(frontend.presence.run(), name="presence")
        refresher = asyncio.create_task(frontend.refresh_sockets(), name="socket-slots")
        await hub.join(bus.runs_ended, frontend.runs)  # runs that end are let go at once
        watcher = asyncio.create_task(frontend.runs.watch(), name="lost-runs")
        yield frontend
        frontend.draining = True
    finally:
        if refresher is not None:
            refresher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await refresher
        if watcher is not None:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher
        if presence is not None:
            presence.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await presence
            assert frontend is not None and frontend.presence is not None
            await frontend.presence.close()
        if frontend is not None and frontend.withdrawals:
            await asyncio.wait(set(frontend.withdrawals))  # each is bounded: WITHDRAW_SECONDS
        await hub.close()
        await redis.aclose()
