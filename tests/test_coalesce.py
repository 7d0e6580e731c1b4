"""Coalescing, with a scripted source and a fake clock-free check on grouping; and the
simulated agent's pacing, which benchmarks shape their load with."""

import asyncio

import pytest

from thoughtwire.shared.protocol import Thought
from thoughtwire.worker.agents.base import Turn
from thoughtwire.worker.agents.simulated import SimulatedAgent, answer_tokens
from thoughtwire.worker.coalesce import coalesce


def delta(kind, content, **extra):
    return Thought(kind, content, {"delta": True, **extra})


async def burst(*items, pause_after=None, pause=0.0):
    for i, item in enumerate(items):
        yield item
        if pause_after is not None and i == pause_after:
            await asyncio.sleep(pause)


async def collect(source, window):
    return [t async for t in coalesce(source, window)]


async def test_window_zero_passes_everything_through():
    items = [delta("answer", c) for c in "abc"]
    assert await collect(burst(*items), 0) == items


async def test_a_burst_is_merged_but_the_first_token_goes_alone():
    items = [delta("answer", c) for c in "abcdef"]
    out = await collect(burst(*items), 10.0)  # a window far longer than the burst
    assert out == [delta("answer", "a"), delta("answer", "bcdef")]


async def test_kinds_are_not_merged_together_and_order_holds():
    items = [
        delta("thinking", "x"),
        delta("thinking", "y"),
        Thought("action", "go"),
        delta("answer", "1"),
        delta("answer", "2"),
    ]
    out = await collect(burst(*items), 10.0)
    assert [t.type for t in out] == ["thinking", "thinking", "action", "answer"]
    assert "".join(t.content for t in out if t.type == "answer") == "12"
    assert out[1].content == "y"


async def test_after_a_quiet_window_a_token_goes_at_once():
    items = [delta("answer", "a"), delta("answer", "b"), delta("answer", "c")]
    out = await collect(burst(*items, pause_after=1, pause=0.2), 0.05)
    assert [t.content for t in out] == ["a", "b", "c"]


async def test_a_failing_source_fails_the_consumer():
    async def broken():
        yield delta("answer", "a")
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        await collect(broken(), 10.0)


async def test_whole_items_are_never_merged_nor_a_delta_with_a_whole():
    items = [
        Thought("thinking", "first step"),
        Thought("thinking", "second step"),
        delta("answer", "a"),
        Thought("answer", "whole"),
        delta("answer", "b"),
        delta("answer", "c"),
    ]
    out = await collect(burst(*items), 10.0)
    assert out == [*items[:4], delta("answer", "bc")]


async def test_tool_input_merges_within_its_call_only_and_keeps_the_calls_fields():
    items = [
        delta("tool_input", "{", call_id="a", tool="add"),
        delta("tool_input", '"x": 1', call_id="a", tool="add"),
        delta("tool_input", "}", call_id="a", tool="add"),
        delta("tool_input", "{", call_id="b", tool="add"),
        delta("tool_input", "}", call_id="b", tool="add"),
        Thought("action", "add()", {"tool": "add", "arguments": {}, "call_id": "b"}),
    ]
    out = await collect(burst(*items), 10.0)
    assert [(t.content, t.extra) for t in out] == [
        ("{", {"delta": True, "call_id": "a", "tool": "add"}),
        ('"x": 1}', {"delta": True, "call_id": "a", "tool": "add"}),
        ("{}", {"delta": True, "call_id": "b", "tool": "add"}),
        ("add()", {"tool": "add", "arguments": {}, "call_id": "b"}),
    ]


async def test_the_simulated_agents_jitter_keeps_every_token_in_order():
    agent = SimulatedAgent(step_delay=0, answer_tokens=20, tokens_per_second=1000, jitter=0.5)
    thoughts = [t async for t in agent.run(Turn("q", []))]
    answer = [t.content for t in thoughts if t.type == "answer"]
    assert answer == answer_tokens(20)


@pytest.mark.parametrize("count", [1, 8, 12, 23, 24, 25, 60, 1000])
def test_the_demo_answer_ends_where_its_paragraph_ends(count):
    """However many tokens it is cut into, the answer is whole sentences: the default 12
    used to end at "...think one token at a time instead of" (cycled words, cut short)."""
    tokens = answer_tokens(count)
    assert len(tokens) == count and all(t.strip() for t in tokens)
    text = "".join(tokens).strip()
    assert text.startswith("Based on my research") and text.endswith("the whole reply.")
