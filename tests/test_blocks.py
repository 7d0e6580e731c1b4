"""Blocks: the tracker with plain thoughts in and out, the simulated agent's shapes through
it, and a simulated run's log through a real worker and frontend."""

import json

import pytest

from tests.conftest import start_cluster
from tests.wsclient import connect, greeting, run_events
from thoughtwire.shared.protocol import Thought
from thoughtwire.worker.agents.base import Turn
from thoughtwire.worker.agents.simulated import SimulatedAgent
from thoughtwire.worker.blocks import BlockTracker

DELTA = {"delta": True}


def piece(text, call_id="c1", tool="search"):
    return Thought("tool_input", text, {"delta": True, "call_id": call_id, "tool": tool})


def action(call_id="c1", tool="search", arguments=None):
    extra = {"tool": tool, "arguments": arguments or {}, "call_id": call_id}
    return Thought("action", f"{tool}()", extra)


def feed(tracker, *thoughts):
    out = []
    for thought in thoughts:
        out += tracker.track(thought)
    return out


def shape(thoughts):
    """(type, block, delta) of each thought: what the tracker decides."""
    return [(t.type, t.extra.get("block"), t.extra.get("delta")) for t in thoughts]


def test_deltas_of_one_kind_share_a_block_and_the_next_block_ends_it():
    out = feed(
        BlockTracker(),
        Thought("thinking", "Let ", DELTA),
        Thought("thinking", "me see", DELTA),
        Thought("answer", "Hel", DELTA),
        Thought("answer", "lo", DELTA),
    )
    assert shape(out) == [
        ("thinking", "b1", True),
        ("thinking", "b1", True),
        ("block_end", "b1", None),
        ("answer", "b2", True),
        ("answer", "b2", True),
    ]
    assert [t.content for t in out] == ["Let ", "me see", "", "Hel", "lo"]


def test_each_whole_item_is_a_block_of_its_own_and_needs_no_end():
    tracker = BlockTracker()
    out = feed(
        tracker,
        Thought("thinking", "one"),
        Thought("thinking", "two"),
        Thought("answer", "all of it"),
    )
    assert shape(out) == [
        ("thinking", "b1", False),
        ("thinking", "b2", False),
        ("answer", "b3", False),
    ]
    assert tracker.close() == []


def test_a_whole_item_after_deltas_ends_their_block_first():
    out = feed(BlockTracker(), Thought("answer", "a", DELTA), Thought("thinking", "whole"))
    assert shape(out) == [
        ("answer", "b1", True),
        ("block_end", "b1", None),
        ("thinking", "b2", False),
    ]


def test_a_tool_calls_pieces_and_its_action_share_a_block_that_the_action_completes():
    tracker = BlockTracker()
    out = feed(
        tracker,
        Thought("thinking", "hm", DELTA),
        piece('{"qu'),
        piece('ery": '),
        piece('"x"}'),
        action(arguments={"query": "x"}),
        Thought("observation", "found", {"tool": "search", "call_id": "c1", "is_error": False}),
    )
    assert shape(out) == [
        ("thinking", "b1", True),
        ("block_end", "b1", None),
        ("tool_input", "b2", True),
        ("tool_input", "b2", True),
        ("tool_input", "b2", True),
        ("action", "b2", False),  # completes b2: no block_end for it
        ("observation", "b3", False),
    ]
    assert out[-2].extra == {
        "tool": "search",
        "arguments": {"query": "x"},
        "call_id": "c1",
        "block": "b2",
        "delta": False,
    }
    assert tracker.close() == []


def test_two_calls_streamed_one_after_the_other_get_a_block_each():
    """The openai agent's order: the next call's pieces start once the last is whole."""
    out = feed(
        BlockTracker(),
        piece('{"a": 1}', "a", "add"),
        action("a", "add"),
        piece('{"tz"', "b", "time"),
        piece(": 1}", "b", "time"),
        action("b", "time"),
    )
    assert shape(out) == [
        ("tool_input", "b1", True),
        ("action", "b1", False),
        ("tool_input", "b2", True),
        ("tool_input", "b2", True),
        ("action", "b2", False),
    ]


def test_pieces_of_two_calls_interleaved_end_each_others_block_but_keep_their_own():
    out = feed(BlockTracker(), piece("{", "a"), piece("{", "b"), piece("}", "a"), action("a"))
    assert shape(out) == [
        ("tool_input", "b1", True),
        ("block_end", "b1", None),
        ("tool_input", "b2", True),
        ("block_end", "b2", None),
        ("tool_input", "b1", True),
        ("action", "b1", False),
    ]


def test_an_action_with_no_pieces_is_a_whole_block_and_ends_open_deltas():
    out = feed(BlockTracker(), Thought("answer", "x", DELTA), action("z"))
    assert shape(out) == [
        ("answer", "b1", True),
        ("block_end", "b1", None),
        ("action", "b2", False),
    ]


def test_approval_and_decision_carry_the_block_of_their_call():
    tracker = BlockTracker()
    out = feed(
        tracker,
        piece("{}", "c7"),
        action("c7"),
        Thought("approval", "", {"call_id": "c7", "tool": "search", "arguments": {}}),
        Thought("decision", "", {"call_id": "c7", "decision": "allow"}),
        Thought("approval", "", {"call_id": "never-streamed"}),
    )
    assert [(t.type, t.extra["block"]) for t in out] == [
        ("tool_input", "b1"),
        ("action", "b1"),
        ("approval", "b1"),
        ("decision", "b1"),
        ("approval", "b2"),
    ]
    assert "delta" not in out[2].extra  # not content: the tool call's block stays as it was


def test_close_ends_the_open_block_once():
    tracker = BlockTracker()
    feed(tracker, Thought("answer", "a", DELTA))
    assert shape(tracker.close()) == [("block_end", "b1", None)]
    assert tracker.close() == []


@pytest.mark.parametrize(
    "thought",
    [
        Thought("retry", "", {"attempt": 2}),
        Thought("done", "", {"finish_reason": "stop"}),
        Thought("error", "boom"),
        Thought("cancelled", "stop"),
    ],
)
def test_events_outside_blocks_pass_unchanged_and_leave_the_open_block_open(thought):
    tracker = BlockTracker()
    feed(tracker, Thought("answer", "a", DELTA))
    assert tracker.track(thought) == [thought]
    assert shape(feed(tracker, Thought("answer", "b", DELTA))) == [("answer", "b1", True)]


def test_the_agents_thought_is_not_changed():
    extra = {"delta": True, "call_id": "c1", "tool": "search"}
    thought = Thought("tool_input", "{", extra)
    BlockTracker().track(thought)
    assert thought.extra == {"delta": True, "call_id": "c1", "tool": "search"}


STREAM = [
    Thought("thinking", "a", DELTA),
    piece("{", "c1"),
    piece("}", "c1"),
    action("c1"),
    Thought("approval", "", {"call_id": "c1"}),
    Thought("decision", "", {"call_id": "c1", "decision": "allow"}),
    Thought("observation", "ok", {"tool": "search", "call_id": "c1", "is_error": False}),
    Thought("answer", "x", DELTA),
    Thought("answer", "y", DELTA),
    Thought("thinking", "z"),
    piece("{", "c2"),
]


@pytest.mark.parametrize("cut", range(len(STREAM) + 1))
def test_a_tracker_restored_from_its_json_state_goes_on_as_the_first_would(cut):
    """Cut anywhere (an approval's checkpoint), through JSON: the same blocks, none reused."""
    whole = BlockTracker()
    expected = feed(whole, *STREAM) + whole.close()
    first = BlockTracker()
    out = feed(first, *STREAM[:cut])
    state = json.loads(json.dumps(first.state()))
    second = BlockTracker.restore(state)
    out += feed(second, *STREAM[cut:]) + second.close()
    assert out == expected


async def test_the_simulated_agents_run_in_blocks():
    agent = SimulatedAgent(step_delay=0, answer_tokens=5, tokens_per_second=0)
    tracker = BlockTracker()
    out = []
    async for thought in agent.run(Turn("What is machine learning?", [])):
        out += tracker.track(thought)
    out += tracker.close()
    assert shape(out) == [
        ("thinking", "b1", False),
        ("thinking", "b2", False),
        ("tool_input", "b3", True),
        ("tool_input", "b3", True),
        ("tool_input", "b3", True),
        ("action", "b3", False),
        ("observation", "b4", False),
        ("thinking", "b5", False),
        *[("answer", "b6", True)] * 5,
        ("block_end", "b6", None),
    ]
    pieces = "".join(t.content for t in out if t.type == "tool_input")
    assert json.loads(pieces) == {"query": "What is machine learning?"}
    call = out[5].extra
    assert (call["tool"], call["call_id"], call["arguments"]) == (
        "search",
        "call_1",
        {"query": "What is machine learning?"},
    )
    assert out[6].extra["call_id"] == "call_1" and out[6].extra["is_error"] is False
    assert {t.extra["call_id"] for t in out[2:5]} == {"call_1"}


# --- through a real worker and frontend ----------------------------------------------


@pytest.fixture(scope="module")
def cluster(redis_server, logdir):
    c = start_cluster(redis_server, logdir, frontends=1, THOUGHTWIRE_COALESCE_MS="20")
    yield c
    c.stop()


async def test_a_simulated_runs_log_has_blocks_deltas_and_a_block_end_before_done(cluster):
    async with connect(cluster.frontends[0].ws + "/ws/agent-thoughts") as ws:
        await greeting(ws)
        await ws.send("What is machine learning?")
        events = await run_events(ws)
    content = [e for e in events if e["type"] not in ("block_end", "done")]
    assert all(isinstance(e["block"], str) and isinstance(e["delta"], bool) for e in content)
    assert [e["type"] for e in events[:2]] == ["thinking", "thinking"]
    assert [e["block"] for e in events[:2]] == ["b1", "b2"]
    assert events[-2:] == [
        {**events[-2], "type": "block_end", "block": "b6"},
        {**events[-1], "type": "done"},
    ]
    call = [e for e in events if e["type"] in ("tool_input", "action")]
    assert {e["block"] for e in call} == {"b3"}
    assert [e["delta"] for e in call][-1] is False and all(e["delta"] for e in call[:-1])
    assert json.loads("".join(e["content"] for e in call[:-1])) == call[-1]["arguments"]
    answer = [e for e in events if e["type"] == "answer"]
    assert {e["block"] for e in answer} == {"b6"} and all(e["delta"] for e in answer)
    # Coalescing (20 ms here) merged deltas within their block only: the answer is whole.
    assert "".join(e["content"] for e in answer).strip().endswith("the whole reply.")
    assert [e["type"] for e in events].count("block_end") == 1
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
