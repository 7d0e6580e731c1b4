"""The simulated agent: no network, shaped by settings.

It walks the seed's loop (thinking, action, observation, thinking, answer) and
streams the answer as tokens. Benchmarks shape their load with its settings.
Without jitter it is deterministic.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from thoughtwire.shared.protocol import Thought
from thoughtwire.shared.settings import Settings
from thoughtwire.worker.agents.base import Turn

ANSWER = (
    "Based on my research, here is the answer: streaming lets you watch an agent "
    "think one token at a time instead of waiting for the whole reply."
)


def answer_tokens(count: int) -> list[str]:
    """The demo answer in ``count`` tokens, always ending where a paragraph ends.

    The paragraph is repeated whole as often as ``count`` needs and cut into
    ``count`` runs of words (sizes differ by one at most), so a short answer is still
    a complete sentence and a long one is paragraphs, never a sentence cut short.
    """
    if count < 1:
        return []
    words = ANSWER.split()
    text = words * -(-count // len(words))  # whole paragraphs: ceil(count / len(words))
    size, extra = divmod(len(text), count)
    tokens, start = [], 0
    for i in range(count):
        end = start + size + (1 if i < extra else 0)
        tokens.append(" ".join(text[start:end]) + " ")
        start = end
    return tokens


@dataclass(frozen=True)
class SimulatedAgent:
    """An agent that needs no model: a few steps, then a paced answer."""

    step_delay: float = 0.5
    answer_tokens: int = 12
    tokens_per_second: float = 20.0  # 0 streams the answer unpaced
    jitter: float = 0.0  # each token within this share of an interval of its slot

    @classmethod
    def from_settings(cls, settings: Settings) -> SimulatedAgent:
        """The agent the ``sim_`` settings describe."""
        return cls(
            settings.sim_step_delay,
            settings.sim_answer_tokens,
            settings.sim_tokens_per_second,
            settings.sim_jitter,
        )

    async def run(self, turn: Turn) -> AsyncIterator[Thought]:
        """Yield thinking, an action and its observation, then the answer token by token."""
        topic = " ".join(turn.prompt.split())[:80]
        steps = (
            Thought("thinking", "Analyzing the question..."),
            Thought("thinking", "I need to search for information"),
            Thought("action", f"Searching: {topic}"),
            Thought("observation", f"Found: relevant results about {topic}"),
            Thought("thinking", "Processing the results..."),
        )
        for step in steps:
            yield step
            await asyncio.sleep(self.step_delay)
        answer = []
        async for token in self._answer():
            answer.append(token)
            yield Thought("answer", token)
        turn.remember(
            {"role": "user", "content": turn.prompt},
            {"role": "assistant", "content": "".join(answer)},
        )

    async def _answer(self) -> AsyncIterator[str]:
        words = answer_tokens(self.answer_tokens)
        start = time.monotonic()
        for i, word in enumerate(words):
            if self.tokens_per_second > 0:
                # Pace against absolute deadlines, so sleeps do not drift; jitter moves
                # each token about its slot without changing the rate.
                slot = i + random.uniform(-self.jitter, self.jitter) if i else 0
                delay = start + slot / self.tokens_per_second - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
            elif i % 64 == 63:
                await asyncio.sleep(0)  # unpaced: still let other runs in
            yield word
