"""The shipped nginx configuration, run for real in front of real frontends.

Debian's nginx runs ``deploy/nginx/thoughtwire.conf`` as it is, but for its upstream's
server lines (two frontends started here) and its listen port (a free loopback one),
as an unprivileged process with its pid, logs and temporary files in a directory of
its own. A client streams a run through it; the frontend holding the socket is
SIGTERMed mid-stream, and the client resumes through nginx with every event once.
"""

from __future__ import annotations

import asyncio
import json
import re
import secrets
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import aclosing
from pathlib import Path

import httpx
import pytest
from websockets.asyncio.client import connect

from tests.conftest import Cluster, sim_run, start_cluster
from tests.procs import Frontend, Proc, RedisServer, free_port, seconds, wait_until
from thoughtwire.client import Follower, State
from thoughtwire.shared.settings import Settings

ROOT = Path(__file__).parent.parent
SHIPPED = ROOT / "deploy" / "nginx" / "thoughtwire.conf"
TOKENS = 60


def nginx_binary() -> str:
    found = shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin:/usr/local/sbin")
    if found is None:
        pytest.skip("nginx is not installed (scripts/system-deps installs it)")
    return found


def templated(conf: str, upstreams: list[int], listen: int) -> str:
    """The shipped config with only its upstream servers' addresses and listen port changed."""
    servers = iter(upstreams)
    conf, changed = re.subn(
        r"^(\s*server )[\w.-]+:\d+", lambda m: f"{m[1]}127.0.0.1:{next(servers)}", conf, flags=re.M
    )
    assert changed == len(upstreams), f"{changed} server lines"
    conf, changed = re.subn(r"^(\s*listen )\d+;", rf"\g<1>127.0.0.1:{listen};", conf, flags=re.M)
    assert changed == 1
    return conf


def main_conf(prefix: Path) -> str:
    """nginx.conf around the shipped file: everything nginx writes stays under ``prefix``."""
    temp = "\n".join(
        f"    {kind}_temp_path {prefix / kind};"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    return f"""
daemon off;
worker_processes 1;
pid {prefix / "nginx.pid"};
error_log {prefix / "error.log"} info;
events {{ worker_connections 256; }}
http {{
    access_log {prefix / "access.log"};
{temp}
    include {prefix / "thoughtwire.conf"};
}}
"""


class Nginx:
    """The shipped config in front of ``frontends``, on a free loopback port."""

    def __init__(self, frontends: list[Frontend], workdir: Path) -> None:
        self.binary = nginx_binary()
        self.port = free_port()
        self.prefix = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        ports = [f.port for f in frontends]
        (workdir / "thoughtwire.conf").write_text(templated(SHIPPED.read_text(), ports, self.port))
        (workdir / "nginx.conf").write_text(main_conf(workdir))
        self.args = [
            self.binary, "-c", str(workdir / "nginx.conf"), "-p", str(workdir),
            "-e", str(workdir / "error.log"),
        ]  # fmt: skip
        self.proc = Proc("nginx", self.args, {}, workdir / "nginx.out")

    def check(self) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*self.args, "-t"], capture_output=True, text=True, timeout=30, check=False
        )

    def start(self) -> Nginx:
        self.proc.start()
        try:
            # A bare TCP connect: no request goes upstream before the test's own.
            wait_until(self.listening, 10, "nginx to listen")
        except BaseException:
            self.proc.kill()
            raise
        return self

    def listening(self) -> bool:
        if not self.proc.alive():
            raise RuntimeError(f"nginx exited:\n{self.log()}")
        try:
            socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
        except OSError:
            return False
        return True

    def log(self) -> str:
        error = self.prefix / "error.log"
        return self.proc.output() + (error.read_text() if error.exists() else "")

    @property
    def ws(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@pytest.fixture(scope="module")
def behind_nginx(redis_server: RedisServer, logdir: Path) -> Iterator[tuple[Cluster, Nginx]]:
    """Two frontends and a worker, runs of about 2 s (60 tokens at 30 a second), nginx."""
    cluster = start_cluster(
        redis_server,
        logdir,
        THOUGHTWIRE_SIM_ANSWER_TOKENS=str(TOKENS),
        THOUGHTWIRE_SIM_TOKENS_PER_SECOND="30",
        THOUGHTWIRE_DRAIN_WINDOW="0.2",
    )
    try:
        nginx = Nginx(cluster.frontends, cluster.logdir / "nginx").start()
    except BaseException:
        cluster.stop()
        raise
    yield cluster, nginx
    nginx.proc.stop()
    cluster.stop()


def established(port: int) -> int:
    """Established TCP connections whose local end is 127.0.0.1:``port`` (/proc/net/tcp)."""
    rows = Path("/proc/net/tcp").read_text().splitlines()[1:]
    local = f"0100007F:{port:04X}"
    return sum(1 for row in rows if row.split()[1] == local and row.split()[3] == "01")


# --- the config as shipped ----------------------------------------------------------


def directives(name: str) -> list[str]:
    return re.findall(rf"^\s*{name}\s+([^;]*);", SHIPPED.read_text(), re.M)


def test_the_shipped_config_proxies_sockets_and_sse_without_stickiness():
    """Upgrade headers passed on, timeouts above the pings, SSE unbuffered, round robin
    with passive failover: no ip_hash, hash or sticky."""
    ping = Settings().ping_interval
    assert directives("proxy_http_version") == ["1.1"]
    assert "Upgrade $http_upgrade" in directives("proxy_set_header")
    assert "Connection $connection_upgrade" in directives("proxy_set_header")
    for timeout in ("proxy_read_timeout", "proxy_send_timeout"):
        (value,) = directives(timeout)
        assert int(value.rstrip("s")) > ping
    assert directives("proxy_buffering") == ["off"]
    (next_upstream,) = directives("proxy_next_upstream")
    assert {"error", "timeout", "http_503"} <= set(next_upstream.split())
    for sticky in ("ip_hash", "hash", "sticky", "least_conn"):
        assert not directives(sticky), sticky


def test_nginx_accepts_the_shipped_config(tmp_path):
    conf = templated(SHIPPED.read_text(), [free_port(), free_port()], free_port())
    (tmp_path / "thoughtwire.conf").write_text(conf)
    (tmp_path / "nginx.conf").write_text(main_conf(tmp_path))
    result = subprocess.run(
        [nginx_binary(), "-t", "-c", str(tmp_path / "nginx.conf"), "-p", str(tmp_path),
         "-e", str(tmp_path / "error.log")],
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr


# --- in front of real frontends -----------------------------------------------------


def kinds(states: list) -> list[State]:
    return [s.state for s in states]


async def test_a_stream_through_nginx_survives_its_frontend_stopping(behind_nginx):
    """SIGTERM the frontend holding the socket mid-run: the client, which only knows
    nginx's address, reconnects through nginx to the other frontend and resumes from its
    last seq. Every event arrives once, in order, and the whole run arrives. It comes
    first in this file: the socket is then the first request nginx passes upstream, so
    no idle upstream connection of nginx's hides which frontend holds it."""
    cluster, nginx = behind_nginx
    states = []
    follower = Follower(nginx.ws, on_state=states.append, timeout=20)
    before = {f.port: established(f.port) for f in cluster.frontends}
    events: list[dict] = []
    stopped: Frontend | None = None
    stopper = None
    on_the_other = None  # sockets on the other frontend, once resumed
    async with asyncio.timeout(seconds(60)), aclosing(follower.events("through nginx")) as it:
        async for event in it:
            events.append(event)
            if event["type"] == "answer" and stopped is None:
                # nginx may keep an idle connection to a frontend from an earlier request:
                # the socket's frontend is the one with a connection more than before.
                holding = [f for f in cluster.frontends if established(f.port) > before[f.port]]
                assert len(holding) == 1, [established(f.port) for f in cluster.frontends]
                stopped = holding[0]
                stopper = asyncio.create_task(asyncio.to_thread(stopped.proc.stop))
            elif stopped is not None and on_the_other is None and State.RESUMED in kinds(states):
                (other,) = [f for f in cluster.frontends if f is not stopped]
                on_the_other = established(other.port) - before[other.port]
            if event["type"] == "done":
                break
    assert stopper is not None and stopped is not None
    assert await stopper in (0, -signal.SIGTERM)
    seqs = [e["seq"] for e in events]
    assert seqs == list(range(1, len(seqs) + 1)), seqs
    assert [e["type"] for e in events] == sim_run(TOKENS)
    assert State.RECONNECTING in kinds(states), kinds(states)
    resumed = next(s for s in states if s.state == State.RESUMED)
    assert resumed.gap is None and resumed.url.startswith(nginx.ws)
    assert on_the_other == 1, "the resumed socket is on the other frontend, through nginx"
    print(f"resumed through nginx after {follower.reconnects} reconnect(s); {len(events)} events")


async def test_server_sent_events_through_nginx_arrive_as_they_are_written(behind_nginx):
    """A run's 60 answer tokens take about 2 s; through nginx they arrive spread over that
    time, not in one burst when a buffer fills or the response ends."""
    _, nginx = behind_nginx
    session = "sse-" + secrets.token_hex(4)
    arrivals: list[tuple[float, str]] = []

    async def read_events() -> None:
        url = f"{nginx.http}/v1/sessions/{session}/events?after=0"
        async with (
            httpx.AsyncClient(timeout=seconds(30)) as client,
            client.stream("GET", url) as response,
        ):
            assert response.status_code == 200
            assert response.headers["content-type"].startswith("text/event-stream")
            async for line in response.aiter_lines():
                if line.startswith("data: "):
                    kind = json.loads(line[len("data: ") :])["type"]
                    arrivals.append((time.monotonic(), kind))
                    if kind == "done":
                        return

    async with asyncio.timeout(seconds(60)):
        reader = asyncio.create_task(read_events())
        follower = Follower(nginx.ws, session, timeout=20)
        async with aclosing(follower.events("streamed twice")) as it:
            async for event in it:
                if event["type"] == "done":
                    break
        await reader
    answers = [at for at, kind in arrivals if kind == "answer"]
    assert len(answers) == TOKENS
    spread = answers[-1] - answers[0]
    print(f"{len(arrivals)} events by SSE through nginx, answers over {spread:.2f} s")
    assert spread > 1.0, f"the answer arrived in a burst ({spread:.2f} s)"


async def test_with_a_frontend_gone_every_request_and_socket_gets_through(behind_nginx):
    """nginx's passive failover: with one frontend stopped, each new request and socket
    handshake through nginx reaches the other (a refused connection, or a draining
    frontend's 503, is retried on the next server)."""
    cluster, nginx = behind_nginx
    alive = [f for f in cluster.frontends if f.proc.alive()]
    if len(alive) == 2:
        alive[0].proc.stop()
    async with httpx.AsyncClient(timeout=seconds(10)) as client:
        for _ in range(10):
            assert (await client.get(f"{nginx.http}/readyz")).status_code == 200
            async with connect(f"{nginx.ws}/ws/agent-thoughts", open_timeout=seconds(10)) as ws:
                assert ws.response is not None and ws.response.status_code == 101


async def test_the_frontends_metrics_are_not_served_through_nginx(behind_nginx):
    """Prometheus scrapes each frontend itself; the public side gets no counters."""
    cluster, nginx = behind_nginx
    alive = next(f for f in cluster.frontends if f.proc.alive())
    async with httpx.AsyncClient(timeout=seconds(10)) as client:
        assert (await client.get(f"{nginx.http}/metrics")).status_code == 404
        assert (await client.get(f"{alive.http}/metrics")).status_code == 200
