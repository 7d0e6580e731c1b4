"""The simulated agent: no network, shaped by settings.

It walks the seed's loop (thinking, action, observation, thinking, answer) in protocol
v2's shapes: whole thinking steps, a "search" tool call whose arguments stream in pieces
(``tool_input``) before the whole ``action``, its ``observation``, and the answer as
token deltas. Benchmarks shape their load with its settings: the tool call's pieces
add events but no time, so a run's pace is set by ``step_delay`` and the answer alone.
Without jitter it is deterministic.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from thoughtwire.shared.protocol import Thought
from thoughtwire.shared.settings import Settings
from thoughtwire.worker.agents.base import Turn, denied
from thoughtwire.worker.tools import approval_names

ANSWER = (
    "Based on my research, here is the answer: streaming lets you watch an agent "
    "think one token at a time instead of waiting for the whole reply."
)
DELTA: dict[str, Any] = {"delta": True}
TOOL = "search"
CALL_ID = "call_1"


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
    approval_tools: frozenset[str] = frozenset()  # "search" here: its call is asked about

    @classmethod
    def from_settings(cls, settings: Settings) -> SimulatedAgent:
        """The agent the ``sim_`` settings describe."""
        return cls(
            settings.sim_step_delay,
            settings.sim_answer_tokens,
            settings.sim_tokens_per_second,
            settings.sim_jitter,
            approval_names(settings.approval_tools),
        )

    async def run(self, turn: Turn) -> AsyncIterator[Thought]:
        """Yield thinking, an action and its observation, then the answer token by token."""
        topic = " ".join(turn.prompt.split())[:80]
        steps = (
            Thought("thinking", "Analyzing the question..."),
            Thought("thinking", "I need to search for information"),
            Thought(
                "action",
                f"Searching: {topic}",
                {"tool": TOOL, "arguments": {"query": topic}, "call_id": CALL_ID},
            ),
            Thought(
                "observation",
                f"Found: relevant results about {topic}",
                {"tool": TOOL, "call_id": CALL_ID, "is_error": False},
            ),
            Thought("thinking", "Processing the results..."),
        )
        # A run that waited for an approval goes on from its checkpoint: the step asked about.
        first = turn.resume["step"] if turn.resume else 0
        for i, step in enumerate(steps[first:], start=first):
            if step.type == "observation" and TOOL in self.approval_tools:
                step = await self._approved(turn, step, {"query": topic}, {"step": i})
            if step.type == "action":
                for piece in _pieces(json.dumps({"query": topic}), 3):
                    yield Thought("tool_input", piece, {**DELTA, "call_id": CALL_ID, "tool": TOOL})
            yield step
            await asyncio.sleep(self.step_delay)
        answer = []
        async for token in self._answer():
            answer.append(token)
            yield Thought("answer", token, DELTA)
        turn.remember(
            {"role": "user", "content": turn.prompt},
            {"role": "assistant", "content": "".join(answer)},
        )

    @staticmethod
    async def _approved(
        turn: Turn, observation: Thought, arguments: Any, checkpoint: Any
    ) -> Thought:
        """The search's observation once allowed; if denied, the error that says so."""
        decided = await turn.ask(CALL_ID, TOOL, arguments, checkpoint)
        return observation if decided.allowed else denied(TOOL, CALL_ID, decided)

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


def _pieces(text: str, count: int) -> list[str]:
    """``text`` cut into ``count`` pieces of near-equal length, as a model streams it."""
    size = -(-len(text) // count)
    return [text[i : i + size] for i in range(0, len(text), size)]
