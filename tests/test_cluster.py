"""Two frontends and a worker, each a real process, on a real redis-server."""

import asyncio
import json

import pytest

from tests.conftest import SIM_STEPS, start_cluster
from tests.wsclient import connect, greeting, recv_json, recv_text, run_events


@pytest.fixture(scope="module")
def cluster(redis_server, logdir):
    c = start_cluster(redis_server, logdir, THOUGHTWIRE_PING_INTERVAL="0.3")
    yield c
    c.stop()


def assert_complete_run(events):
    types = [e["type"] for e in events]
    steps = len(SIM_STEPS)
    assert types[:steps] == SIM_STEPS
    assert set(types[steps:-2]) == {"answer"} and len(types[steps:-2]) == 8
    assert types[-2:] == ["block_end", "done"]
    assert len({e["run"] for e in events}) == 1
    assert all(isinstance(e["ts"], int) and e["ts"] > 1_600_000_000_000 for e in events)


async def test_a_prompt_through_frontend_a_is_run_by_the_worker_and_streamed_back(cluster):
    a = cluster.frontends[0]
    async with connect(a.ws + "/ws/agent-thoughts") as ws:
        session = await greeting(ws)
        await ws.send("What is machine learning?")
        events = await run_events(ws)
    assert_complete_run(events)
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
    assert {e["session"] for e in events} == {session}
    action = next(e for e in events if e["type"] == "action")
    assert "What is machine learning?" in action["content"]


async def test_a_viewer_on_frontend_b_gets_the_same_events_in_the_same_order(cluster):
    a, b = cluster.frontends
    async with connect(a.ws + "/ws/agent-thoughts") as prompter:
        session = await greeting(prompter)
        async with connect(f"{b.ws}/ws/agent-thoughts?session={session}") as viewer:
            assert await greeting(viewer) == session
            for _ in range(2):  # and again for a second run in the same session
                await prompter.send(json.dumps({"type": "prompt", "content": "hello"}))
                mine, theirs = await asyncio.gather(run_events(prompter), run_events(viewer))
                assert mine == theirs
                assert_complete_run(theirs)
    assert [e["seq"] for e in mine] == list(range(len(mine) + 1, 2 * len(mine) + 1))


async def test_a_personal_message_from_b_reaches_a_client_on_a(cluster):
    a, b = cluster.frontends
    async with connect(a.ws + "/ws/alice") as alice, connect(b.ws + "/ws/bob") as bob:
        await greeting(alice)
        await greeting(bob)
        await bob.send(json.dumps({"type": "personal", "to": "alice", "content": "hi alice"}))
        message = await recv_json(alice)
        assert message == {
            "type": "personal",
            "content": "hi alice",
            "sender": "bob",
            "to": "alice",
        }


async def test_a_personal_message_to_nobody_is_reported(cluster):
    async with connect(cluster.frontends[0].ws + "/ws/carol") as carol:
        await greeting(carol)
        await carol.send(json.dumps({"type": "personal", "to": "nobody-here", "content": "?"}))
        message = await recv_json(carol)
        assert (message["type"], message["code"]) == ("error", "not_connected")


async def test_a_broadcast_reaches_clients_on_both_frontends(cluster):
    a, b = cluster.frontends
    async with (
        connect(a.ws + "/ws/dave") as dave,
        connect(b.ws + "/ws/erin") as erin,
        connect(b.ws + "/ws/frank") as frank,
    ):
        for ws in (dave, erin, frank):
            await greeting(ws)
        await erin.send(json.dumps({"type": "broadcast", "content": "hello all"}))
        for ws in (dave, erin, frank):
            assert await recv_json(ws) == {
                "type": "broadcast",
                "content": "hello all",
                "sender": "erin",
            }


async def test_the_connection_manager_runs_prompts_for_its_client(cluster):
    async with connect(cluster.frontends[1].ws + "/ws/grace") as ws:
        await greeting(ws)
        await ws.send("plan my day")
        assert_complete_run(await run_events(ws))


@pytest.mark.parametrize(
    ("frame", "code"),
    [
        ("{this is not json", "bad_json"),
        ('{"type":"launch-missiles"}', "unknown_type"),
        # Half an emoji, as JSON.stringify writes a string cut in the middle of one: refused
        # naming its key, so a client gives it up rather than resend it on every connection.
        ('{"type":"prompt","content":"hi \\ud83d","key":"k-half"}', "bad_message"),
        ('{"type":"prompt","content":"   "}', "empty_prompt"),
        ("", "empty_prompt"),
    ],
)
@pytest.mark.parametrize("endpoint", ["/ws/agent-thoughts", "/ws/robust"])
async def test_bad_input_gets_a_clear_error_and_the_socket_survives(cluster, endpoint, frame, code):
    async with connect(cluster.frontends[0].ws + endpoint) as ws:
        await greeting(ws)
        await ws.send(frame)
        message = await recv_json(ws)
        while message["type"] == "ping":
            message = await recv_json(ws)
        assert message["type"] == "error" and message["code"] == code
        assert message["message"] and "Traceback" not in message["message"]
        assert message.get("key") == ("k-half" if "k-half" in frame else None)
        await ws.send("still there?")
        assert_complete_run(await run_events(ws))


async def test_a_binary_frame_is_refused_without_closing(cluster):
    async with connect(cluster.frontends[0].ws + "/ws/agent-thoughts") as ws:
        await greeting(ws)
        await ws.send(b"\x00\x01")
        assert (await recv_json(ws))["code"] == "bad_frame"
        await ws.send("after binary")
        assert_complete_run(await run_events(ws))


async def test_echo_is_upper_cased_by_a_worker(cluster):
    async with connect(cluster.frontends[0].ws + "/ws") as ws:
        await ws.send("hello, world")
        assert await recv_text(ws) == "HELLO, WORLD"


@pytest.mark.parametrize(
    ("endpoint", "marker"), [("/ws/agent", "[DONE]"), ("/ws/chat", "\n[DONE]")]
)
async def test_plain_text_endpoints_stream_answer_chunks_then_done(cluster, endpoint, marker):
    async with connect(cluster.frontends[1].ws + endpoint) as ws:
        await ws.send("hi")
        chunks = []
        while (chunk := await recv_text(ws)) != marker:
            chunks.append(chunk)
    assert len(chunks) == 8
    assert "".join(chunks).startswith("Based on my research")


async def test_robust_pings_after_an_idle_period(cluster):
    async with connect(cluster.frontends[0].ws + "/ws/robust") as ws:
        await greeting(ws)
        assert await recv_json(ws) == {"type": "ping"}
        await ws.send('{"type":"pong"}')
        await ws.send("and now a prompt")
        assert_complete_run(await run_events(ws))
