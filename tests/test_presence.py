"""Presence: who watches a session, across frontends (two uvicorn frontends, real Redis)."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import secrets
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import jwt
import pytest
import websockets
from websockets.asyncio.client import ClientConnection

from tests.conftest import start_cluster
from tests.procs import seconds
from tests.wsclient import connect, greeting
from thoughtwire.api.presence import LAPSE_MARGIN_SECONDS
from thoughtwire.shared.keys import Keys
from thoughtwire.shared.presence import Presence
from thoughtwire.shared.redis import Batcher
from thoughtwire.shared.settings import Settings

SECRET = "a-presence-test-secret-at-least-32-bytes"
TTL = 3.0  # presence_ttl in these tests: a killed frontend's sockets leave within it
REFRESH = 1.0
INTERVAL = 1.0
NAMES = 3


def token(sub: str) -> str:
    now = int(time.time())
    return jwt.encode({"sub": sub, "iat": now, "exp": now + 600}, SECRET, algorithm="HS256")


def bearer(sub: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token(sub)}"}


@pytest.fixture(scope="module")
def watched(redis_server, logdir):  # type: ignore[no-untyped-def]
    c = start_cluster(
        redis_server,
        logdir,
        workers=0,
        JWT_SECRET=SECRET,
        THOUGHTWIRE_RATE_LIMIT="100000",
        THOUGHTWIRE_MAX_SOCKETS_PER_USER="500",
        THOUGHTWIRE_PRESENCE_TTL=str(TTL),
        THOUGHTWIRE_PRESENCE_REFRESH=str(REFRESH),
        THOUGHTWIRE_PRESENCE_INTERVAL=str(INTERVAL),
        THOUGHTWIRE_PRESENCE_NAMES=str(NAMES),
    )
    yield c
    c.stop()


def url(frontend: Any, session: str, tok: str, presence: bool = False) -> str:
    query = f"?session={session}&token={tok}" + ("&presence=1" if presence else "")
    return f"{frontend.ws}/ws/agent-thoughts{query}"


class Listener:
    """A socket that asked for presence frames; keeps them with when they came."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self.frames: list[tuple[float, dict[str, Any]]] = []

    async def until(self, check: Any, timeout: float) -> dict[str, Any]:
        """The first presence frame from now on that ``check`` accepts."""
        async with asyncio.timeout(seconds(timeout)):
            while True:  # bounded by the timeout
                message = json.loads(await self.ws.recv())
                if message["type"] != "presence":
                    continue
                assert "seq" not in message, "presence frames are replies, not events"
                self.frames.append((time.monotonic(), message))
                if check(message):
                    return message

    async def drain(self, quiet: float) -> None:
        """Keep frames until none came for ``quiet`` seconds."""
        with contextlib.suppress(TimeoutError):
            await self.until(lambda _: False, quiet)


@contextlib.asynccontextmanager
async def listening(frontend: Any, session: str, user: str) -> AsyncIterator[Listener]:
    async with connect(url(frontend, session, token(user), presence=True)) as ws:
        await greeting(ws)
        yield Listener(ws)


@contextlib.asynccontextmanager
async def sockets(urls: list[str]) -> AsyncIterator[list[ClientConnection]]:
    async with contextlib.AsyncExitStack() as stack:
        opened = await asyncio.gather(*(stack.enter_async_context(connect(u)) for u in urls))
        await asyncio.gather(*(greeting(ws) for ws in opened))
        yield list(opened)


def figures(sockets_: int, users: int) -> Any:
    return lambda f: f["sockets"] == sockets_ and f["users"] == users


async def presence_of(frontend: Any, session: str, user: str) -> httpx.Response:
    async with httpx.AsyncClient(timeout=seconds(10)) as http:
        return await http.get(
            f"{frontend.http}/v1/sessions/{session}/presence", headers=bearer(user)
        )


async def viewer_token(frontend: Any, session: str, owner: str) -> str:
    async with httpx.AsyncClient(timeout=seconds(10)) as http:
        reply = await http.post(
            f"{frontend.http}/v1/sessions/{session}/viewer-token", headers=bearer(owner)
        )
    assert reply.status_code == 200, reply.text
    return str(reply.json()["token"])


async def test_counts_across_two_frontends(watched) -> None:  # type: ignore[no-untyped-def]
    a, b = watched.frontends
    session = "p" + secrets.token_hex(6)
    async with listening(a, session, "alice") as listener:
        viewer = await viewer_token(a, session, "alice")
        more = [url(a, session, token("alice")), url(b, session, viewer), url(b, session, viewer)]
        async with sockets(more) as opened:
            frame = await listener.until(figures(4, 2), 10)
            assert frame == {
                "type": "presence",
                "session": session,
                "sockets": 4,
                "users": 2,
                "names": ["alice", "viewer:alice"],
            }
            for frontend in (a, b):  # the same figures over HTTP, whichever frontend answers
                reply = await presence_of(frontend, session, "alice")
                assert reply.status_code == 200
                assert reply.json() == {k: v for k, v in frame.items() if k != "type"}
            await opened[1].close()
            await opened[2].close()
            frame = await listener.until(figures(2, 1), 10)
            assert frame["names"] == ["alice"]


async def test_a_socket_is_told_the_figures_even_when_its_arrival_leaves_them(watched) -> None:  # type: ignore[no-untyped-def]
    """A reconnect (one socket gone, one come) changes no figure, and so publishes nothing:
    the socket that came is still told them. A resume to the same session is such a case."""
    a = watched.frontends[0]
    session = "p" + secrets.token_hex(6)
    async with listening(a, session, "alice") as listener:
        await listener.until(figures(1, 1), 10)
        await listener.ws.send(json.dumps({"type": "resume", "session": session}))
        frame = await listener.until(figures(1, 1), 10)
        assert frame["names"] == ["alice"]


async def test_a_viewer_may_read_presence_and_another_user_may_not(watched) -> None:  # type: ignore[no-untyped-def]
    a, b = watched.frontends
    session = "p" + secrets.token_hex(6)
    async with sockets([url(a, session, token("alice"))]):
        viewer = await viewer_token(a, session, "alice")
        async with httpx.AsyncClient(timeout=seconds(10)) as http:
            path = f"/v1/sessions/{session}/presence"
            as_viewer = {"Authorization": f"Bearer {viewer}"}
            async with asyncio.timeout(seconds(10)):
                while True:  # bounded: the socket's entry is written within moments
                    reply = await http.get(b.http + path, headers=as_viewer)
                    assert reply.status_code == 200
                    if reply.json()["sockets"] == 1:
                        break
                    await asyncio.sleep(0.05)
            assert (await http.get(b.http + path, headers=bearer("bob"))).status_code == 403
            assert (await http.get(b.http + path)).status_code == 401
        # Nor may bob hear its presence frames: his socket on the session is refused.
        async with connect(url(b, session, token("bob"), presence=True)) as ws:
            with pytest.raises(websockets.ConnectionClosed) as refused:
                await ws.recv()
            assert refused.value.rcvd is not None and refused.value.rcvd.code == 4003


async def test_a_burst_of_joins_is_a_few_frames(watched) -> None:  # type: ignore[no-untyped-def]
    a, b = watched.frontends
    session = "p" + secrets.token_hex(6)
    async with listening(a, session, "alice") as listener:
        await listener.until(figures(1, 1), 10)
        started = time.monotonic()
        burst = [url((a, b)[i % 2], session, token("alice")) for i in range(50)]
        async with sockets(burst):
            await listener.until(figures(51, 1), 10)
            await listener.drain(INTERVAL * 2)
            ended = time.monotonic()
            frames = [(at, f) for at, f in listener.frames if at >= started]
            # One frame at most per interval whoever publishes, and only on a change.
            assert len(frames) <= (ended - started) / INTERVAL + 2, frames
            # Spaced by an interval where they were sent; where they arrive, by about one.
            spacing = [b[0] - a[0] for a, b in itertools.pairwise(frames)]
            assert all(gap > INTERVAL * 0.5 for gap in spacing), spacing
            counts = [f["sockets"] for _, f in frames]
            assert counts[-1] == 51 and len(set(counts)) == len(counts), counts


async def test_a_killed_frontends_sockets_leave_within_the_ttl(watched) -> None:  # type: ignore[no-untyped-def]
    a = watched.frontends[0]
    doomed = watched.add_frontend()
    session = "p" + secrets.token_hex(6)
    async with listening(a, session, "alice") as listener:
        viewer = await viewer_token(a, session, "alice")
        async with sockets([url(doomed, session, viewer)] * 3):
            await listener.until(figures(4, 2), 10)
            killed = time.monotonic()
            doomed.proc.kill()  # SIGKILL, this frontend's PID only
            # Bounded by the entry's lapse, the survivor's wake-up past it and an interval.
            bound = TTL + LAPSE_MARGIN_SECONDS + INTERVAL + 1.0
            frame = await listener.until(figures(1, 1), bound + 2)
            took = time.monotonic() - killed
            assert frame["names"] == ["alice"]
            assert took <= seconds(bound), took
            assert (await presence_of(a, session, "alice")).json()["sockets"] == 1


def test_the_default_bound_is_within_30_seconds() -> None:
    """By the defaults: a killed frontend's entry lapses at most ``presence_ttl`` after its
    last refresh; a surviving frontend on the session wakes just past the lapse (its
    refresh, every ``presence_refresh`` < ``presence_ttl``, has told it when); the frame
    follows within an interval."""
    defaults = Settings()
    assert defaults.presence_refresh < defaults.presence_ttl
    bound = defaults.presence_ttl + LAPSE_MARGIN_SECONDS + defaults.presence_interval
    assert bound <= 30


async def test_counts_stay_exact_past_the_names_cap(redis_client) -> None:  # type: ignore[no-untyped-def]
    """Many users on two frontends: sockets and users exact, names cut to the cap (on a
    redis-server, and on the embedded Redis of ``thoughtwire up``)."""
    store = Presence(redis_client, Keys("t" + secrets.token_hex(4)), Batcher(redis_client))
    session = "cap"
    # 300 users: 0-199 with a socket each on n1, 100-299 with two each on n2.
    one = {f"user{i:03}": 1 for i in range(200)}
    two = {f"user{i:03}": 2 for i in range(100, 300)}
    for node, held in (("n1", one), ("n2", two)):
        await store.put(session, node, held, ttl_ms=60_000, interval_ms=1000, cap=100)
    seen = await store.read(session, cap=100)
    assert (seen.sockets, seen.users) == (600, 300)
    assert seen.names() == [f"user{i:03}" for i in range(100)]
    assert len(seen.frame) < 2000  # the frame holds the cap, not the crowd
    await store.put(session, "n1", {}, ttl_ms=60_000, interval_ms=1000, cap=100)
    seen = await store.read(session, cap=100)
    assert (seen.sockets, seen.users) == (400, 200)
    assert seen.names()[0] == "user100"


async def test_an_entry_not_refreshed_lapses(redis_client) -> None:  # type: ignore[no-untyped-def]
    """A frontend that stops refreshing (killed) drops out once its entry's time is up."""
    store = Presence(redis_client, Keys("t" + secrets.token_hex(4)), Batcher(redis_client))
    await store.put("s", "alive", {"alice": 1}, ttl_ms=60_000, interval_ms=1000, cap=10)
    dead = await store.put("s", "dead", {"bob": 2}, ttl_ms=200, interval_ms=1000, cap=10)
    assert (dead.sockets, dead.users, dead.lapse_ms) == (3, 2, dead.now_ms + 200)
    async with asyncio.timeout(seconds(5)):
        while (seen := await store.read("s", cap=10)).sockets != 1:  # bounded by the timeout
            await asyncio.sleep(0.05)
    assert seen.names() == ["alice"]
