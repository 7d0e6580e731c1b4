"""Traces: one trace follows a prompt from a frontend process through a worker process,
its model call with the server's token counts, and back to the first event relayed.

Each process writes its spans to a file of its own (THOUGHTWIRE_TRACE_FILE); the model
is the local fake OpenAI server, so the model call has usage to report.
"""

import json
import subprocess
import sys
import textwrap

import pytest

from tests.conftest import openai_env, start_cluster
from tests.fake_openai import Reply
from tests.procs import seconds, wait_until
from tests.wsclient import connect, greeting, run_events

pytest.importorskip(
    "opentelemetry.sdk", reason="the thoughtwire[otel] extra (in the test extras) is not installed"
)

USAGE = {"prompt_tokens": 31, "completion_tokens": 7, "total_tokens": 38}


@pytest.fixture(scope="module")
def traced(redis_server, logdir, llm):
    c = start_cluster(
        redis_server,
        logdir,
        frontends=0,
        workers=0,
        **openai_env(llm),
        THOUGHTWIRE_OPENAI_MODEL="test-model",
        THOUGHTWIRE_TRACING="1",
    )
    try:
        c.add_worker(THOUGHTWIRE_TRACE_FILE=str(c.logdir / "worker-spans.jsonl"))
        c.add_frontend(THOUGHTWIRE_TRACE_FILE=str(c.logdir / "frontend-spans.jsonl"))
        yield c
    finally:
        c.stop()


def spans(path):
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def named(found, name):
    return [s for s in found if s["name"] == name]


async def test_one_trace_joins_the_prompt_the_run_and_the_model_call_with_its_usage(traced, llm):
    llm.replies.extend(
        [
            Reply.tool_calls(("call_1", "calculator", ['{"expression": "6 * 7"}'])),
            Reply.text("It is", " 42.", usage=USAGE),
        ]
    )
    async with connect(traced.frontends[0].ws + "/ws/agent-thoughts") as ws:
        session = await greeting(ws)
        await ws.send("What is 6*7?")
        events = await run_events(ws, timeout=30)
    assert events[-1]["type"] == "done"
    run = events[0]["run"]

    frontend_file = traced.logdir / "frontend-spans.jsonl"
    worker_file = traced.logdir / "worker-spans.jsonl"
    wait_until(lambda: named(spans(frontend_file), "first event relayed"), 10, "the relay span")
    wait_until(lambda: named(spans(worker_file), "run"), 10, "the run span")
    front, worker = spans(frontend_file), spans(worker_file)

    (prompt,) = named(front, "prompt")
    (relayed,) = named(front, "first event relayed")
    (attempt,) = named(worker, "run")
    (queued,) = named(worker, "queued")
    calls = named(worker, "chat test-model")
    (tool,) = named(worker, "execute_tool calculator")
    appends = named(worker, "append")

    trace = prompt["context"]["trace_id"]
    for span in [relayed, attempt, queued, *calls, tool, *appends]:
        assert span["context"]["trace_id"] == trace, span["name"]
    assert prompt["attributes"]["thoughtwire.run"] == run
    assert prompt["attributes"]["thoughtwire.session"] == session
    # The worker's spans continue the frontend's: the context went with the job.
    assert attempt["parent_id"] == prompt["context"]["span_id"]
    assert queued["parent_id"] == prompt["context"]["span_id"]
    assert relayed["parent_id"] == prompt["context"]["span_id"]
    assert attempt["attributes"]["thoughtwire.run"] == run
    assert attempt["attributes"]["thoughtwire.attempt"] == 1
    assert attempt["attributes"]["thoughtwire.outcome"] == "done"
    # Model calls, the tool call and the appends are the run's children.
    for span in [*calls, tool, *appends]:
        assert span["parent_id"] == attempt["context"]["span_id"], span["name"]
    assert len(calls) == 2 and appends
    last = calls[-1]["attributes"]
    assert last["gen_ai.operation.name"] == "chat"
    assert last["gen_ai.request.model"] == "test-model"
    assert last["gen_ai.usage.input_tokens"] == USAGE["prompt_tokens"]
    assert last["gen_ai.usage.output_tokens"] == USAGE["completion_tokens"]
    assert tool["attributes"]["gen_ai.tool.name"] == "calculator"
    assert prompt["resource"]["attributes"]["service.name"] == "thoughtwire-api"
    assert attempt["resource"]["attributes"]["service.name"] == "thoughtwire-worker"


def test_tracing_off_imports_nothing_of_opentelemetry():
    # In a fresh process: fastapi (and so the frontend) imports opentelemetry's API by
    # itself, so what counts is what thoughtwire adds over its dependencies.
    script = textwrap.dedent(
        """
        import sys
        import fastapi, openai, redis, orjson, httpx, uvicorn  # dependencies' own imports
        def otel():
            return {m for m in sys.modules if m.startswith("opentelemetry")}
        before = otel()
        from thoughtwire.shared import tracing
        from thoughtwire.shared.settings import Settings
        import thoughtwire.api.app, thoughtwire.worker.main, thoughtwire.worker.agents.openai_chat
        assert not tracing.configure(Settings(), "test")
        with tracing.span("x") as span:
            assert span is None and tracing.traceparent() is None
        tracing.end(tracing.start("y"))
        tracing.record("z", 0, parent="00-" + "1" * 32 + "-" + "2" * 16 + "-01")
        tracing.annotate({"a": 1})
        print(sorted(otel() - before))
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=seconds(60)
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
