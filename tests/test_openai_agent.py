"""The openai agent for real: the openai client in a worker process, over HTTP, to a local server."""

import pytest

from tests.conftest import start_cluster
from tests.fake_openai import FakeOpenAI, Reply
from tests.wsclient import connect, greeting, recv_text, run_events


@pytest.fixture(scope="module")
def llm():
    server = FakeOpenAI().start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def openai_cluster(redis_server, logdir, llm):
    c = start_cluster(
        redis_server,
        logdir,
        frontends=1,
        THOUGHTWIRE_AGENT="openai",
        OPENAI_API_KEY="sk-test",
        OPENAI_BASE_URL=llm.base_url,
        THOUGHTWIRE_OPENAI_MODEL="test-model",
    )
    yield c
    c.stop()


async def test_answer_tokens_stream_from_the_model(openai_cluster, llm):
    llm.replies.append(Reply.text("Machine", " learning", " is", " learning", " from", " data."))
    async with connect(openai_cluster.frontends[0].ws + "/ws/agent-thoughts") as ws:
        await greeting(ws)
        await ws.send("What is machine learning?")
        events = await run_events(ws)
    assert [e["type"] for e in events] == ["answer"] * 6 + ["done"]
    assert "".join(e["content"] for e in events[:-1]) == "Machine learning is learning from data."
    request = llm.requests[-1]
    assert request["body"]["stream"] is True
    assert request["body"]["model"] == "test-model"
    assert request["body"]["messages"][-1] == {
        "role": "user",
        "content": "What is machine learning?",
    }


async def test_chat_endpoint_streams_the_reply_chunk_by_chunk(openai_cluster, llm):
    llm.replies.append(Reply.text("Hel", "lo", "!"))
    async with connect(openai_cluster.frontends[0].ws + "/ws/chat") as ws:
        await ws.send("say hello")
        assert [await recv_text(ws) for _ in range(4)] == ["Hel", "lo", "!", "\n[DONE]"]


async def test_a_provider_failure_reaches_the_client_as_a_safe_error(openai_cluster, llm):
    llm.replies.extend([Reply(status=400)])
    async with connect(openai_cluster.frontends[0].ws + "/ws/chat") as ws:
        await ws.send("fail please")
        message = await recv_text(ws)
    assert message == "[ERROR] the model provider failed"
    assert llm.base_url not in message
