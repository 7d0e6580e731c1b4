"""The agent contract."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from thoughtwire.shared.protocol import Thought
from thoughtwire.shared.vocab import DecidedBy, Decision


class AgentError(Exception):
    """A run failed for a reason the client may see; ``str(exc)`` is safe to show.

    Any other exception is reported to the client as a generic failure: its text
    may hold a key, a URL or a stack, which stay in the worker's log.
    """


@dataclass(frozen=True, slots=True)
class Decided:
    """A tool call's approval, answered: allow or deny, why, and by whom."""

    decision: Decision
    reason: str | None = None
    by: DecidedBy = DecidedBy.USER

    @property
    def allowed(self) -> bool:
        """Whether the tool may run."""
        return self.decision == Decision.ALLOW


# (call_id, tool, arguments, checkpoint) -> the decision; see :meth:`Turn.ask`.
Approver = Callable[[str, str, Any, Any], Awaitable[Decided]]
NOBODY_TO_ASK = Decided(Decision.DENY, "nobody can approve tool calls here", DecidedBy.TIMEOUT)


@dataclass
class Turn:
    """One prompt's work: what the agent is given, and the messages it leaves for memory."""

    prompt: str
    history: list[dict[str, Any]] = field(default_factory=list)  # earlier turns, oldest first
    messages: list[dict[str, Any]] = field(default_factory=list)  # this turn's, for memory
    # The checkpoint the agent handed to :meth:`ask`, when this attempt continues a run
    # that was waiting for an approval (its worker died): the agent goes on from there.
    resume: Any = None
    approver: Approver | None = None  # the worker's (worker/approvals.py)

    def remember(self, *messages: dict[str, Any]) -> None:
        """Keep messages of this turn for the session's memory."""
        self.messages.extend(messages)

    async def ask(self, call_id: str, tool: str, arguments: Any, checkpoint: Any) -> Decided:
        """Wait for a person to allow or deny a tool call; returns the decision.

        Call it after yielding the call's ``action`` and before running the tool.
        ``checkpoint`` is the agent's own state as plain JSON: if the worker dies while
        the run waits, a new attempt is given it as :attr:`resume`, and the agent goes
        on from there by asking again for the same ``call_id`` (nothing is written
        twice). Without an approver (an agent run outside a worker) the call is denied.
        """
        if self.approver is None:
            return NOBODY_TO_ASK
        return await self.approver(call_id, tool, arguments, checkpoint)


def denied(tool: str, call_id: str, decided: Decided) -> Thought:
    """The ``observation`` of a call that was not allowed to run: an error, saying why."""
    why = {DecidedBy.TIMEOUT: " (no answer in time)", DecidedBy.LOST: " (its wait was lost)"}.get(
        decided.by, ""
    )
    text = f"error: the call to {tool} was denied{why}"
    if decided.reason:
        text += f": {decided.reason}"
    return Thought("observation", text, {"tool": tool, "call_id": call_id, "is_error": True})


class Agent(Protocol):
    """What a worker runs for a prompt: a stream of thoughts."""

    def run(self, turn: Turn) -> AsyncIterator[Thought]:
        """Yield thoughts as they are produced.

        The worker ends the run with ``done`` unless the agent yields a terminal
        thought itself (to add a finish reason, usage, timings).
        """
        ...
