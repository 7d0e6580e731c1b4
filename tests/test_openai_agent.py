"""The openai agent for real: the openai client, in a worker process, over HTTP, against a
local server that speaks the Chat Completions streaming format and is scripted per test."""

import json
import signal

import pytest

from tests.conftest import openai_env, start_cluster
from tests.fake_openai import Reply
from tests.wsclient import connect, greeting, recv_text, run_events
from thoughtwire.shared.reducer import fold


@pytest.fixture(scope="module")
def agents(redis_server, logdir, llm):
    c = start_cluster(
        redis_server,
        logdir,
        frontends=1,
        **openai_env(llm),
        THOUGHTWIRE_OPENAI_MODEL="test-model",
        THOUGHTWIRE_COALESCE_MS="0",
        THOUGHTWIRE_OPENAI_IDLE_TIMEOUT="1",
        THOUGHTWIRE_TOOLS="tests.agent_tools:explode,tests.agent_tools:add",
    )
    yield c
    c.stop()


@pytest.fixture(autouse=True)
def fresh_script(llm):
    llm.replies.clear()
    llm.requests.clear()


async def run_prompt(cluster, prompt, session=None):
    query = f"?session={session}" if session else ""
    async with connect(cluster.frontends[0].ws + "/ws/agent-thoughts" + query) as ws:
        await greeting(ws)
        await ws.send(prompt)
        return await run_events(ws, timeout=30)


def kinds(events):
    return [e["type"] for e in events]


def of(events, kind):
    return [e for e in events if e["type"] == kind]


async def test_reasoning_then_a_tool_call_in_pieces_then_the_answer(agents, llm):
    llm.replies.extend(
        [
            Reply.tool_calls(
                ("call_1", "calculator", ['{"expre', 'ssion": "2 * ', '(3 + 4)"}']),
                reasoning=("Let me ", "compute."),
            ),
            Reply.text(
                "The answer",
                " is 14.",
                usage={"prompt_tokens": 30, "completion_tokens": 9, "total_tokens": 39},
            ),
        ]
    )
    events = await run_prompt(agents, "What is 2*(3+4)?")
    assert kinds(events) == [
        "thinking",
        "thinking",
        "block_end",
        "tool_input",
        "tool_input",
        "tool_input",
        "action",
        "observation",
        "answer",
        "answer",
        "block_end",
        "done",
    ]
    assert [e["content"] for e in events[:2]] == ["Let me ", "compute."]
    action, observation = events[6], events[7]
    # The run's id for the first call of the first step; the server's goes back to the model.
    assert (action["tool"], action["arguments"], action["call_id"]) == (
        "calculator",
        {"expression": "2 * (3 + 4)"},
        "c1.1",
    )
    assert (observation["content"], observation["call_id"], observation["is_error"]) == (
        "14",
        "c1.1",
        False,
    )
    assert events[8]["content"] + events[9]["content"] == "The answer is 14."
    done = events[-1]
    assert done["finish_reason"] == "stop"
    assert done["usage"] == {
        "prompt_tokens": 30,
        "completion_tokens": 9,
        "total_tokens": 39,
        "estimated": False,
    }
    assert done["ttft_ms"] >= 0 and done["total_ms"] >= done["ttft_ms"]
    # The model was asked again with the call and its result.
    second = llm.requests[1]["body"]
    assert second["messages"][-2]["tool_calls"][0]["function"] == {
        "name": "calculator",
        "arguments": '{"expression": "2 * (3 + 4)"}',
    }
    assert second["messages"][-1] == {"role": "tool", "tool_call_id": "call_1", "content": "14"}
    tools = {t["function"]["name"] for t in llm.requests[0]["body"]["tools"]}
    assert tools == {"calculator", "current_time", "explode", "add"}


async def test_two_tool_calls_in_one_turn(agents, llm):
    llm.replies.extend(
        [
            Reply.tool_calls(
                ("a", "add", ['{"a": 2,', ' "b": 3}']),
                ("b", "current_time", ['{"timezone": "Asia/Tokyo"}']),
            ),
            Reply.text("Done."),
        ]
    )
    events = await run_prompt(agents, "two things")
    assert kinds(events) == [
        "tool_input",
        "tool_input",
        "action",
        "tool_input",
        "action",
        "observation",
        "observation",
        "answer",
        "block_end",
        "done",
    ]
    actions, observations = of(events, "action"), of(events, "observation")
    assert [e["tool"] for e in actions] == ["add", "current_time"]
    assert [e["block"] for e in actions] == ["b1", "b2"]
    assert [e["block"] for e in of(events, "tool_input")] == ["b1", "b1", "b2"]
    assert [e["block"] for e in observations] == ["b3", "b4"]
    assert observations[0]["content"] == "5"
    assert observations[1]["content"].endswith("+09:00")


async def test_a_tool_that_raises_becomes_an_observation_and_the_run_goes_on(agents, llm):
    llm.replies.extend(
        [Reply.tool_calls(("x", "explode", ['{"reason": "testing"}'])), Reply.text("It failed.")]
    )
    events = await run_prompt(agents, "break something")
    assert kinds(events) == ["tool_input", "action", "observation", "answer", "block_end", "done"]
    [observation] = of(events, "observation")
    assert observation["is_error"] is True
    assert observation["content"] == "error: the tool failed (RuntimeError)"
    assert "Traceback" not in observation["content"]


async def test_a_429_with_retry_after_is_retried_then_succeeds(agents, llm):
    llm.replies.extend(
        [Reply(status=429, headers={"Retry-After": "1"}), Reply.text("Hello", " again")]
    )
    events = await run_prompt(agents, "rate limited")
    assert kinds(events) == ["answer", "answer", "block_end", "done"]
    assert len(llm.requests) == 2


async def test_a_failure_after_tokens_ends_the_run_with_a_safe_error(agents, llm):
    llm.replies.append(Reply.text("one", " two", " three", error_after=2))
    events = await run_prompt(agents, "fail midway")
    assert kinds(events) == ["answer", "answer", "block_end", "error"]
    assert events[-1]["content"] == "the model provider failed while answering"
    assert len(llm.requests) == 1  # never retried once tokens were out


async def test_a_stream_that_stops_sending_is_cut_off(agents, llm):
    llm.replies.append(Reply.text("so", " far", " never", hang_after=2))
    events = await run_prompt(agents, "hang")
    assert kinds(events) == ["answer", "answer", "block_end", "error"]
    assert events[-1]["content"] == "the model provider stopped responding"


async def test_a_wrong_api_key_fails_fast_and_says_so(agents, llm):
    llm.replies.append(Reply(status=401))
    events = await run_prompt(agents, "who am I")
    assert kinds(events) == ["error"]
    assert events[0]["content"] == "the model provider rejected the API key; check OPENAI_API_KEY"
    assert len(llm.requests) == 1
    for event in events:
        assert llm.base_url not in json.dumps(event) and "sk-test" not in json.dumps(event)


async def test_chat_endpoint_streams_the_reply_chunk_by_chunk(agents, llm):
    llm.replies.append(Reply.text("Hel", "lo", "!"))
    async with connect(agents.frontends[0].ws + "/ws/chat") as ws:
        await ws.send("say hello")
        assert [await recv_text(ws) for _ in range(4)] == ["Hel", "lo", "!", "\n[DONE]"]


async def test_a_second_prompt_on_another_worker_sees_the_first_turn(agents, llm):
    llm.replies.extend(
        [Reply.tool_calls(("c1", "add", ['{"a": 40, "b": 2}'])), Reply.text("It is 42.")]
    )
    first = await run_prompt(agents, "What is 40 + 2?")
    session = first[0]["session"]
    # Stop the worker that ran it: the next prompt must be taken by a fresh one.
    newcomer = agents.add_worker()
    old = agents.workers[0]
    assert old.stop() in (0, -signal.SIGTERM)
    agents.workers.remove(old)

    llm.replies.append(Reply.text("You asked about 40 + 2."))
    second = await run_prompt(agents, "What did I ask?", session=session)
    assert second[-1]["type"] == "done"
    assert newcomer.alive()
    messages = llm.requests[-1]["body"]["messages"]
    assert [m["role"] for m in messages] == ["user", "assistant", "tool", "assistant", "user"]
    assert messages[0]["content"] == "What is 40 + 2?"
    assert messages[2] == {"role": "tool", "tool_call_id": "c1", "content": "42"}
    assert messages[3]["content"] == "It is 42."
    assert messages[4]["content"] == "What did I ask?"


async def test_reasoning_a_call_in_four_pieces_and_the_answer_stream_as_v2_blocks(agents, llm):
    """Reasoning deltas, each argument piece as it arrives (with the call's id and tool,
    which the server sends with the first piece only), the whole parsed action, its
    observation, answer deltas; a block each, every delta block closed once."""
    llm.replies.extend(
        [
            Reply.tool_call(
                "call_9",
                "add",
                {"a": 40, "b": 2},
                pieces=4,
                reasoning=("I should ", "add."),
            ),
            Reply.text("It is ", "**42**."),
        ]
    )
    events = await run_prompt(agents, "What is 40 + 2?")
    shape = [(e["type"], e.get("block"), e.get("delta")) for e in events]
    assert shape == [
        ("thinking", "b1", True),
        ("thinking", "b1", True),
        ("block_end", "b1", None),
        *[("tool_input", "b2", True)] * 4,
        ("action", "b2", False),
        ("observation", "b3", False),
        ("answer", "b4", True),
        ("answer", "b4", True),
        ("block_end", "b4", None),
        ("done", None, None),
    ]
    pieces = of(events, "tool_input")
    assert {(e["call_id"], e["tool"]) for e in pieces} == {("c1.1", "add")}
    assert json.loads("".join(e["content"] for e in pieces)) == {"a": 40, "b": 2}
    [action] = of(events, "action")
    assert (action["call_id"], action["tool"], action["arguments"]) == (
        "c1.1",
        "add",
        {"a": 40, "b": 2},
    )
    [observation] = of(events, "observation")
    assert (observation["call_id"], observation["content"]) == ("c1.1", "42")
    assert "".join(e["content"] for e in of(events, "answer")) == "It is **42**."


@pytest.mark.parametrize("model_id", [None, "call_0"], ids=["no ids", "reused ids"])
async def test_calls_the_server_sends_without_ids_or_with_reused_ids_are_two_cards(
    agents, llm, model_id
):
    """Some compatible servers send no call id, or "call_0" at every step: each call still
    has its own id on every event, its own block and card, and the model is answered with
    the ids it sent."""
    llm.replies.extend(
        [
            Reply.tool_calls((model_id, "add", ['{"a": 1,', ' "b": 2}'])),
            Reply.tool_calls((model_id, "add", ['{"a": 3,', ' "b": 4}'])),
            Reply.text("3, then 7."),
        ]
    )
    events = await run_prompt(agents, "add twice")
    actions, observations = of(events, "action"), of(events, "observation")
    ids = [e["call_id"] for e in actions]
    assert all(ids) and len(set(ids)) == 2, ids
    assert [e["call_id"] for e in observations] == ids
    assert [e["content"] for e in observations] == ["3", "7"]
    for action in actions:
        pieces = [e for e in of(events, "tool_input") if e["call_id"] == action["call_id"]]
        assert {e["block"] for e in pieces} == {action["block"]}
    (run,) = fold(events)["runs"].values()
    calls = [b for b in run["blocks"] if b["kind"] == "tool_call"]
    assert [(c["call_id"], c["input"]) for c in calls] == [
        (ids[0], '{"a": 1, "b": 2}'),
        (ids[1], '{"a": 3, "b": 4}'),
    ]
    results = [b for b in run["blocks"] if b["kind"] == "tool_result"]
    assert [(r["call_id"], r["text"]) for r in results] == [(ids[0], "3"), (ids[1], "7")]
    # What goes back to the model pairs each result with the id its call came with.
    sent = llm.requests[-1]["body"]["messages"]
    asked = [m["tool_calls"][0]["id"] for m in sent if m.get("tool_calls")]
    answered = [m["tool_call_id"] for m in sent if m["role"] == "tool"]
    assert asked == answered
    if model_id is not None:
        assert asked == [model_id, model_id]
    else:
        assert all(asked) and len(set(asked)) == 2
