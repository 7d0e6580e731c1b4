"""The echo agent: the seed's first exercise, run by a worker like any other agent."""

from __future__ import annotations

from collections.abc import AsyncIterator

from thoughtwire.shared.protocol import Thought
from thoughtwire.worker.agents.base import Turn


class EchoAgent:
    """Answers the prompt in capitals: the echo endpoint's agent."""

    async def run(self, turn: Turn) -> AsyncIterator[Thought]:
        """Yield the prompt, upper-cased, as the answer."""
        yield Thought("answer", turn.prompt.upper())
