"""The bounded-input test: nothing a client sends is read before it is bounded.

Each oversize or slow input goes to a real frontend while a neighbour socket on the
same frontend streams runs; the frontend's RSS must not grow by more than 64 MB
(``VmHWM``, reset before each input), its open files must come back to their
baseline within the handshake timeout, and the neighbour must get every event of
every run, in order, with no error. Each test prints its figures (``pytest -s``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import jwt
import pytest
import websockets

from tests.conftest import Cluster, start_cluster
from tests.procs import seconds, wait_until
from tests.wsclient import connect, greeting
from thoughtwire.api import wsserver

SECRET = "a-test-secret-for-bounds-at-least-32-bytes"
HANDSHAKE_TIMEOUT = 2.0
MAX_CONNECTIONS = 250  # room for 200 half-open requests and the neighbour
MAX_BODY_BYTES = 1024 * 1024
MAX_MESSAGE_BYTES = 64 * 1024
RSS_BOUND = 64 * 1024 * 1024
FD_SLACK = 8  # Redis connections and the like that come and go on their own
MB = 1024 * 1024
HUGE = 100 * MB
CHUNK = b"x" * MB


def token(sub: str = "neighbour") -> str:
    now = int(time.time())
    return jwt.encode({"sub": sub, "iat": now, "exp": now + 600}, SECRET, algorithm="HS256")


@pytest.fixture(scope="module")
def target(redis_server, logdir) -> Cluster:
    """One frontend with authentication and short bounds, one worker; runs of about 1 s."""
    REDIS_PORTS.add(redis_server.port)
    c = start_cluster(
        redis_server,
        logdir,
        frontends=1,
        JWT_SECRET=SECRET,
        THOUGHTWIRE_HANDSHAKE_TIMEOUT=str(HANDSHAKE_TIMEOUT),
        THOUGHTWIRE_BODY_TIMEOUT=str(HANDSHAKE_TIMEOUT),
        THOUGHTWIRE_MAX_CONNECTIONS=str(MAX_CONNECTIONS),
        THOUGHTWIRE_MAX_BODY_BYTES=str(MAX_BODY_BYTES),
        THOUGHTWIRE_MAX_MESSAGE_BYTES=str(MAX_MESSAGE_BYTES),
        THOUGHTWIRE_RATE_LIMIT="100000",
        THOUGHTWIRE_MAX_SOCKETS_PER_USER="1000",
        THOUGHTWIRE_SIM_STEP_DELAY="0.05",
        THOUGHTWIRE_SIM_ANSWER_TOKENS="20",
        THOUGHTWIRE_SIM_TOKENS_PER_SECOND="20",
    )
    yield c
    c.stop()


# --- what the frontend process holds ---------------------------------------------


def status(pid: int, field_name: str) -> int:
    """A ``/proc/<pid>/status`` figure in bytes."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field_name + ":"):
                return int(line.split()[1]) * 1024
    raise AssertionError(f"no {field_name} for {pid}")


# The Redis servers the measured frontend talks to: its connections to them (its pool
# grows with load and keeps what it opened) are not what a bound on clients is about.
REDIS_PORTS: set[int] = set()


def open_files(pid: int) -> int:
    """The open files of ``pid``, but for its connections to :data:`REDIS_PORTS`."""
    to_redis = _sockets_to(REDIS_PORTS)
    count = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            link = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:  # closed meanwhile
            continue
        count += not (link.startswith("socket:[") and link[8:-1] in to_redis)
    return count


def _sockets_to(ports: set[int]) -> set[str]:
    """Inodes of the TCP sockets whose remote port is one of ``ports``."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError), open(table) as f:
            for line in f.readlines()[1:]:
                fields = line.split()
                if int(fields[2].rpartition(":")[2], 16) in ports:
                    inodes.add(fields[9])
    return inodes


@dataclass
class Footprint:
    """RSS growth (peak over baseline) and open files of a process, from a baseline."""

    pid: int
    rss: int = 0
    files: int = 0

    def start(self) -> Footprint:
        wait_until(lambda: self._settled(), 10, "the frontend's open files to settle")
        with open(f"/proc/{self.pid}/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS
        self.rss = status(self.pid, "VmRSS")
        self.files = open_files(self.pid)
        return self

    def _settled(self) -> bool:
        before = open_files(self.pid)
        time.sleep(0.05)
        return open_files(self.pid) == before

    def growth(self) -> int:
        return status(self.pid, "VmHWM") - self.rss

    def files_back(self, within: float) -> float:
        """Seconds until open files are back near the baseline (fails after ``within``)."""
        began = time.monotonic()
        wait_until(
            lambda: open_files(self.pid) <= self.files + FD_SLACK,
            within,
            f"open files back to {self.files} (+{FD_SLACK}), now {open_files(self.pid)}",
        )
        return time.monotonic() - began


# --- the neighbour -----------------------------------------------------------------


@dataclass
class Neighbour:
    """A socket that runs prompt after prompt and checks each run arrives whole."""

    runs: int = 0
    events: int = 0
    problems: list[str] = field(default_factory=list)


@contextlib.asynccontextmanager
async def neighbour(cluster: Cluster) -> AsyncIterator[Neighbour]:
    """Streams runs on the target frontend for as long as the block lasts."""
    found = Neighbour()
    url = cluster.frontends[0].ws + f"/ws/agent-thoughts?token={token()}"
    ws = await connect(url, open_timeout=seconds(10))
    await greeting(ws)
    task = asyncio.create_task(_stream(ws, found))
    try:
        yield found
        async with asyncio.timeout(seconds(20)):
            while found.runs < 1 and not task.done():  # at least one run during the input
                await asyncio.sleep(0.05)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await ws.close()
    assert not found.problems, found.problems
    assert found.runs >= 1


async def _stream(ws: Any, found: Neighbour) -> None:
    last = 0
    try:
        while True:
            await ws.send(f"run {found.runs}")
            while True:
                async with asyncio.timeout(seconds(15)):
                    message = json.loads(await ws.recv())
                if "seq" not in message:
                    if message["type"] == "error":
                        found.problems.append(f"error: {message}")
                    continue
                if last and message["seq"] != last + 1:
                    found.problems.append(f"seq {message['seq']} after {last}")
                last = message["seq"]
                found.events += 1
                if message["type"] in ("done", "error", "cancelled"):
                    if message["type"] != "done":
                        found.problems.append(f"run ended {message['type']}")
                    found.runs += 1
                    break
    except asyncio.CancelledError:
        raise
    except Exception as exc:  # the neighbour's own failure is what the test reports
        found.problems.append(f"{type(exc).__name__}: {exc}")


# --- raw clients ---------------------------------------------------------------------


def request_head(method: str, path: str, *headers: str) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1", *headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


async def send_huge(port: int, head: bytes, body: Any) -> tuple[str, int]:
    """Send ``head`` then ``body`` chunks until the frontend answers or closes.

    Returns the status line (or ``"closed"``) and how many body bytes went out.
    """
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    sent = 0

    async def push() -> None:
        nonlocal sent
        writer.write(head)
        for chunk in body:
            writer.write(chunk)
            await writer.drain()
            sent += len(chunk)

    pusher = asyncio.create_task(push())
    try:
        try:
            async with asyncio.timeout(seconds(60)):
                line = await reader.readline()
        except ConnectionResetError:
            # The frontend closed on a body it had not read, so the kernel answered
            # with a reset that may overtake the refusal: the bound held all the same.
            return "reset", sent
        return (line.decode().strip() or "closed"), sent
    finally:
        pusher.cancel()
        with contextlib.suppress(asyncio.CancelledError, ConnectionError):
            await pusher
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


def chunks(total: int) -> Any:
    for _ in range(total // MB):
        yield CHUNK


def chunked(total: int) -> Any:
    for _ in range(total // MB):
        yield b"%x\r\n" % MB + CHUNK + b"\r\n"
    yield b"0\r\n\r\n"


def open_idle(port: int, count: int, first: bytes) -> list[socket.socket]:
    """``count`` connections that each send ``first`` and then nothing more."""
    sockets = []
    for _ in range(count):
        sock = socket.create_connection(("127.0.0.1", port), timeout=seconds(5))
        if first:
            sock.sendall(first)
        sockets.append(sock)
    return sockets


def closed_by_server(sock: socket.socket) -> bool:
    """Whether the frontend has ended this connection (EOF or reset), reading what came."""
    sock.setblocking(False)
    try:
        while True:
            data = sock.recv(65536)
            if not data:
                return True
    except BlockingIOError:
        return False
    except ConnectionError:
        return True


# --- the tests -----------------------------------------------------------------------


async def test_a_huge_body_without_a_token_is_refused_before_it_is_read(target):
    """100 MB, no token: 401 at once. RSS growth before the fix ~300 MB, after < 64 MB."""
    frontend = target.frontends[0]
    async with neighbour(target):
        footprint = Footprint(frontend.proc.pid).start()
        head = request_head(
            "POST", "/v1/jobs", f"Content-Length: {HUGE}", "Content-Type: application/json"
        )
        answer, sent = await send_huge(frontend.port, head, chunks(HUGE))
        growth = footprint.growth()
        print(
            f"\nanonymous 100 MB body: {answer!r}, {sent / MB:.0f} MB sent, RSS +{growth / MB:.1f} MB"
        )
        assert answer.startswith("HTTP/1.1 401") or answer == "reset", answer
        assert sent < HUGE / 2, f"{sent / MB:.0f} MB were taken before the refusal"
        assert growth < RSS_BOUND, f"RSS grew {growth / MB:.1f} MB"
        footprint.files_back(HANDSHAKE_TIMEOUT + 3)


async def test_a_huge_body_with_a_token_is_refused_by_its_length(target):
    """100 MB with a valid token: 413 from Content-Length, before a byte of body is read."""
    frontend = target.frontends[0]
    async with neighbour(target):
        footprint = Footprint(frontend.proc.pid).start()
        head = request_head(
            "POST",
            "/v1/jobs",
            f"Authorization: Bearer {token('sender')}",
            f"Content-Length: {HUGE}",
            "Content-Type: application/json",
        )
        answer, sent = await send_huge(frontend.port, head, chunks(HUGE))
        growth = footprint.growth()
        print(
            f"\n100 MB body with a token: {answer!r}, {sent / MB:.0f} MB sent, RSS +{growth / MB:.1f} MB"
        )
        assert answer.startswith("HTTP/1.1 413") or answer == "reset", answer
        assert sent < HUGE / 2, f"{sent / MB:.0f} MB were taken before the refusal"
        assert growth < RSS_BOUND, f"RSS grew {growth / MB:.1f} MB"
        footprint.files_back(HANDSHAKE_TIMEOUT + 3)


async def test_a_chunked_body_is_counted_as_it_arrives(target):
    """100 MB chunked, no Content-Length, valid token: 413 at the 1 MiB bound."""
    frontend = target.frontends[0]
    async with neighbour(target):
        footprint = Footprint(frontend.proc.pid).start()
        head = request_head(
            "POST",
            "/v1/jobs",
            f"Authorization: Bearer {token('sender')}",
            "Transfer-Encoding: chunked",
            "Content-Type: application/json",
        )
        answer, sent = await send_huge(frontend.port, head, chunked(HUGE))
        growth = footprint.growth()
        print(
            f"\nchunked 100 MB body: {answer!r}, {sent / MB:.0f} MB sent, RSS +{growth / MB:.1f} MB"
        )
        assert answer.startswith("HTTP/1.1 413") or answer == "reset", answer
        assert sent < HUGE / 2, f"{sent / MB:.0f} MB were taken before the refusal"
        assert growth < RSS_BOUND, f"RSS grew {growth / MB:.1f} MB"
        footprint.files_back(HANDSHAKE_TIMEOUT + 3)


async def test_a_huge_header_block_is_refused_with_431(target):
    """A 100 MB header block (1 KB headers, no end): 431 at the 64 KiB bound."""
    frontend = target.frontends[0]
    async with neighbour(target):
        footprint = Footprint(frontend.proc.pid).start()
        header = b"X-Filler: " + b"y" * 1000 + b"\r\n"
        block = (header * (MB // len(header)) for _ in range(HUGE // MB))
        head = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        answer, sent = await send_huge(frontend.port, head, block)
        growth = footprint.growth()
        print(
            f"\n100 MB header block: {answer!r}, {sent / MB:.0f} MB sent, RSS +{growth / MB:.1f} MB"
        )
        assert answer.startswith("HTTP/1.1 431") or answer in ("closed", "reset"), answer
        assert sent < HUGE / 2, f"{sent / MB:.0f} MB were taken before the refusal"
        assert growth < RSS_BOUND, f"RSS grew {growth / MB:.1f} MB"
        footprint.files_back(HANDSHAKE_TIMEOUT + 3)


SOCKET_PATHS = [
    "/ws",
    "/ws/agent",
    "/ws/chat",
    "/ws/agent-thoughts",
    "/ws/robust",
    "/ws/secure",
    "/ws/sender",  # /ws/{client_id}: with authentication on, the user's own id
]


async def test_an_oversize_frame_closes_its_socket_with_1009(target):
    """A 16 MB frame on every socket path, whose limit is 64 KiB: close 1009 on each,
    RSS < 64 MB more."""
    frontend = target.frontends[0]
    async with neighbour(target):
        footprint = Footprint(frontend.proc.pid).start()
        codes = {}
        for path in SOCKET_PATHS:
            url = frontend.ws + f"{path}?token={token('sender')}"
            async with connect(url, max_size=None) as ws:
                with pytest.raises(websockets.ConnectionClosed) as closed:
                    await ws.send("x" * (16 * MB))
                    async with asyncio.timeout(seconds(10)):
                        while True:
                            await ws.recv()
            codes[path] = closed.value.rcvd.code if closed.value.rcvd else None
        growth = footprint.growth()
        print(f"\n16 MB frames: closes {codes}, RSS +{growth / MB:.1f} MB")
        assert set(codes.values()) == {1009}, codes
        assert growth < RSS_BOUND, f"RSS grew {growth / MB:.1f} MB"
        footprint.files_back(HANDSHAKE_TIMEOUT + 3)


@pytest.mark.parametrize(
    "kind, first",
    [
        ("request", b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n"),
        (
            "upgrade",
            b"GET /ws/agent-thoughts HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
            b"Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\n",
        ),
        ("silent", b""),
        (
            "trickled body",
            request_head(
                "POST",
                "/v1/jobs",
                f"Authorization: Bearer {token('trickler')}",
                "Content-Type: application/json",
                "Content-Length: 1000",
            )
            + b'{"prompt": "',
        ),
    ],
)
async def test_half_open_requests_are_closed_after_the_handshake_timeout(target, kind, first):
    """200 heads (or bodies) that never end: all closed within the timeout. Before the
    fix: 200 held (and a trickled body was held until the client gave up)."""
    frontend = target.frontends[0]
    async with neighbour(target):
        footprint = Footprint(frontend.proc.pid).start()
        sockets = await asyncio.to_thread(open_idle, frontend.port, 200, first)
        try:
            wait_until(
                lambda: open_files(frontend.proc.pid) >= footprint.files + 150,
                10,
                "the frontend to accept the connections",
            )
            # Each is due to go at the deadline; a second and a half of grace for a loop
            # with 200 of them to go through.
            deadline = time.monotonic() + seconds(HANDSHAKE_TIMEOUT + 1.5)
            held = list(sockets)
            while held and time.monotonic() < deadline:
                held = [s for s in held if not closed_by_server(s)]
                await asyncio.sleep(0.05)
            growth = footprint.growth()
            print(
                f"\n200 half-open ({kind}): {len(held)} held after the timeout, RSS +{growth / MB:.1f} MB"
            )
            assert not held, f"{len(held)} half-open connections held after the timeout"
            assert growth < RSS_BOUND
            footprint.files_back(3)
            async with httpx.AsyncClient() as http:
                assert (await http.get(frontend.http + "/readyz")).status_code == 200
        finally:
            for s in sockets:
                s.close()


async def test_past_the_connection_cap_only_probes_are_answered(target):
    """250 open connections: then /healthz still answers, an API call or a socket gets 503;
    64 more past that are answered 503 before anything is read; all go in the timeout."""
    frontend = target.frontends[0]
    async with neighbour(target):
        footprint = Footprint(frontend.proc.pid).start()
        # The neighbour's socket is one; 249 more sockets fill the cap (a socket counts
        # as any connection does, and does not time out).
        url = frontend.ws + f"/ws/agent-thoughts?token={token('filler')}"
        async with contextlib.AsyncExitStack() as stack:
            for _ in range(MAX_CONNECTIONS - 1):
                await stack.enter_async_context(connect(url, open_timeout=seconds(10)))
            answers = await asyncio.to_thread(_over_the_cap, frontend.port)
            growth = footprint.growth()
            print(f"\npast the cap of {MAX_CONNECTIONS}: {answers}, RSS +{growth / MB:.1f} MB")
            assert answers["healthz"].startswith("HTTP/1.1 200"), answers
            assert answers["readyz"].startswith("HTTP/1.1 200"), answers
            assert answers["metrics"].startswith("HTTP/1.1 200"), answers
            assert answers["api"].startswith("HTTP/1.1 503"), answers
            assert answers["socket"].startswith("HTTP/1.1 503"), answers
            assert answers["refused at once"] >= 15, answers
            assert growth < RSS_BOUND
        footprint.files_back(HANDSHAKE_TIMEOUT + 3)
        async with httpx.AsyncClient() as http:
            response = await http.post(
                frontend.http + "/v1/jobs",
                json={"prompt": "after the flood"},
                headers={"Authorization": f"Bearer {token('after')}"},
            )
            assert response.status_code == 202, response.text


def _over_the_cap(port: int) -> dict[str, Any]:
    answers: dict[str, Any] = {}
    for name, head in (
        ("healthz", request_head("GET", "/healthz")),
        ("readyz", request_head("GET", "/readyz")),
        ("metrics", request_head("GET", "/metrics")),
        ("api", request_head("GET", "/v1/jobs/x", f"Authorization: Bearer {token()}")),
        (
            "socket",
            request_head(
                "GET",
                f"/ws/agent-thoughts?token={token()}",
                "Upgrade: websocket",
                "Connection: Upgrade",
                "Sec-WebSocket-Version: 13",
                "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
            ),
        ),
    ):
        with socket.create_connection(("127.0.0.1", port), timeout=seconds(5)) as sock:
            sock.sendall(head)
            answers[name] = sock.makefile("rb").readline().decode().strip()
    # Past the probes' room every new connection is answered at once, unread.
    extra = [
        socket.create_connection(("127.0.0.1", port), timeout=seconds(5))
        for _ in range(wsserver.PROBE_ROOM + 20)
    ]
    refused = 0
    for sock in extra[wsserver.PROBE_ROOM :]:
        with contextlib.suppress(OSError):
            if sock.makefile("rb").readline().startswith(b"HTTP/1.1 503"):
                refused += 1
    for sock in extra:
        sock.close()
    answers["refused at once"] = refused
    return answers


# Bodies FastAPI's own handler answered with a 500 and a traceback: the error echoes the
# offending value, and JSON cannot carry it.
UNENCODABLE = {
    "NaN": ("/v1/jobs", "application/json", b'{"prompt": NaN}'),
    "-Infinity": ("/v1/jobs", "application/json", b'{"prompt": -Infinity}'),
    "1e999": ("/v1/jobs", "application/json", b'{"prompt": 1e999}'),
    "NaN, alone": ("/v1/jobs", "application/json", b"[NaN]"),
    "not UTF-8, no content type": ("/v1/jobs", None, b'{"prompt": "\xff\xfe"}'),
    "not UTF-8, a form": ("/v1/jobs", "application/x-www-form-urlencoded", b"prompt=\xe9t\xe9"),
    # half an emoji: what JSON.stringify writes for a string cut in the middle of one
    "a lone surrogate": ("/v1/jobs", "application/json", b'{"prompt": "hi \\ud83d"}'),
    "a lone surrogate in a key": (
        "/v1/jobs",
        "application/json",
        b'{"prompt": "x", "idempotency_key": "\\ud800"}',
    ),
    "a lone surrogate in a reason": (
        "/v1/runs/r-none/approvals/c1",
        "application/json",
        b'{"decision": "allow", "reason": "\\ud83d"}',
    ),
    # nested past the recursion an echo can take (a 500 before), in a field or an extra one
    "nested 600 deep": (
        "/v1/jobs",
        "application/json",
        b'{"prompt":' + b"[" * 600 + b"]" * 600 + b"}",
    ),
    "an extra field nested 600 deep": (
        "/v1/jobs",
        "application/json",
        b'{"prompt": "x", "deep":' + b"[" * 600 + b"]" * 600 + b"}",
    ),
    "a lone surrogate in a scope": (
        "/v1/sessions/s-1/viewer-token",
        "application/json",
        b'{"scope": "\\udc00"}',
    ),
}


async def test_a_body_json_cannot_echo_gets_a_clear_422(target):
    """Non-finite numbers, bytes that are not UTF-8 and lone surrogates: a 422 naming the
    field, no 500, no traceback in the reply or the log."""
    frontend = target.frontends[0]
    log_before = len(frontend.proc.output())
    async with httpx.AsyncClient() as http:
        for name, (path, content_type, raw) in UNENCODABLE.items():
            headers = {"Authorization": f"Bearer {token('sender')}"}
            if content_type is not None:
                headers["Content-Type"] = content_type
            response = await http.post(frontend.http + path, content=raw, headers=headers)
            assert response.status_code == 422, (name, response.status_code, response.text)
            assert "Traceback" not in response.text
            detail = response.json()["detail"]
            assert detail and isinstance(detail, list), (name, detail)
    log = frontend.proc.output()[log_before:]
    assert "Traceback" not in log and "Exception in ASGI" not in log, log


@contextlib.asynccontextmanager
async def bare_server(app: Any, ws: Any, handshake_timeout: float) -> AsyncIterator[Any]:
    """uvicorn serving ``app`` alone with the frontend's HTTP protocol and ``ws``; yields
    the server once it listens (its port: ``server.port``), and stops it after."""
    import uvicorn

    from thoughtwire.shared.settings import Settings

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = uvicorn.Server(
        uvicorn.Config(
            app,
            host="127.0.0.1",
            port=port,
            http=wsserver.http_protocol(Settings(handshake_timeout=handshake_timeout)),
            ws=ws,
            lifespan="off",
            log_level="warning",
        )
    )
    server.port = port  # type: ignore[attr-defined]
    serving = asyncio.create_task(server.serve())
    try:
        async with asyncio.timeout(seconds(10)):
            while not server.started:
                await asyncio.sleep(0.01)
        yield server
    finally:
        server.should_exit = True
        await serving


async def test_a_websocket_handshake_the_app_never_answers_is_closed():
    """An upgrade whose head is whole but whose app never accepts: closed at the timeout."""
    answer = asyncio.Event()

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await receive()  # websocket.connect, and then no answer
        await answer.wait()
        await send({"type": "websocket.close", "code": 1000})

    async with bare_server(app, wsserver.PROTOCOL, handshake_timeout=0.5) as server:
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
            writer.write(
                request_head(
                    "GET",
                    "/ws",
                    "Upgrade: websocket",
                    "Connection: Upgrade",
                    "Sec-WebSocket-Version: 13",
                    "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
                )
            )
            began = time.monotonic()
            async with asyncio.timeout(seconds(5)):
                assert await reader.read() == b""  # closed, unanswered
            waited = time.monotonic() - began
            print(f"\nunanswered handshake closed after {waited:.2f} s (timeout 0.5 s)")
            assert waited >= 0.4
            writer.close()
        finally:
            answer.set()  # the app's task ends before the server stops


@pytest.mark.parametrize("mode", ["fast", "public"])
async def test_an_answered_handshake_lets_its_deadline_go_and_the_socket_stays(mode):
    """Once the app accepts, the handshake's timer is cancelled and dropped, so a new socket
    holds none for the timeout's span, and the socket outlives the timeout."""
    protocol = wsserver.PROTOCOL if mode == "fast" else wsserver.PUBLIC_PROTOCOL
    accepted = asyncio.Event()

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await receive()  # websocket.connect
        await send({"type": "websocket.accept"})
        accepted.set()
        while (await receive())["type"] != "websocket.disconnect":
            pass

    async with (
        bare_server(app, protocol, handshake_timeout=0.5) as server,
        websockets.connect(f"ws://127.0.0.1:{server.port}/ws") as client,
    ):
        async with asyncio.timeout(seconds(5)):
            await accepted.wait()
        sockets = [c for c in server.server_state.connections if isinstance(c, protocol)]
        assert len(sockets) == 1
        assert sockets[0].handshake_timer is None
        await asyncio.sleep(0.8)  # past the timeout: nothing closes it
        await client.ping()


# --- the adapter's canary -------------------------------------------------------------


def test_the_uvicorn_internals_the_bounds_lean_on_are_still_there():
    """Fails loudly when uvicorn changes what :class:`thoughtwire.api.wsserver.HttpProtocol` overrides."""
    import httptools
    import uvicorn
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
    from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol

    assert wsserver.HTTP_PROTOCOL is not None, "httptools or its uvicorn protocol is missing"
    assert uvicorn.__version__.rsplit(".", 1)[0] in wsserver.TESTED_UVICORN, (
        f"uvicorn {uvicorn.__version__} is untested: check api/wsserver.py and update "
        "TESTED_UVICORN"
    )
    for name in (
        "connection_made",
        "connection_lost",
        "data_received",
        "on_message_begin",
        "on_headers_complete",
        "on_response_complete",
        "handle_websocket_upgrade",
    ):
        assert callable(getattr(HttpToolsProtocol, name, None)), name
    loop = asyncio.new_event_loop()
    try:
        protocol = HttpToolsProtocol(_config(), _ServerState(), {}, _loop=loop)  # type: ignore[arg-type]
    finally:
        loop.close()
    for attribute in ("limit_concurrency", "connections", "cycle", "pipeline", "loop"):
        assert hasattr(protocol, attribute), attribute
    assert hasattr(httptools, "parse_url")
    assert "handshake_complete" in WebSocketsSansIOProtocol.__init__.__code__.co_names


def _config() -> Any:
    import uvicorn

    config = uvicorn.Config(lambda scope, receive, send: None, http="httptools")
    config.load()
    return config


class _ServerState:
    def __init__(self) -> None:
        self.connections: set[Any] = set()
        self.tasks: set[Any] = set()
        self.default_headers: list[Any] = []
        self.total_requests = 0
