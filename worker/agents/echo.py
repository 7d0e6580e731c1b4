"""The echo agent: the seed's first exercise, run by a worker like any other agent."""

from __future__ import annotations

from collections.abc import AsyncIterator

from shared.protocol import Thought


class EchoAgent:
    async def run(self, prompt: str) -> AsyncIterator[Thought]:
        yield Thought("answer", prompt.upper())
