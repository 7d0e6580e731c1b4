from __future__ import annotations

import secrets
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from redis.asyncio import Redis

from tests.fake_openai import FakeOpenAI
from tests.procs import (
    Frontend,
    Proc,
    RedisServer,
    make_logdir,
    stop_leftovers,
    thoughtwire,
    wait_until,
)
from tests.redis_cluster import redis_cluster  # noqa: F401  (a fixture for every module)
from thoughtwire.shared.redis import RedisFactory
from thoughtwire.shared.settings import Settings


@pytest.fixture(scope="session", autouse=True)
def _no_process_outlives_the_suite() -> Iterator[None]:
    yield
    stop_leftovers()


@pytest.fixture(scope="session")
def logdir() -> Path:
    return make_logdir("tests")


@pytest.fixture(scope="session")
def redis_server(logdir: Path) -> Iterator[RedisServer]:
    """One real redis-server for the whole run; tests separate themselves by key prefix."""
    workdir = logdir / "redis"
    workdir.mkdir()
    server = RedisServer(workdir).start()
    yield server
    server.stop()


@pytest.fixture
def prefix() -> str:
    return "t" + secrets.token_hex(4)


@pytest.fixture(params=["redis-server", "embedded"])
async def redis_client(request: pytest.FixtureRequest) -> AsyncIterator[Redis]:
    """A command client on the session's redis-server, then on the embedded Redis."""
    if request.param == "redis-server":
        server = request.getfixturevalue("redis_server")
        redis = RedisFactory(Settings(redis_url=server.url, redis_pool_size=4)).commands()
    else:
        redis = RedisFactory(Settings()).commands()
    yield redis
    await redis.aclose()


@dataclass
class Cluster:
    """Frontends and workers sharing one Redis and one key prefix."""

    redis: RedisServer
    prefix: str
    env: dict[str, str]
    logdir: Path
    frontends: list[Frontend] = field(default_factory=list)
    workers: list[Proc] = field(default_factory=list)
    started: int = 0  # frontends started so far, the listed and the replaced

    def add_frontend(self, **env: str) -> Frontend:
        # Numbered by frontends started, not listed: a replacement gets its own log file.
        self.started += 1
        name = f"frontend-{self.started - 1}"
        frontend = Frontend(name, {**self.env, **env}, self.logdir).start()
        self.frontends.append(frontend)
        return frontend

    def add_worker(self, **env: str) -> Proc:
        worker = thoughtwire(
            f"worker-{len(self.workers)}", ["worker"], {**self.env, **env}, self.logdir
        )
        self.workers.append(worker.start())
        return worker

    def frontend_at(self, url: str) -> Frontend:
        """The frontend a client URL points at."""
        return next(f for f in self.frontends if f"{url}/".startswith(f"{f.ws}/"))

    def worker_with_pid(self, pid: int) -> Proc:
        return next(w for w in self.workers if w.pid == pid)

    def stop(self) -> None:
        for proc in [*(f.proc for f in self.frontends), *self.workers]:
            proc.stop()


def start_cluster(
    redis: RedisServer, logdir: Path, frontends: int = 2, workers: int = 1, **env: str
) -> Cluster:
    prefix = "c" + secrets.token_hex(4)
    base = {
        "REDIS_URL": redis.url,
        "THOUGHTWIRE_KEY_PREFIX": prefix,
        "THOUGHTWIRE_AGENT": "simulated",
        "THOUGHTWIRE_SIM_STEP_DELAY": "0",
        "THOUGHTWIRE_SIM_TOKENS_PER_SECOND": "0",
        "THOUGHTWIRE_SIM_ANSWER_TOKENS": "8",
        "OPENAI_API_KEY": "",
        "THOUGHTWIRE_DRAIN_WINDOW": "0.2",
        "THOUGHTWIRE_COALESCE_MS": "0",  # the tests count events exactly
        "THOUGHTWIRE_DRAIN_TIMEOUT": "5",
        **env,
    }
    cluster = Cluster(redis, prefix, base, logdir / prefix)
    cluster.logdir.mkdir()
    try:
        for _ in range(workers):
            cluster.add_worker()
        for _ in range(frontends):
            cluster.add_frontend()
        for worker in cluster.workers:  # started meanwhile: a test's first run finds them all
            wait_until(lambda w=worker: claiming(w), 30, f"{worker.name} to claim jobs")
    except BaseException:
        cluster.stop()  # what did start must not outlive the test run
        raise
    return cluster


def claiming(worker: Proc) -> bool:
    """The worker consumes jobs (or has stopped, which the test that started it is about)."""
    return "claiming jobs" in worker.output() or not worker.alive()


# The event types of a simulated run before its answer: its search call's arguments stream
# in three tool_input pieces before the whole action (docs/protocol.md, "Blocks").
SIM_STEPS = [
    "thinking",
    "thinking",
    "tool_input",
    "tool_input",
    "tool_input",
    "action",
    "observation",
    "thinking",
]


def sim_run(tokens: int) -> list[str]:
    """The event types of a whole simulated run: steps, answer deltas, their end, done."""
    return [*SIM_STEPS, *["answer"] * tokens, "block_end", "done"]


@pytest.fixture(scope="module")
def llm() -> Iterator[FakeOpenAI]:
    """A fake OpenAI server over HTTP for one test module (tests/fake_openai.py)."""
    server = FakeOpenAI().start()
    yield server
    server.stop()


def openai_env(llm) -> dict[str, str]:  # type: ignore[no-untyped-def]
    """Settings for workers whose openai agent talks to a local fake server."""
    return {
        "THOUGHTWIRE_AGENT": "openai",
        "OPENAI_API_KEY": "sk-test",
        "OPENAI_BASE_URL": llm.base_url,
    }


@pytest.fixture(scope="module")
def cluster(redis_server: RedisServer, logdir: Path) -> Iterator[Cluster]:
    """Two frontends (real uvicorn processes) and one worker process on a real Redis."""
    c = start_cluster(redis_server, logdir)
    yield c
    c.stop()
