"""The worker: claims jobs from the queue, runs agents, writes their events to the bus.

A worker runs up to ``concurrency`` jobs at once. Each event a run produces is
appended to the session's log and published in one atomic step (see
:mod:`shared.bus`). A job is acknowledged only when its run has ended, with
``done`` or ``error``; a job whose worker died stays pending in the group.

Stopping: :meth:`Worker.run` returns when its ``stop`` event is set. It stops
claiming at once, lets running jobs finish until ``drain_timeout``, then cancels
the rest; a cancelled job is not acknowledged.
"""

from __future__ import annotations

import asyncio
import logging
import secrets

from shared.bus import Bus
from shared.protocol import Job, Thought
from worker.agents import Agent, AgentError

logger = logging.getLogger("thoughtwire.worker")

CLAIM_BLOCK_MS = 1000
GENERIC_FAILURE = "the agent failed; see the worker's log"


class Worker:
    def __init__(
        self,
        bus: Bus,
        agents: dict[str, Agent],
        default_agent: str,
        *,
        concurrency: int,
        name: str | None = None,
    ) -> None:
        self.bus = bus
        self.agents = agents
        self.default_agent = default_agent
        self.concurrency = concurrency
        self.name = name or "worker-" + secrets.token_hex(4)
        self._running: set[asyncio.Task[None]] = set()

    async def run(self, stop: asyncio.Event, drain_timeout: float = 25.0) -> None:
        """Claim and run jobs until ``stop`` is set, then drain."""
        await self.bus.ensure_group()
        stopping = asyncio.create_task(stop.wait())
        try:
            while not stop.is_set():
                free = self.concurrency - len(self._running)
                if free <= 0:
                    await asyncio.wait(
                        {stopping, *self._running}, return_when=asyncio.FIRST_COMPLETED
                    )
                    continue
                claim = asyncio.create_task(self.bus.claim(self.name, free, CLAIM_BLOCK_MS))
                await asyncio.wait({claim, stopping}, return_when=asyncio.FIRST_COMPLETED)
                if not claim.done():
                    # Stop arrived mid-claim; let the claim finish (it is bounded by
                    # CLAIM_BLOCK_MS) so a job it took is still run, not orphaned.
                    await asyncio.wait({claim})
                for entry_id, job in claim.result():
                    self._start(entry_id, job)
        finally:
            stopping.cancel()
            await self._drain(drain_timeout)

    def _start(self, entry_id: str, job: Job) -> None:
        task = asyncio.create_task(self._run_job(entry_id, job), name=f"run-{job.run}")
        self._running.add(task)
        task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Task[None]) -> None:
        self._running.discard(task)
        if not task.cancelled() and task.exception() is not None:
            logger.error("run task failed", exc_info=task.exception())

    async def _drain(self, deadline: float) -> None:
        if not self._running:
            return
        _done, pending = await asyncio.wait(set(self._running), timeout=deadline)
        for task in pending:
            task.cancel()
        if pending:
            logger.warning("cancelled %d runs still going at the drain deadline", len(pending))
            await asyncio.wait(pending)

    async def _run_job(self, entry_id: str, job: Job) -> None:
        await self.run_job(job)
        await self.bus.finish(entry_id)

    async def run_job(self, job: Job) -> None:
        """Run one job's agent and write its events, ending with ``done`` or ``error``."""
        agent = self.agents.get(job.agent or self.default_agent)
        if agent is None:
            await self._emit(job, Thought("error", f"agent {job.agent!r} is not available"))
            return
        try:
            async for thought in agent.run(job.prompt):
                await self._emit(job, thought)
        except asyncio.CancelledError:
            raise
        except AgentError as exc:
            await self._emit(job, Thought("error", str(exc)))
            return
        except Exception:
            logger.exception("run %s of session %s failed", job.run, job.session)
            await self._emit(job, Thought("error", GENERIC_FAILURE))
            return
        await self._emit(job, Thought("done", ""))

    async def _emit(self, job: Job, thought: Thought) -> None:
        await self.bus.append(job.session, job.run, [thought])
