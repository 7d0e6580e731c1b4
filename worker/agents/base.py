"""The agent contract."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Protocol

from thoughtwire.shared.protocol import Thought


class AgentError(Exception):
    """A run failed for a reason the client may see; ``str(exc)`` is safe to show.

    Any other exception is reported to the client as a generic failure: its text
    may hold a key, a URL or a stack, which stay in the worker's log.
    """


@dataclass
class Turn:
    """One prompt's work: what the agent is given, and the messages it leaves for memory."""

    prompt: str
    history: list[dict[str, Any]] = field(default_factory=list)  # earlier turns, oldest first
    messages: list[dict[str, Any]] = field(default_factory=list)  # this turn's, for memory

    def remember(self, *messages: dict[str, Any]) -> None:
        """Keep messages of this turn for the session's memory."""
        self.messages.extend(messages)


class Agent(Protocol):
    """What a worker runs for a prompt: a stream of thoughts."""

    def run(self, turn: Turn) -> AsyncIterator[Thought]:
        """Yield thoughts as they are produced.

        The worker ends the run with ``done`` unless the agent yields a terminal
        thought itself (to add a finish reason, usage, timings).
        """
        ...
