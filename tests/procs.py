"""Real processes for tests: redis-server, frontends, workers. Each is stopped by its own PID."""

from __future__ import annotations

import itertools
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import redis

# One knob scales every wait in the suite, for slow machines.
TIME_SCALE = float(os.environ.get("TEST_TIME_SCALE", "1"))


def seconds(value: float) -> float:
    return value * TIME_SCALE


# Ports for the servers a test starts come from a block of this process's own, below the
# kernel's ephemeral range (32768 and up on Linux): the kernel's bind(0) may hand out one
# port twice in a row, and a port picked there can be taken as a client's source port
# before its server binds it. Each xdist worker has a block; a random start in it keeps
# two runs on one machine apart too.
PORTS_FROM, PORTS_PER_BLOCK, BLOCKS = 20_000, 3_000, 4
_block = int(os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw") or 0) % BLOCKS
_ports = itertools.cycle(
    [
        PORTS_FROM + _block * PORTS_PER_BLOCK + (offset + start) % PORTS_PER_BLOCK
        for start in [random.randrange(PORTS_PER_BLOCK)]
        for offset in range(PORTS_PER_BLOCK)
    ]
)


def free_port() -> int:
    """A loopback port nobody listens on, never handed out twice in a row by this process."""
    for _ in range(PORTS_PER_BLOCK):  # bounded: one turn of the block
        port = next(_ports)
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue  # in use (or lingering): the next one
            return port
    raise RuntimeError("no free port in this process's block")


def wait_until(check, timeout: float, what: str, interval: float = 0.05):  # type: ignore[no-untyped-def]
    """Poll ``check`` until it returns something truthy, for at most ``timeout`` seconds."""
    deadline = time.monotonic() + seconds(timeout)
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(interval)


# Every process a test started, so that none is forgotten: one dropped while running would
# be reaped by nobody, and its Popen would warn in whichever test the garbage collector
# happened to run. What is still running when the suite ends is stopped (conftest.py).
STARTED: list[Proc] = []


def stop_leftovers() -> None:
    """Stop, by PID, every process the tests started that is still running."""
    for proc in STARTED:
        proc.stop(timeout=5)
    STARTED.clear()


@dataclass
class Proc:
    """A child process with its output in a log file; stopped by PID, never by name."""

    name: str
    args: list[str]
    env: dict[str, str]
    log: Path
    popen: subprocess.Popen[bytes] | None = field(default=None, init=False)

    def start(self) -> Proc:
        handle = self.log.open("ab")
        self.popen = subprocess.Popen(
            self.args,
            env=self.env,
            stdout=handle,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        handle.close()
        STARTED.append(self)
        return self

    @property
    def pid(self) -> int:
        assert self.popen is not None
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def signal(self, sig: int) -> None:
        if self.alive():
            os.kill(self.pid, sig)

    def kill(self) -> None:
        """SIGKILL, and reap it."""
        if self.popen is not None and self.popen.poll() is None:
            self.popen.kill()
            self.popen.wait(seconds(10))

    def stop(self, timeout: float = 10) -> int | None:
        """SIGTERM, then SIGKILL if it has not exited within ``timeout``."""
        if self.popen is None:
            return None
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(seconds(timeout))
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(seconds(timeout))
        return self.popen.returncode

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


class RedisServer:
    """A real redis-server on a free loopback port, in its own directory."""

    def __init__(self, workdir: Path, *extra: str) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed; `make test` installs it")
        self.port = free_port()
        self.workdir = workdir
        self.extra = extra
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc = Proc("redis", [binary, *self.args()], dict(os.environ), workdir / "redis.log")

    def args(self) -> list[str]:
        # A replica's first sync starts at once, not after Redis' 5 s wait for others.
        return [
            "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.workdir),
            "--save", "", "--appendonly", "no", "--protected-mode", "no",
            "--repl-diskless-sync-delay", "0", *self.extra,
        ]  # fmt: skip

    def start(self) -> RedisServer:
        self.proc.start()
        try:
            wait_until(self.ping, 10, "redis-server to answer")
        except BaseException:
            self.proc.kill()  # a server that never answered must not outlive the test
            raise
        return self

    def ping(self) -> bool:
        """Our redis-server runs and answers (not another one on its port)."""
        if not self.proc.alive():
            return False
        try:
            with redis.Redis(port=self.port, socket_timeout=1) as client:
                return bool(client.ping())
        except redis.ConnectionError:
            return False

    def client(self) -> redis.Redis:
        return redis.Redis(port=self.port, socket_timeout=5)

    def stop(self) -> None:
        self.proc.stop()


def thoughtwire(name: str, args: list[str], env: Mapping[str, str], logdir: Path) -> Proc:
    # Workers serve no metrics port unless a test gives one: several run on this machine.
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", "THOUGHTWIRE_METRICS_PORT": "0", **env}
    return Proc(
        name, [sys.executable, "-m", "thoughtwire", *args], full_env, logdir / f"{name}.log"
    )


class Frontend:
    def __init__(self, name: str, env: Mapping[str, str], logdir: Path) -> None:
        self.port = free_port()
        args = ["api", "--host", "127.0.0.1", "--port", str(self.port), "--insecure"]
        self.proc = thoughtwire(name, args, env, logdir)

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    def start(self) -> Frontend:
        self.proc.start()
        try:
            wait_until(self.ready, 30, f"{self.proc.name} to be ready")
        except BaseException:
            self.proc.kill()  # one that never got ready must not outlive the test
            raise
        return self

    def ready(self) -> bool:
        if not self.proc.alive():
            raise RuntimeError(f"{self.proc.name} exited:\n{self.proc.output()[-3000:]}")
        try:
            return httpx.get(self.http + "/readyz", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False


def make_logdir(prefix: str) -> Path:
    return Path(tempfile.mkdtemp(prefix=f"thoughtwire-{prefix}-"))
