"""``thoughtwire up``: one process, embedded Redis, in-process workers."""

import signal
import subprocess
import sys

import pytest

from tests.conftest import SIM_STEPS
from tests.procs import Frontend, seconds
from thoughtwire.client import ask

EMBEDDED_ENV = {
    "REDIS_URL": "",
    "OPENAI_API_KEY": "",
    "THOUGHTWIRE_SIM_STEP_DELAY": "0",
    "THOUGHTWIRE_SIM_TOKENS_PER_SECOND": "0",
    "THOUGHTWIRE_DRAIN_WINDOW": "0.2",
    "THOUGHTWIRE_COALESCE_MS": "0",
}


@pytest.fixture(scope="module")
def embedded(logdir):
    node = Frontend("embedded", EMBEDDED_ENV, logdir)
    node.proc.args[3:4] = ["up"]  # `thoughtwire up --host ... --port ...` instead of `api`
    node.proc.args.remove("--insecure")
    node.start()
    yield node
    # uvicorn re-raises SIGTERM once it has shut down cleanly
    assert node.proc.stop() in (0, -signal.SIGTERM), node.proc.output()[-2000:]
    assert "Application shutdown complete" in node.proc.output()


async def test_a_prompt_runs_end_to_end(embedded):
    events = [e async for e in ask("What is machine learning?", embedded.ws + "/ws/agent-thoughts")]
    assert [e["type"] for e in events][: len(SIM_STEPS)] == SIM_STEPS
    assert events[-1]["type"] == "done"
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
    assert "open http://127.0.0.1:" in embedded.proc.output()


def test_the_terminal_client_prints_each_thought(embedded):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "thoughtwire",
            "chat",
            "What is ML?",
            "--url",
            embedded.ws + "/ws/agent-thoughts",
        ],
        capture_output=True,
        text=True,
        timeout=seconds(30),
        check=True,
    )
    lines = result.stdout.splitlines()
    assert lines[0] == "💭 Analyzing the question..."
    # The tool call, its arguments on its line or the next: they carry the prompt.
    tool = next(i for i, line in enumerate(lines) if "🔧" in line)
    assert "What is ML?" in " ".join(lines[tool : tool + 2])
    answer = next(i for i, line in enumerate(lines) if line.startswith("✅"))
    assert lines[answer].startswith("✅ Based on my research") and answer > tool
