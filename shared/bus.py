"""The bus: the contract between frontends and workers, and its Redis implementation.

Guarantees:

* **Jobs** go into one Redis Stream read by a consumer group. A job is acknowledged
  (and deleted) only when its run has ended. While it runs, its worker renews a
  lease; a job whose lease lapsed is claimed by another worker and run again as a
  new attempt, and every write of an attempt is fenced (:mod:`thoughtwire.shared.scripts`).
* **Events** of a session are numbered ``seq`` = 1, 2, 3, ... with no gaps within an
  ``epoch``. Each one is appended to the session's log (a stream bounded by MAXLEN
  and a TTL) and published on the session's channel in one atomic script, so the
  log and the live channel never disagree on order or content.
* **Runs of a session** run one at a time, in the order they were admitted, whichever
  frontend admitted them and whichever worker takes them (``ADMIT`` and ``START``,
  :mod:`thoughtwire.shared.scripts`; the waiting side is :mod:`thoughtwire.worker.parking`).
* **Live delivery** over pub/sub is at-most-once. Frontends fill holes from the log
  (:mod:`thoughtwire.api.recovery`), which is why every event carries its position.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import orjson

from thoughtwire.shared import scripts, tracing
from thoughtwire.shared.closecodes import ErrorCode
from thoughtwire.shared.grants import Grants
from thoughtwire.shared.keys import Keys
from thoughtwire.shared.presence import Presence
from thoughtwire.shared.protocol import Job, ProtocolError, Thought, encode_event_head
from thoughtwire.shared.redis import (
    Batcher,
    NoPermissionError,
    Redis,
    RedisError,
    ResponseError,
    is_cluster,
    register_script,
    sharded,
)
from thoughtwire.shared.redis import Script as AsyncScript
from thoughtwire.shared.vocab import Multitask, RunStatus, Verdict

logger = logging.getLogger("thoughtwire.bus")

FENCED = -1  # what an append returns to an attempt that lost its lease

# How long a frontend retries queueing a job while Redis is away (:meth:`Bus.submit`);
# a run admitted that long ago and still without its job record was never queued.
SUBMIT_RETRY_SECONDS = 5.0
NOT_QUEUED_MESSAGE = "the run could not be queued: the service was unavailable; try again"
# A queued run without a job record for this long was never queued: three times the
# frontend's retry window, so a submit still retrying (its last try may hang a while on a
# Redis that went silent) is long over. Workers and ``reject`` admissions end such runs.
NEVER_QUEUED_SECONDS = 3 * SUBMIT_RETRY_SECONDS
NEVER_QUEUED_MESSAGE = "the run was lost: it was never queued; try again"
# A ``reject`` prompt ends at most this many runs never queued ahead of it, then is busy.
NEVER_QUEUED_ENDS = 8


class Busy(Exception):
    """A ``reject`` prompt while its session has an unfinished run (``run``)."""

    def __init__(self, session: str, run: str) -> None:
        super().__init__(f"session {session} has an unfinished run: {run}")
        self.session = session
        self.run = run


class NotKeyed(Exception):
    """A prompt sent again (``Bus.submit(repeat=True)``) whose key names no run any more:
    it was freed (its run withdrawn) or expired since it was looked up."""


class KeyReused(ProtocolError):
    """A prompt under an idempotency key that names a different prompt (another text, or
    another agent): refused as ``bad_message``, and nothing is admitted."""

    def __init__(self, idempotency_key: str) -> None:
        super().__init__(
            ErrorCode.BAD_MESSAGE,
            "that key was used for a different prompt; send this one with a new key",
        )
        self.key = idempotency_key


@dataclass(frozen=True, slots=True)
class Keyed:
    """The run an idempotency key names (``Bus.keyed_run``); ``lost`` when it was admitted
    but its job never reached the stream, so the prompt sent again is to queue it;
    ``digest`` names the prompt it was taken for (None: unknown, as for a key taken by a
    version that kept none)."""

    run: str
    session: str
    lost: bool
    digest: str | None = None

    def names(self, job: Job) -> bool:
        """Whether the key was taken for ``job``'s prompt (its text and agent), as far as
        is known."""
        return self.digest is None or self.digest == prompt_digest(job)


def prompt_digest(job: Job) -> str:
    """What an idempotency key remembers of its prompt, to tell a resend from a reuse."""
    text = f"{job.agent or ''}\0{job.prompt}".encode()
    return hashlib.blake2b(text, digest_size=8).hexdigest()


def _keyed(value: Any, digest: Any) -> Keyed:
    """An idempotency key read back: its value (``run session``) and its digest's
    (``run digest``), which counts only if it names the same run."""
    run, session = _text(value).split(" ", 1)
    digest_run, _, named = _text(digest or b"").partition(" ")
    return Keyed(run, session, False, named if digest_run == run and named else None)


def now_ms() -> int:
    """The wall clock in Unix milliseconds, as the scripts keep time."""
    return time.time_ns() // 1_000_000


def new_token() -> str:
    """A fresh random fencing token."""
    return os.urandom(6).hex()


@dataclass(frozen=True, slots=True)
class Meta:
    """Where a session's log stands: its epoch (None: no log) and its last seq."""

    epoch: str | None
    last_seq: int


@dataclass(frozen=True, slots=True)
class JobsQueue:
    """The jobs stream as a scrape reports it (docs/operations.md, "Metrics")."""

    depth: int  # entries: queued and running, as a finished job is deleted
    pending: int | None  # handed to a worker and not yet acknowledged
    lag: int | None  # not yet handed to any worker (None: Redis cannot tell)


@dataclass(frozen=True, slots=True)
class Attempt:
    """What the start script decided for a claimed job."""

    verdict: Verdict
    attempt: int
    fence: str
    history: list[dict[str, Any]]  # the session's remembered messages, for ``run``
    waits_for: str | None = None  # for ``wait``: the earlier run of the session not ended


class Bus:
    """Queue jobs, append events, publish messages. Shared by frontends and workers."""

    def __init__(
        self,
        redis: Redis,
        keys: Keys,
        *,
        log_maxlen: int,
        log_ttl: int,
        wait_replicas: int = 0,
        wait_timeout_ms: int = 1000,
    ) -> None:
        self.redis = redis
        # The call that ends a run waits (WAIT) for this many replicas, at most this long.
        self._wait = (wait_replicas, wait_timeout_ms)
        self.keys = keys
        self._log_maxlen = log_maxlen
        self._ttl = log_ttl
        self._sharded = is_cluster(redis)  # a Redis Cluster: tagged channels are sharded
        if self._sharded and wait_replicas:
            # A cluster pipeline sends a keyless WAIT to any node, not the script's master.
            logger.warning("THOUGHTWIRE_REDIS_WAIT_REPLICAS is not applied on a Redis Cluster")
            self._wait = (0, wait_timeout_ms)
        self._epoch_seed = os.urandom(2).hex()  # the script adds its clock: a new epoch each time
        # Scripts and the hot paths' commands go out pipelined (shared.redis.pipeline).
        self._batch = Batcher(redis)
        # Session owners, per-user slots and rates; a job leaving the queue frees its run slot.
        self.grants = Grants(redis, keys, self._batch, ttl=log_ttl)
        # Who watches each session, summed across frontends (shared/presence.py).
        self.presence = Presence(redis, keys, self._batch)
        # These publish on the session's channel: sharded on a cluster (shared/redis/cluster.py).
        self._append = register_script(redis, scripts.APPEND)
        # Calls that do not end a run, of many sessions, share a script run (per master).
        self._append_many = register_script(redis, scripts.APPEND_MANY, cross_slot=True)
        self._append_common = (log_maxlen, log_ttl, self._epoch_seed, keys.runs_ended)
        self._start = redis.register_script(scripts.START)
        self._renew = redis.register_script(scripts.RENEW)
        self._end_lost = register_script(redis, scripts.END_LOST)
        self._withdraw = register_script(redis, scripts.WITHDRAW)
        self._take_key_script = redis.register_script(scripts.TAKE_KEY)
        self._release = redis.register_script(scripts.RELEASE)
        self._cancel = redis.register_script(scripts.CANCEL)
        self._admit = redis.register_script(scripts.ADMIT)
        self._dequeue = redis.register_script(scripts.DEQUEUE)
        self._await_approval = redis.register_script(scripts.AWAIT_APPROVAL)
        self._decide = redis.register_script(scripts.DECIDE)
        self._save_snapshot = redis.register_script(scripts.SAVE_SNAPSHOT)

    # --- jobs: the frontend's side -----------------------------------------

    async def submit(
        self,
        job: Job,
        idempotency_key: str | None = None,
        *,
        user: str | None = None,
        repeat: bool = False,
    ) -> tuple[str, str, bool]:
        """Admit and queue a job; returns ``(run, session, created)``.

        The job's ``multitask`` says what happens while its session has an unfinished
        run: ``reject`` raises :class:`Busy`; ``interrupt`` cancels those runs; both
        ``enqueue`` and ``interrupt`` run it after them (``ADMIT``, atomic per session).

        With an idempotency key, the first job ``user`` submitted under it is returned
        for as long as results are kept, and no new run is made; if that run was admitted
        but its job never reached the stream, this job is queued for it. Keys are per
        user: another user's job under the same key is never returned. With ``repeat``
        (the caller saw the key name a run, and holds no run slot for a new one), a key
        that names no run any more raises :class:`NotKeyed` and nothing is admitted. A
        key that names a different prompt raises :class:`KeyReused`.
        """
        if job.traceparent is None and (context := tracing.traceparent()) is not None:
            job = replace(job, traceparent=context)  # the trace goes on in the worker
        created = True
        if idempotency_key is not None:
            if user is None:
                raise ValueError("an idempotency key needs the user who chose it")
            named = await self._take_key(job, user, idempotency_key, repeat)
            if named is not None and not named.lost:
                return named.run, named.session, False
            if named is not None:
                # Its first sender's frontend admitted it and went (killed, or cut off from
                # Redis) before queueing its job: the prompt, sent again, queues it (its
                # admission, repeated, changes nothing and names the runs an ``interrupt``
                # cancels). Were that frontend only slow, its job comes too, and whichever
                # a worker starts second finds the run taken (``START``) and lets it go.
                job, created = replace(job, run=named.run), False
        earlier = await self._admit_run(job)
        if isinstance(earlier, Busy):
            if created and idempotency_key is not None and user is not None:
                await self._forget_key(user, idempotency_key, job)
            raise earlier
        await self._queue_job(job)
        if job.multitask == Multitask.INTERRUPT and earlier:
            await self._cancel_runs(job.session, earlier)
        return job.run, job.session, created

    async def _take_key(
        self, job: Job, user: str, idempotency_key: str, repeat: bool
    ) -> Keyed | None:
        """Take ``user``'s idempotency key for ``job``; or the run it already names (None
        when it is ``job``'s own: a retry of this very call, which queues it again, as the
        first try may not have). ``lost`` only for a run of ``job``'s session, queued by
        nobody yet. See :meth:`submit` for ``repeat``."""
        keys = (
            self.keys.idempotency(user, idempotency_key),
            self.keys.idempotency_prompt(user, idempotency_key),
        )
        values = (f"{job.run} {job.session}", f"{job.run} {prompt_digest(job)}")
        taken, value, digest = await self._script(self._take_key_script, keys, (*values, self._ttl))
        named = None if taken else _keyed(value, digest)
        # Taken now, or by an earlier try of this very call whose reply was lost.
        if named is None or named.run == job.run:
            if repeat:  # the key was free since it was looked up: not a repeat after all
                await self._forget_key(user, idempotency_key, job)
                raise NotKeyed(idempotency_key)
            return None
        if not named.names(job):
            raise KeyReused(idempotency_key)
        return named if named.session != job.session else await self._with_lost(named)

    async def keyed_run(self, user: str, idempotency_key: str) -> Keyed | None:
        """The run ``user``'s idempotency key names, if it names one yet."""
        held, digest = await self._commands(
            ("GET", self.keys.idempotency(user, idempotency_key)),
            ("GET", self.keys.idempotency_prompt(user, idempotency_key)),
        )
        return None if held is None else await self._with_lost(_keyed(held, digest))

    async def _with_lost(self, named: Keyed) -> Keyed:
        """``named``, ``lost`` if its run was admitted and its job never queued."""
        return replace(named, lost=await self._admitted_at(named.session, named.run) is not None)

    async def _admit_run(self, job: Job) -> list[str] | Busy:
        """The run's record and place in its session's queue, before its job is queued, so
        a worker that takes the job always finds them; the earlier unfinished runs.

        A ``reject`` refused because of a run never queued (:meth:`never_queued`) ends
        that run and asks again: no worker parks a job behind it, as no ``reject`` prompt
        is admitted while it is there, so nobody else would end it for a day.
        """
        for _ in range(NEVER_QUEUED_ENDS):
            admitted = await self._admit_once(job)
            if not isinstance(admitted, Busy):
                return admitted
            if not await self.never_queued(job.session, admitted.run):
                return admitted
            await self.end_never_queued(job.session, admitted.run)
        return admitted

    async def _admit_once(self, job: Job) -> list[str] | Busy:
        keys, session = self.keys, job.session
        verdict, first, *earlier = await self._script(
            self._admit,
            (
                keys.run(session, job.run),
                keys.session_runs(session),
                keys.session_queue(session),
                keys.session_arrivals(session),
            ),
            (job.run, job.multitask, self._ttl, now_ms(), job.user or ""),
        )
        if _text(verdict) == "busy":
            return Busy(session, _text(first))
        return [_text(run) for run in earlier]

    async def _queue_job(self, job: Job) -> None:
        """Put an admitted run's job on the stream, then its record by id.

        In that order, and the record only once the stream took the job: a queued run
        without a record was never put on the stream (or is between the two calls), which
        is what lets a worker end such a run as never queued (worker/parking.py).
        """
        keys = self.keys
        await self._commands(("XADD", keys.jobs, "*", "job", job.encode()))
        await self._commands(("SET", keys.job(job.run), job.session, "EX", self._ttl))

    async def withdraw(
        self, job: Job, idempotency_key: str | None = None, *, user: str | None = None
    ) -> bool:
        """End ``job``'s run, admitted but never queued, with an ``error`` (``WITHDRAW``).

        For a frontend whose :meth:`submit` failed for good, so the session's next runs
        do not wait for it. Acts only while the run is queued and was never started;
        returns whether it wrote. The idempotency key the submit took for it (``user``'s)
        is freed, so sending the prompt again queues it anew; the run slot is the
        caller's to give back, as for any submit that failed.
        """
        error = Thought("error", NOT_QUEUED_MESSAGE, {"code": ErrorCode.UNAVAILABLE})
        if not await self.end_lost(job.session, job.run, error, RunStatus.FAILED, queued=True):
            return False
        if idempotency_key is not None and user is not None:
            await self._forget_key(user, idempotency_key, job)
        return True

    async def never_queued(self, session: str, run: str) -> bool:
        """Whether ``run`` was admitted but its job never reached the stream: it is queued,
        never started, has no job record, and was admitted ``NEVER_QUEUED_SECONDS`` ago.

        Its admission time is the admitting frontend's clock: clocks of frontends that
        disagree by a good part of the bound would make it early or late.
        """
        created = await self._admitted_at(session, run)
        return created is not None and now_ms() - created >= NEVER_QUEUED_SECONDS * 1000

    async def _admitted_at(self, session: str, run: str) -> int | None:
        """When ``run`` was admitted (ms, the admitting frontend's clock), if it is queued,
        was never started and its job never reached the stream (no job record); else None."""
        keys = self.keys
        (status, attempt, created), has_job = await self._commands(
            ("HMGET", keys.run(session, run), "status", "attempt", "created"),
            ("EXISTS", keys.job(run)),
        )
        if has_job or status is None or created is None or _text(status) != RunStatus.QUEUED:
            return None
        if _text(attempt or b"0") != "0":
            return None
        return int(created)

    async def run_ended(self, session: str, run: str) -> bool:
        """Whether ``run`` has ended, or its record has expired."""
        (status,) = await self._commands(("HGET", self.keys.run(session, run), "status"))
        return status is None or RunStatus(_text(status)).ended

    async def end_never_queued(self, session: str, run: str) -> bool:
        """End ``run`` as lost with an ``error``: it stayed queued without ever reaching the
        stream (``WITHDRAW``, which acts only on a run still queued and never started);
        the run slot its user held for it is given back."""
        lost = Thought("error", NEVER_QUEUED_MESSAGE, {"code": ErrorCode.UNAVAILABLE})
        # The slot its admitting frontend took for it, which that frontend, gone, cannot
        # give back (a run admitted by a version that kept no user: it lapses).
        (user,) = await self._commands(("HGET", self.keys.run(session, run), "user"))
        user = None if user is None else _text(user)
        return await self.end_lost(session, run, lost, RunStatus.FAILED, user, queued=True)

    async def queued_jobs(self, runs: Sequence[str]) -> list[bool]:
        """Whether each run's job record exists: its job reached the stream (:meth:`submit`)."""
        replies = await self._commands(*(("EXISTS", self.keys.job(run)) for run in runs))
        return [bool(reply) for reply in replies]

    async def _forget_key(self, user: str, idempotency_key: str, job: Job) -> None:
        """Free an idempotency key taken for a job that was refused, so it can be used
        again; its digest with it."""
        key = self.keys.idempotency(user, idempotency_key)
        (held,) = await self._commands(("GET", key))
        if held is not None and _text(held) == f"{job.run} {job.session}":
            await self._commands(("DEL", key, self.keys.idempotency_prompt(user, idempotency_key)))

    async def _commands(self, *commands: Sequence[Any]) -> list[Any]:
        """Run ``commands`` in the shared pipeline; raise the first error Redis replied."""
        replies = await self._batch.commands(*commands)
        for reply in replies:
            if isinstance(reply, Exception):
                raise reply
        return replies

    def _script(self, script: AsyncScript, keys: Sequence[Any], args: Sequence[Any]) -> Any:
        return self._batch.script(script, keys, args)

    async def run_state(self, run: str) -> dict[str, Any] | None:
        """A job's record by its id, or None when unknown or expired."""
        session = await self.redis.get(self.keys.job(run))
        if session is None:
            return None
        session = _text(session)
        fields: Any = await self.redis.hgetall(self.keys.run(session, run))
        if not fields:
            return None
        state = {_text(k): _text(v) for k, v in fields.items()}
        state["session"] = session
        return state

    async def cancel(self, session: str, run: str | None = None) -> list[str]:
        """Ask for unfinished runs of a session to be cancelled; returns their ids.

        The run's state carries the request (a worker sees it when it renews its
        lease or starts the job); the control message makes it immediate.
        """
        if run is None:
            members: Any = await self.redis.smembers(self.keys.session_runs(session))
            runs = sorted(_text(m) for m in members)
        else:
            runs = [run]
        return await self._cancel_runs(session, runs)

    async def _cancel_runs(self, session: str, runs: Sequence[str]) -> list[str]:
        cancelled = []
        for r in runs:
            status = await self._script(self._cancel, (self.keys.run(session, r),), ())
            if _text(status or b"") in (RunStatus.QUEUED, RunStatus.RUNNING):
                cancelled.append(r)
        if cancelled:
            message = orjson.dumps({"cancel": cancelled, "session": session})
            await self.redis.publish(self.keys.worker_control, message)
        return cancelled

    # --- jobs: the worker's side -------------------------------------------

    async def ensure_group(self) -> None:
        """Create the workers' consumer group (and the stream) if they do not exist."""
        try:
            await self.redis.xgroup_create(self.keys.jobs, self.keys.jobs_group, "0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    async def check_incarnations(self) -> bool:
        """Whether this Redis user may run ``INFO``, which the scripts read to tell a master
        that lost writes (a promoted replica, a restart from disk) and start a new epoch.
        Inside a script a refusal is silent, and the session would go on in its epoch with
        seqs given again: refused, this says so (docs/reliability.md)."""
        try:
            await self.redis.execute_command("INFO", "replication")
        except NoPermissionError:
            logger.warning(
                "this Redis user may not run INFO: a failover or restart that lost writes "
                "cannot be told, and its sessions would give seqs again; grant it +info"
            )
            return False
        except (RedisError, OSError):
            pass  # Redis away, or no INFO at all (the embedded Redis): nothing to tell
        return True

    async def jobs_queue(self) -> JobsQueue:
        """The jobs stream's length and the workers' group's pending and lag (``XLEN``,
        ``XINFO GROUPS``): what KEDA scales on, for a scrape.

        Through the client, not the shared pipeline: a Redis Cluster's pipeline cannot
        route ``XINFO GROUPS`` by its key, and would fail the whole batch with it.
        """
        keys = self.keys
        depth, groups = await asyncio.gather(
            self.redis.xlen(keys.jobs), self.redis.xinfo_groups(keys.jobs)
        )
        for group in groups:  # a map per group, as redis-py parses it
            fields = {_text(k): v for k, v in group.items()}
            if _text(fields["name"]) == keys.jobs_group:
                lag = fields.get("lag")  # None before Redis 7, or when it cannot tell
                pending = int(fields["pending"])
                return JobsQueue(int(depth), pending, None if lag is None else int(lag))
        return JobsQueue(int(depth), None, None)

    async def claim(self, consumer: str, count: int, block_ms: int) -> list[tuple[str, Job]]:
        """Take up to ``count`` new jobs for ``consumer``, waiting at most ``block_ms``."""
        try:
            reply: Any = await self.redis.xreadgroup(
                self.keys.jobs_group, consumer, {self.keys.jobs: ">"}, count=count, block=block_ms
            )
        except ResponseError as exc:
            if "NOGROUP" not in str(exc):
                raise
            await self.ensure_group()  # Redis lost its data (a restart without persistence)
            return []
        jobs = []
        for _stream, entries in reply or ():
            for entry_id, fields in entries:
                jobs.append((_text(entry_id), Job.decode(fields[b"job"])))
        return jobs

    async def reclaim(self, consumer: str, count: int, idle_ms: int) -> list[tuple[str, Job]]:
        """Take over up to ``count`` jobs nobody has touched for ``idle_ms``."""
        try:
            reply: Any = await self.redis.xautoclaim(
                self.keys.jobs, self.keys.jobs_group, consumer, idle_ms, "0-0", count=count
            )
        except ResponseError as exc:
            if "NOGROUP" not in str(exc):
                raise
            await self.ensure_group()
            return []
        return [(_text(i), Job.decode(f[b"job"])) for i, f in reply[1] if f]

    async def touch(self, consumer: str, entry_id: str) -> None:
        """Reset the job's idle time, so nobody reclaims a job that is still running."""
        keys = self.keys
        await self._commands(
            ("XCLAIM", keys.jobs, keys.jobs_group, consumer, 0, entry_id, "JUSTID")
        )

    async def finish(self, entry_id: str, job: Job) -> None:
        """Acknowledge a job and drop it from the stream: the stream holds only live jobs.

        The job's run has ended, so its user's run slot is given back (:mod:`grants`).
        """
        jobs = self.keys.jobs
        # Errors are let go: NOGROUP means Redis lost the queue already.
        await self._batch.commands(
            ("XACK", jobs, self.keys.jobs_group, entry_id), ("XDEL", jobs, entry_id)
        )
        await self.grants.free_run(job.user, job.run)

    async def requeue(self, entry_id: str, job: Job) -> None:
        """Put a job back at the end of the queue for another worker (a draining one's)."""
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.xadd(self.keys.jobs, {"job": job.encode()})
            pipe.xack(self.keys.jobs, self.keys.jobs_group, entry_id)
            pipe.xdel(self.keys.jobs, entry_id)
            await pipe.execute()

    async def dead_letter(self, entry_id: str, job: Job, reason: str) -> None:
        """Move a job that failed every attempt to the dead letters, and free its run slot."""
        # The dead letter first, then the job out of the queue: two streams, which are of
        # two slots on a cluster, so no one transaction. A loss between the two leaves the
        # job queued, to fail and be dead-lettered again: a dead letter twice, never none.
        await self.redis.xadd(
            self.keys.dead_letters,
            {"job": job.encode(), "reason": reason},
            maxlen=self._log_maxlen,
            approximate=True,
        )
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.xack(self.keys.jobs, self.keys.jobs_group, entry_id)
            pipe.xdel(self.keys.jobs, entry_id)
            await pipe.execute()
        await self.grants.free_run(job.user, job.run)

    async def start(self, job: Job, owner: str, lease_ms: int, max_attempts: int) -> Attempt:
        """Begin an attempt at ``job``, if the run's state allows; with the memory it needs."""
        fence = new_token()
        keys, session = self.keys, job.session
        verdict, attempt, *turns = await self._script(
            self._start,
            (keys.run(session, job.run), keys.session_memory(session), keys.session_queue(session)),
            (fence, owner, lease_ms, max_attempts, self._ttl),
        )
        verdict = Verdict(_text(verdict))
        if verdict == Verdict.WAIT:
            return Attempt(verdict, 0, fence, [], waits_for=_text(turns[0]))
        history = [message for turn in turns for message in orjson.loads(turn)]
        return Attempt(verdict, int(attempt), fence, history)

    async def dequeue(self, session: str, run: str) -> bool:
        """Take ``run`` out of its session's queue if it has ended or its state is gone."""
        keys = self.keys
        removed = await self._script(
            self._dequeue, (keys.session_queue(session), keys.run(session, run)), (run,)
        )
        return bool(removed)

    async def renew(self, job: Job, fence: str, lease_ms: int) -> int:
        """-1: the lease is lost; 1: cancellation was asked for; 0: carry on.

        A run whose state Redis lost is taken back by the attempt renewing it (0).
        """
        return int(
            await self._script(
                self._renew, (self.keys.run(job.session, job.run),), (fence, lease_ms, self._ttl)
            )
        )

    async def run_statuses(self, runs: Sequence[tuple[str, str]]) -> list[str | None]:
        """The status of each ``(session, run)``, in one call; None where its state is gone."""
        keys = self.keys
        replies = await self._commands(*(("HGET", keys.run(s, r), "status") for s, r in runs))
        return [None if reply is None else _text(reply) for reply in replies]

    async def end_lost(
        self,
        session: str,
        run: str,
        thought: Thought,
        status: str,
        user: str | None = None,
        *,
        queued: bool = False,
    ) -> bool:
        """End a run whose state Redis lost with ``thought`` (its terminal event).

        Acts only while the run's state is missing; returns whether it wrote. With
        ``queued``, acts instead only while the run is queued and was never started
        (``WITHDRAW``: a run never queued). The job's record is written too, so the run's
        status can be looked up by its id, and ``user``'s run slot is given back.
        """
        keys = self.keys
        head = encode_event_head(thought, session, run, now_ms())
        seq = await self._script(
            self._withdraw if queued else self._end_lost,
            (
                keys.run(session, run),
                keys.session_meta(session),
                keys.session_log(session),
                keys.session_channel(session),
                keys.session_runs(session),
                keys.session_queue(session),
            ),
            (
                self._log_maxlen,
                self._ttl,
                self._epoch_seed,
                new_token(),
                status,
                str(thought.content),
                run,
                head,
                keys.runs_ended,
            ),
        )
        if int(seq) == FENCED:
            return False
        await self._commands(("SET", keys.job(run), session, "EX", self._ttl))
        await self.grants.free_run(user, run)
        return True

    async def release(self, job: Job, fence: str) -> None:
        """Give a run back to its lease, for another worker to retry, if ``fence`` still holds it."""
        await self._script(self._release, (self.keys.run(job.session, job.run),), (fence,))

    # --- approvals: a run waiting for a person -------------------------------

    async def await_approval(self, job: Job, fence: str, waiting: dict[str, str]) -> bool:
        """Keep ``waiting`` (worker/approvals.py) as the run's approval, if ``fence`` holds it."""
        keys = self.keys
        pairs = [part for item in waiting.items() for part in item]
        return bool(
            await self._script(
                self._await_approval,
                (keys.run(job.session, job.run), keys.run_approval(job.session, job.run)),
                (fence, self._ttl, *pairs),
            )
        )

    async def approval(self, job: Job) -> dict[str, str] | None:
        """The run's approval, waiting or decided: None when the run waits for none."""
        fields: Any = await self.redis.hgetall(self.keys.run_approval(job.session, job.run))
        return {_text(k): _text(v) for k, v in fields.items()} or None

    async def end_approval(self, job: Job) -> None:
        """Forget the run's approval: it was decided and written, or the run ended."""
        await self._commands(("DEL", self.keys.run_approval(job.session, job.run)))

    async def run_session(self, run: str) -> str | None:
        """The session a run is of, or None when unknown or expired."""
        session = await self.redis.get(self.keys.job(run))
        return None if session is None else _text(session)

    async def decide(
        self, session: str, run: str, call_id: str, decision: str, reason: str | None, by: str
    ) -> bool:
        """Answer the approval ``run`` waits for on ``call_id``; False if it waits for none.

        The first answer counts (a person's, or the worker's at the timeout); the
        worker running the run is woken at once on the control channel.
        """
        keys = self.keys
        decided = await self._script(
            self._decide,
            (keys.run(session, run), keys.run_approval(session, run)),
            (call_id, decision, orjson.dumps(reason), by),
        )
        if not int(decided):
            return False
        message = orjson.dumps({"decided": [run], "session": session})
        await self.redis.publish(keys.worker_control, message)
        return True

    # --- events -------------------------------------------------------------

    def encode(self, job: Job, thought: Thought) -> bytes:
        """``thought`` as an event head of ``job``'s run, stamped now (see :meth:`submit_encoded`)."""
        return encode_event_head(thought, job.session, job.run, now_ms())

    def submit_encoded(
        self,
        job: Job,
        heads: Sequence[bytes],
        *,
        fence: str,
        first: int,
        min_seq: int = 0,
        status: str = "",
        result: str = "",
        remember: bytes = b"",
        turns: int = 0,
    ) -> asyncio.Future[Any]:
        """Append an attempt's events ``first``, ``first + 1``, ... (``heads``, made by
        :meth:`encode`) to the log and publish them, without waiting.

        The future gets the session's last seq, or :data:`FENCED` if this attempt no
        longer holds the run. ``status`` ends the run (done, failed, cancelled) with
        ``result``; the turn's messages ``remember`` (a JSON array) join the session's
        memory, of which the last ``turns`` turns are kept.
        """
        session = job.session
        keys = self.keys
        if not status and self._batch.bundles:
            return self._batch.bundle(
                self._append_many,
                self._append_common,
                (
                    keys.session_meta(session),
                    keys.session_log(session),
                    keys.session_channel(session),
                    keys.run(session, job.run),
                ),
                (len(heads), fence, min_seq, first, *heads),
            )
        # The call that ends the run waits for replicas, if asked to, before the job is acked.
        call = self._append_and_wait if status and self._wait[0] > 0 else self._script
        return call(
            self._append,
            (
                keys.session_meta(session),
                keys.session_log(session),
                keys.session_channel(session),
                keys.run(session, job.run),
                keys.session_runs(session),
                keys.session_memory(session),
                keys.session_queue(session),
            ),
            (
                self._log_maxlen,
                self._ttl,
                self._epoch_seed,
                fence,
                min_seq,
                first,
                status,
                result,
                job.run,
                remember,
                turns,
                keys.runs_ended,
                *heads,
            ),
        )

    def _append_and_wait(
        self, script: AsyncScript, keys: Sequence[Any], args: Sequence[Any]
    ) -> asyncio.Future[Any]:
        """``script`` then ``WAIT`` on one connection of its own, not the shared pipeline's:
        WAIT holds its connection until the replicas acknowledged (or the timeout), and
        every call behind it in the pipeline would wait as long."""
        return asyncio.ensure_future(self._wait_for_replicas(script, keys, args))

    async def _wait_for_replicas(
        self, script: AsyncScript, keys: Sequence[Any], args: Sequence[Any]
    ) -> Any:
        replicas, timeout_ms = self._wait
        async with self.redis.pipeline(transaction=False) as pipe:
            await script(keys, args, client=pipe)
            pipe.execute_command("WAIT", replicas, timeout_ms)
            reply, acknowledged = await pipe.execute(raise_on_error=False)
        if isinstance(reply, Exception):
            raise reply
        if isinstance(acknowledged, Exception):
            # The run has ended all the same (the embedded Redis, or a server that refuses
            # WAIT): a refused wait must not fail the write that went through before it.
            logger.warning("a run's end waited for no replicas: WAIT refused (%s)", acknowledged)
        elif int(acknowledged) < replicas:
            # WAIT neither undoes nor retries a write: the run has ended on the master and
            # its job is acknowledged; a failover before the replicas catch up can lose it.
            logger.warning(
                "a run's end reached %d of %d replicas within %d ms",
                int(acknowledged),
                replicas,
                timeout_ms,
            )
        return reply

    async def meta(self, session: str) -> Meta:
        """Where the session's log stands: its epoch and last seq."""
        seq, epoch = await self.redis.hmget(self.keys.session_meta(session), ["seq", "epoch"])
        return Meta(None if epoch is None else _text(epoch), int(seq or 0))

    async def history(self, session: str, after: int = 0, count: int | None = None) -> list[str]:
        """Events of the session's log with ``seq > after``, oldest first (at most ``count``).

        Through the batcher, whose replies are as Redis sent them: a worker reads back
        every event it writes for the session's snapshot, and redis-py's reshaping of an
        ``XRANGE`` reply cost it four times the read itself."""
        command: list[Any] = ["XRANGE", self.keys.session_log(session), f"(0-{after}", "+"]
        if count is not None:
            command += ["COUNT", count]
        (entries,) = await self._batch.commands(command)
        if isinstance(entries, Exception):
            raise entries
        # Each entry is [id, [b"e", event]]: the log's one field.
        return [_text(fields[fields.index(b"e") + 1]) for _id, fields in entries]

    async def snapshot(self, session: str) -> bytes | None:
        """The session's stored snapshot's state (JSON), or None (:mod:`thoughtwire.shared.snapshots`)."""
        fields: Any = await self.redis.hgetall(self.keys.session_snapshot(session))
        state = fields.get(b"state") if fields else None
        return None if state is None else bytes(state)

    async def save_snapshot(self, session: str, epoch: str, seq: int, state: bytes) -> bool:
        """Store the session's snapshot at ``seq`` of ``epoch``, if newer than the stored one."""
        keys = (self.keys.session_snapshot(session), self.keys.session_meta(session))
        saved = await self._script(self._save_snapshot, keys, (epoch, seq, state, self._ttl))
        return bool(saved)

    # --- conversation memory ------------------------------------------------

    # A run gets the memory from ``START`` and adds its turn with its terminal ``APPEND``.

    async def memory(self, session: str) -> list[dict[str, Any]]:
        """The session's remembered messages, oldest first."""
        turns: Any = await self.redis.lrange(self.keys.session_memory(session), 0, -1)
        return [message for turn in turns for message in orjson.loads(turn)]

    # --- names of channels a caller follows -----------------------------------

    def session_channel(self, session: str) -> str:
        """The channel ``session``'s events are published on (for a viewer to join)."""
        return self.keys.session_channel(session)

    @property
    def worker_control(self) -> str:
        """Where cancellations are announced to every worker."""
        return self.keys.worker_control

    @property
    def runs_ended(self) -> str:
        """Where each run's end is announced (its id)."""
        return self.keys.runs_ended

    def client_channel(self, client_id: str) -> str:
        """A client's personal channel."""
        return self.keys.client_channel(client_id)

    @property
    def broadcast_channel(self) -> str:
        """The channel every client hears."""
        return self.keys.broadcast_channel

    def node_channel(self, node: str) -> str:
        """A frontend's own control channel."""
        return self.keys.node_channel(node)

    def probe_channel(self, node: str, tag: str) -> str:
        """A frontend's probe of one master's sharded pub/sub, in the slot of ``tag``."""
        return self.keys.probe_channel(node, tag)

    # --- plain messages -----------------------------------------------------

    async def publish(self, channel: str, payload: str | bytes) -> int:
        """PUBLISH ``payload`` on ``channel``; returns how many subscribers got it.

        On a cluster a channel with a hash tag (a client's) is sharded: SPUBLISH, whose
        count is the whole cluster's, where PUBLISH counts only one node's subscribers.
        """
        if self._sharded and sharded(channel):
            return int(await self.redis.spublish(channel, payload))
        return int(await self.redis.publish(channel, payload))

    async def subscribers(self, channels: Iterable[str]) -> dict[str, int]:
        """PUBSUB NUMSUB: how many frontends follow each channel (on a cluster, each
        sharded channel asked of its master with SHARDNUMSUB)."""
        if self._sharded:
            replies = await self._commands(
                *(("PUBSUB", "SHARDNUMSUB" if sharded(c) else "NUMSUB", c) for c in channels)
            )
            reply = [part for pair in replies for part in pair]
        else:
            (reply,) = await self._commands(("PUBSUB", "NUMSUB", *channels))
        return {
            _text(name): int(count) for name, count in zip(reply[::2], reply[1::2], strict=True)
        }


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
