"""The agent contract."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Protocol

from shared.protocol import Thought


class AgentError(Exception):
    """A run failed for a reason the client may see; ``str(exc)`` is safe to show.

    Any other exception is reported to the client as a generic failure: its text
    may hold a key, a URL or a stack, which stay in the worker's log.
    """


class Agent(Protocol):
    def run(self, prompt: str) -> AsyncIterator[Thought]:
        """Yield thoughts as they are produced; the worker adds ``done`` at the end."""
        ...
