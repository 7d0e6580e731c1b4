"""Approvals: a tool call that waits for a person, kept in Redis so it outlives its worker.

An agent asks (:meth:`~worker.agents.base.Turn.ask`) before it runs a tool that needs
approval; :class:`Approvals` answers for the attempt:

1. it keeps the waiting state in the run's approval hash (``Keys.run_approval``, in the
   session's slot): the call, the deadline, where the log stood, the agent's
   checkpoint, the block tracker's state and the answer so far,
2. writes the ``approval`` event (after the call's ``action``, in the call's block),
3. waits for the decision: a frontend's ``DECIDE`` wakes it on the worker control
   channel, and it polls every :data:`POLL_SECONDS` in case that message was missed; at
   the deadline it takes the default itself (``by: timeout``), with the same script, so
   a person's answer and the timeout never both count; if the script refuses (the run
   is being cancelled, or no longer runs) it asks again only after a poll, and a run
   marked for cancel stops waiting at once (``on_cancel``): the run ends cancelled,
   with no decision; if Redis lost the waiting state, nobody can answer any more and
   the call is denied (``by: lost``), whatever the default: losing data never allows
   a call,
4. writes the ``decision`` event and forgets the waiting state; then the tool runs.

Guarantees: if the worker dies while the run waits, the next attempt finds the waiting
state (worker/runner.py writes no ``retry`` then), restores the block tracker and the
agent from it, and waits on (or takes the decision given meanwhile). It looks in the
log, after where it stood when the wait was kept, for the call's ``approval`` and
``decision``, and writes only what is not there: neither is written twice, nor left
out. A death before the wait was kept (the call's ``action`` is the last event) or
after it was forgotten (the tool was running) is an ordinary retry.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import orjson

from thoughtwire.shared.backoff import retry
from thoughtwire.shared.bus import Bus, now_ms
from thoughtwire.shared.protocol import Job, Thought
from thoughtwire.shared.vocab import DecidedBy, Decision
from thoughtwire.worker.agents.base import Decided
from thoughtwire.worker.writer import LeaseLost

logger = logging.getLogger("thoughtwire.worker")

POLL_SECONDS = 1.0  # a missed wake-up costs at most this long
# How long an approval waits for its call's ``action`` to be written first. An agent
# yields the action before it asks; with coalescing the action may still be on its way.
ORDER_SECONDS = 5.0
MAX_LOOKBACK = 1000  # events read after the approval, looking for its decision


@dataclass(frozen=True)
class ApprovalPolicy:
    """How long a call waits for a person, and what is decided when nobody answers."""

    timeout: float = 300.0
    default: Decision = Decision.DENY
    redis_retry_seconds: float = 10.0


DEFAULT_POLICY = ApprovalPolicy()


def decided_from(waiting: dict[str, str] | None) -> Decided | None:
    """The decision a waiting state holds, or None while it is undecided."""
    if waiting is None or "decision" not in waiting:
        return None
    reason = orjson.loads(waiting.get("reason") or "null")
    return Decided(Decision(waiting["decision"]), reason, DecidedBy(waiting.get("by", "user")))


class Approvals:
    """One attempt's approvals: asks, waits, and resumes a wait another attempt began."""

    def __init__(
        self,
        bus: Bus,
        job: Job,
        fence: str,
        policy: ApprovalPolicy,
        *,
        send: Callable[[Thought], Awaitable[None]],
        snapshot: Callable[[], dict[str, str]],
        waiting: dict[str, str] | None = None,
        on_cancel: Callable[[], None] = lambda: None,
    ) -> None:
        self.bus = bus
        self.job = job
        self.fence = fence
        self.policy = policy
        self._send = send  # through the block tracker and the writer, then settled
        self._snapshot = snapshot  # the attempt's state to keep: blocks, answer so far
        self._restored = waiting  # the wait an earlier attempt left, to go on with
        self._on_cancel = on_cancel  # the run is marked for cancel: the attempt stops it
        self.used = waiting is not None  # whether a waiting state may be left to clear
        self._wake = asyncio.Event()
        self._actions: set[str] = set()  # call ids whose action is written
        self._action_seen = asyncio.Event()

    def wake(self) -> None:
        """A decision may have come (a message on the worker control channel)."""
        self._wake.set()

    def seen(self, action: Thought) -> None:
        """The attempt queued ``action`` for writing: its approval may follow it."""
        call_id = (action.extra or {}).get("call_id")
        if call_id is not None:
            self._actions.add(str(call_id))
            self._action_seen.set()

    async def ask(self, call_id: str, tool: str, arguments: Any, checkpoint: Any) -> Decided:
        """Keep the wait in Redis, write the approval, wait for the decision, write it."""
        waiting, self._restored = self._restored, None
        logged: set[str] = set()  # this call's events an earlier attempt wrote already
        if waiting is not None and waiting.get("call_id") == call_id:
            logged = await self._logged(waiting)
        else:
            waiting = await self._keep(call_id, tool, checkpoint)
        if "approval" not in logged:
            extra = {
                "call_id": call_id,
                "tool": tool,
                "arguments": arguments,
                "timeout_ms": round(self.policy.timeout * 1000),
                "default": self.policy.default,
            }
            await self._send(Thought("approval", f"{tool} waits for approval", extra))
        decided = await self._wait(waiting)
        if "decision" not in logged:
            extra = {
                "call_id": call_id,
                "decision": decided.decision,
                "reason": decided.reason,
                "by": decided.by,
            }
            content = "allowed" if decided.allowed else "denied"
            await self._send(Thought("decision", content, extra))
        await self._call(self.bus.end_approval, self.job)
        return decided

    async def _keep(self, call_id: str, tool: str, checkpoint: Any) -> dict[str, str]:
        """Keep the wait in Redis before its approval is written: a worker that dies in
        between leaves a wait the next attempt finds, and writes the approval."""
        await self._after_action(call_id)
        # The approval and the decision come after this seq: where a new attempt looks.
        meta = await self._call(self.bus.meta, self.job.session)
        waiting = {
            "call_id": call_id,
            "tool": tool,
            "deadline": str(now_ms() + round(self.policy.timeout * 1000)),
            "seq": str(meta.last_seq),
            "checkpoint": orjson.dumps(checkpoint).decode(),
            **self._snapshot(),  # the blocks as they are before the approval
        }
        self.used = True
        if not await self._call(self.bus.await_approval, self.job, self.fence, waiting):
            raise LeaseLost
        return waiting

    async def _after_action(self, call_id: str) -> None:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(ORDER_SECONDS):
                while call_id not in self._actions:
                    self._action_seen.clear()
                    await self._action_seen.wait()
            return
        logger.warning("run %s asked about call %s before its action", self.job.run, call_id)

    async def _wait(self, waiting: dict[str, str]) -> Decided:
        """The decision: a person's, or the default once the deadline has passed."""
        deadline = int(waiting["deadline"])
        while True:
            self._wake.clear()  # before reading: a wake-up during the read is kept
            current = await self._call(self.bus.approval, self.job)
            if current is None:  # Redis lost it: nobody can answer, and nobody allowed it
                logger.warning("run %s: its approval was lost; the call is denied", self.job.run)
                return Decided(Decision.DENY, None, DecidedBy.LOST)
            decided = decided_from(current)
            if decided is not None:
                return decided
            left = (deadline - now_ms()) / 1000
            if left <= 0 and await self._take_default(waiting["call_id"]):
                continue  # read what counted: the default just taken
            pause = min(left, POLL_SECONDS) if left > 0 else POLL_SECONDS  # after a refusal
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(pause):
                    await self._wake.wait()

    async def _take_default(self, call_id: str) -> bool:
        """Decide the default at the deadline; False if the script refused it."""
        job = self.job
        if await self._call(
            self.bus.decide,
            job.session,
            job.run,
            call_id,
            self.policy.default,
            None,
            DecidedBy.TIMEOUT,
        ):
            return True
        # Refused: the run is marked for cancel (stop it), or no longer runs (its lease is
        # being lost: the attempt learns it as it renews), or a person answered just
        # before (their wake-up ends the pause). Asking again at once would spin.
        state = await self._call(self.bus.run_state, job.run) or {}
        if state.get("cancel") == "1":
            self._on_cancel()
        return False

    async def _logged(self, waiting: dict[str, str]) -> set[str]:
        """Which of this call's ``approval`` and ``decision`` an earlier attempt wrote."""
        events = await self._call(
            self.bus.history, self.job.session, int(waiting["seq"]), MAX_LOOKBACK
        )
        logged = set()
        for raw in events:
            event = orjson.loads(raw)
            if event.get("run") == self.job.run and event.get("call_id") == waiting["call_id"]:
                logged.add(str(event.get("type")))
        return logged & {"approval", "decision"}

    async def _call(self, op: Callable[..., Awaitable[Any]], *args: Any) -> Any:
        """A Redis call, tried again while Redis is briefly away."""
        return await retry(partial(op, *args), seconds=self.policy.redis_retry_seconds)
