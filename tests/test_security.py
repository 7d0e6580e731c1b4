"""Authentication, grants and limits against running frontends (two of them, one worker)."""

import asyncio
import json
import re
import secrets
import time
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
import websockets
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from tests.conftest import start_cluster
from tests.procs import seconds, thoughtwire
from tests.wsclient import connect, greeting, recv_json, run_events
from thoughtwire.api.app import create_app
from thoughtwire.api.auth import ORIGIN_REFUSAL, host_allowed
from thoughtwire.shared.keys import Keys
from thoughtwire.shared.settings import Settings

SECRET = "a-test-secret-that-is-at-least-32-bytes-long"
AUDIENCE = "thoughtwire"
ISSUER = "https://issuer.test"
RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
RSA_PUBLIC_PEM = (
    RSA_KEY.public_key()
    .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    .decode()
)


def token(sub="alice", *, key=SECRET, algorithm="HS256", headers=None, **claims):
    now = int(time.time())
    body = {"sub": sub, "aud": AUDIENCE, "iss": ISSUER, "iat": now, "exp": now + 600, **claims}
    body = {k: v for k, v in body.items() if v is not None}
    return jwt.encode(body, key, algorithm=algorithm, headers=headers)


@pytest.fixture(scope="module")
def secure(redis_server, logdir):
    c = start_cluster(
        redis_server,
        logdir,
        JWT_SECRET=SECRET,
        JWT_PUBLIC_KEY=RSA_PUBLIC_PEM,
        JWT_AUDIENCE=AUDIENCE,
        JWT_ISSUER=ISSUER,
        THOUGHTWIRE_RATE_LIMIT="20",
        THOUGHTWIRE_MAX_RUNS_PER_USER="2",
        THOUGHTWIRE_SIM_STEP_DELAY="0.3",
        THOUGHTWIRE_SIM_TOKENS_PER_SECOND="20",
    )
    yield c
    c.stop()


def ws_url(frontend, path="/ws/agent-thoughts", **query):
    return (
        frontend.ws + path + ("?" + "&".join(f"{k}={v}" for k, v in query.items()) if query else "")
    )


async def closed_with(url, **options):
    async with connect(url, **options) as ws:
        with pytest.raises(websockets.ConnectionClosed) as info:
            while True:
                await recv_json(ws)
    return info.value.rcvd.code, info.value.rcvd.reason


def _alg_none():
    header = jwt.utils.base64url_encode(json.dumps({"alg": "none", "typ": "JWT"}).encode()).decode()
    body = jwt.utils.base64url_encode(
        json.dumps(
            {"sub": "alice", "aud": AUDIENCE, "iss": ISSUER, "exp": int(time.time()) + 600}
        ).encode()
    ).decode()
    return f"{header}.{body}."


def _hs_signed_with_the_public_key():
    # The classic confusion: HS256 keyed with the server's RSA public key. PyJWT refuses
    # to make one, so it is built by hand.
    import base64
    import hashlib
    import hmac

    def b64(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    header = b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    body = b64(
        json.dumps(
            {"sub": "alice", "aud": AUDIENCE, "iss": ISSUER, "exp": int(time.time()) + 600}
        ).encode()
    )
    signature = hmac.new(
        RSA_PUBLIC_PEM.encode(), f"{header}.{body}".encode(), hashlib.sha256
    ).digest()
    return f"{header}.{body}.{b64(signature)}"


def _viewer(sub="owner", sid="a-session"):
    """A viewer token as the server mints them, but with the claims given."""
    claims = {
        "sub": sub,
        "sid": sid,
        "scope": "view",
        "aud": "thoughtwire:viewer",
        "exp": int(time.time()) + 600,
    }
    return jwt.encode(claims, SECRET, algorithm="HS256", headers={"typ": "viewer+jwt"})


BAD_TOKENS = {
    "expired": (lambda: token(exp=int(time.time()) - 3600), "token expired"),
    "not-yet-valid": (lambda: token(nbf=int(time.time()) + 3600), "token not valid yet"),
    "wrong-secret": (lambda: token(key="another-secret-that-is-32-bytes-long!!"), "invalid token"),
    "alg-none": (_alg_none, "invalid token"),
    "hs-rs-confusion": (_hs_signed_with_the_public_key, "invalid token"),
    # An EC-signed token where the server's key is RSA: PyJWT raises a key error, no
    # token error, which once reached the client as a 500.
    "es256-to-an-rsa-key": (
        lambda: token(key=ec.generate_private_key(ec.SECP256R1()), algorithm="ES256"),
        "invalid token",
    ),
    "wrong-aud": (lambda: token(aud="someone-else"), "invalid token"),
    "wrong-iss": (lambda: token(iss="https://evil.test"), "invalid token"),
    "missing-sub": (lambda: token(sub=None), "invalid token"),
    "empty-sub": (lambda: token(sub=""), "invalid token"),
    "number-sub": (lambda: token(sub=42), "invalid token"),
    "viewer-empty-sub": (lambda: _viewer(sub=""), "invalid token"),
    "viewer-empty-sid": (lambda: _viewer(sid=""), "invalid token"),
    "missing-exp": (lambda: token(exp=None), "invalid token"),
    "malformed": (lambda: "not.a.jwt", "invalid token"),
    "empty": (lambda: "", "missing token"),
}


@pytest.mark.parametrize("case", list(BAD_TOKENS))
async def test_bad_tokens_are_refused_with_4001(secure, case):
    make, reason = BAD_TOKENS[case]
    code, said = await closed_with(ws_url(secure.frontends[0], token=make()))
    assert (code, said) == (4001, reason)


@pytest.mark.parametrize(
    "case",
    [
        "expired",
        "alg-none",
        "hs-rs-confusion",
        "es256-to-an-rsa-key",
        "wrong-aud",
        "empty-sub",
        "empty",
    ],
)
async def test_bad_tokens_are_refused_over_http_with_401(secure, case):
    make, _ = BAD_TOKENS[case]
    bad = make()
    async with httpx.AsyncClient() as http:
        response = await http.post(
            secure.frontends[1].http + "/v1/jobs",
            json={"prompt": "hi"},
            headers={"Authorization": f"Bearer {bad}"} if bad else {},
        )
    assert response.status_code == 401
    assert response.headers["www-authenticate"] == "Bearer"


async def test_good_tokens_by_query_header_and_subprotocol_and_rs256(secure):
    a = secure.frontends[0]
    ways = [
        {"url": ws_url(a, token=token("u-query"))},
        {"url": ws_url(a), "additional_headers": {"Authorization": f"Bearer {token('u-header')}"}},
        {"url": ws_url(a), "subprotocols": ["thoughtwire.v1", f"bearer.{token('u-subprotocol')}"]},
        {"url": ws_url(a, token=token("u-rsa", key=RSA_KEY, algorithm="RS256"))},
    ]
    for way in ways:
        url = way.pop("url")
        async with connect(url, **way) as ws:
            await greeting(ws)
            await ws.send("hello")
            assert (await run_events(ws))[-1]["type"] == "done"
            if "subprotocols" in way:
                assert ws.subprotocol == "thoughtwire.v1"


async def test_the_secure_endpoint_keeps_the_seeds_contract(secure):
    assert await closed_with(secure.frontends[0].ws + "/ws/secure") == (4001, "missing token")
    async with connect(secure.frontends[0].ws + f"/ws/secure?token={token('seed')}") as ws:
        await greeting(ws)


async def test_another_user_can_do_nothing_with_a_session(secure):
    a, b = secure.frontends
    async with connect(ws_url(a, token=token("owner-1"))) as ws:
        session = await greeting(ws)
        await ws.send("mine")
        events = await run_events(ws)
    job = events[0]["run"]
    intruder = token("intruder-1")

    # socket: follow, resume (from after 0), prompt
    assert await closed_with(ws_url(b, token=intruder, session=session)) == (
        4003,
        "this session belongs to someone else",
    )
    assert await closed_with(ws_url(b, token=intruder, session=session, after=0)) == (
        4003,
        "this session belongs to someone else",
    )
    async with connect(ws_url(b, token=intruder)) as ws:
        await greeting(ws)
        await ws.send(json.dumps({"type": "resume", "session": session, "after": 0}))
        with pytest.raises(websockets.ConnectionClosed) as info:
            while True:
                await recv_json(ws)
        assert info.value.rcvd.code == 4003

    # HTTP: prompt, read, cancel, follow
    headers = {"Authorization": f"Bearer {intruder}"}
    async with httpx.AsyncClient(headers=headers) as http:
        assert (
            await http.post(b.http + "/v1/jobs", json={"prompt": "x", "session": session})
        ).status_code == 403
        assert (await http.get(f"{b.http}/v1/jobs/{job}")).status_code == 403
        assert (await http.delete(f"{b.http}/v1/jobs/{job}")).status_code == 403
        assert (await http.get(f"{b.http}/v1/sessions/{session}/events")).status_code == 403
        assert (await http.post(f"{b.http}/v1/sessions/{session}/viewer-token")).status_code == 403


async def test_a_viewer_link_to_a_session_gone_says_it_has_expired(secure):
    """A viewer token outlives its session's owner record only if the session expired:
    its holder is told so, not that the session is someone else's."""
    from thoughtwire.api.auth import Authenticator

    minted = Authenticator(Settings(jwt_secret=SECRET)).viewer_token("owner-9", "never-was")
    code, said = await closed_with(
        ws_url(secure.frontends[0], token=minted[0], session="never-was")
    )
    assert (code, said) == (4003, "this session has ended and expired")
    # A token for one session says nothing of another's.
    elsewhere = ws_url(secure.frontends[0], token=minted[0], session="other-one")
    assert await closed_with(elsewhere) == (4003, "this session belongs to someone else")


async def test_a_viewer_token_allows_reading_and_nothing_else(secure):
    a, b = secure.frontends
    owner = token("owner-2")
    async with connect(ws_url(a, token=owner)) as ws:
        session = await greeting(ws)
        await ws.send("watch me")
        events = await run_events(ws)
    async with httpx.AsyncClient(headers={"Authorization": f"Bearer {owner}"}) as http:
        grant = (await http.post(f"{b.http}/v1/sessions/{session}/viewer-token")).json()
    viewer = grant["token"]
    assert grant["session"] == session and grant["expires"] > time.time()

    # reading: resume over a socket, SSE, job status
    async with connect(ws_url(b, token=viewer, session=session, after=0)) as ws:
        await greeting(ws)
        assert await run_events(ws) == events
        await ws.send("may I prompt?")
        with pytest.raises(websockets.ConnectionClosed) as info:
            while True:
                await recv_json(ws)
        assert info.value.rcvd.code == 4003
    async with httpx.AsyncClient() as http:
        url = f"{a.http}/v1/sessions/{session}/events?after=0&token={viewer}"
        async with http.stream("GET", url) as response:
            assert response.status_code == 200
            async for line in response.aiter_lines():
                if line.startswith("data: ") and json.loads(line[6:])["type"] == "done":
                    break
        as_viewer = {"Authorization": f"Bearer {viewer}"}
        assert (
            await http.get(f"{a.http}/v1/jobs/{events[0]['run']}", headers=as_viewer)
        ).status_code == 200
        # and nothing else: cancel, prompt over HTTP, more grants, other sessions
        assert (
            await http.delete(f"{a.http}/v1/jobs/{events[0]['run']}", headers=as_viewer)
        ).status_code == 403
        assert (
            await http.post(
                a.http + "/v1/jobs", json={"prompt": "x", "session": session}, headers=as_viewer
            )
        ).status_code == 403
        assert (
            await http.post(f"{a.http}/v1/sessions/{session}/viewer-token", headers=as_viewer)
        ).status_code == 403
    assert (await closed_with(ws_url(a, token=viewer, session="another-session")))[0] == 4003
    async with connect(ws_url(a, token=viewer, session=session)) as ws:
        await greeting(ws)
        await ws.send(json.dumps({"type": "cancel"}))
        with pytest.raises(websockets.ConnectionClosed) as info:
            while True:
                await recv_json(ws)
        assert info.value.rcvd.code == 4003


async def test_an_expiring_token_closes_the_socket_unless_refreshed(secure):
    a = secure.frontends[0]
    soon = int(time.time()) + 4
    code, reason = await asyncio.wait_for(
        closed_with(ws_url(a, token=token("expiring", exp=soon))), seconds(15)
    )
    assert (code, reason) == (4001, "token expired")

    soon = int(time.time()) + 4
    async with connect(ws_url(a, token=token("refreshing", exp=soon))) as ws:
        await greeting(ws)
        await ws.send(json.dumps({"type": "auth", "token": token("refreshing")}))
        await asyncio.sleep(max(0, soon - time.time()) + 1)  # past the first token's expiry
        await ws.send("still here")
        assert (await run_events(ws))[-1]["type"] == "done"
        await ws.send(json.dumps({"type": "auth", "token": token("someone-else")}))
        with pytest.raises(websockets.ConnectionClosed) as info:
            while True:
                await recv_json(ws)
        assert info.value.rcvd.code == 4003


async def until_quiet(ws: Any, quiet: float) -> list[dict[str, Any]]:
    """Every frame ``ws`` gets until none comes for ``quiet`` seconds (at most 200)."""
    frames: list[dict[str, Any]] = []
    for _ in range(200):
        try:
            frames.append(await recv_json(ws, quiet))
        except TimeoutError:
            break
    return frames


async def test_the_rate_limit_holds_across_frontends(secure):
    a, b = secure.frontends
    user = token("chatty")
    async with connect(ws_url(a, token=user)) as on_a, connect(ws_url(b, token=user)) as on_b:
        await greeting(on_a)
        await greeting(on_b)
        for _ in range(12):  # 2 connections + 24 frames: over 20 a minute
            await on_a.send('{"type":"pong"}')
            await on_b.send('{"type":"pong"}')
        # Each socket's replies until it has been quiet for 2 s: a late one is counted too.
        replies = await asyncio.gather(*(until_quiet(ws, 2) for ws in (on_a, on_b)))
        refusals = replies[0] + replies[1]
    assert refusals and all(r["code"] == "rate_limited" for r in refusals)
    assert len(refusals) in (5, 6)  # 2 connections + 24 frames - 20; one less if a minute turned
    async with httpx.AsyncClient(headers={"Authorization": f"Bearer {user}"}) as http:
        assert (await http.get(f"{a.http}/v1/jobs/nope")).status_code == 429


async def test_the_concurrent_run_limit_holds_across_frontends(secure):
    a, b = secure.frontends
    user = token("busy")
    async with connect(ws_url(a, token=user)) as on_a, connect(ws_url(b, token=user)) as on_b:
        await greeting(on_a)
        await greeting(on_b)
        await on_a.send("one")
        await on_b.send("two")
        await recv_json(on_a)  # the first event: both runs are going
        await recv_json(on_b)
        await on_a.send("three")
        refusal = await recv_json(on_a)
        while "seq" in refusal:
            refusal = await recv_json(on_a)
        assert refusal["code"] == "rate_limited" and "runs are already going" in refusal["message"]
        await run_events(on_a)
        # The worker frees the slot just after it publishes `done`: try until it has.
        for _ in range(50):
            await on_a.send("four, after one ended")
            first = await recv_json(on_a)
            if "seq" in first:
                break
            await asyncio.sleep(0.1)
        assert first["type"] == "thinking"
        assert (await run_events(on_a))[-1]["type"] == "done"


def test_a_frontend_without_auth_refuses_to_start_unless_insecure(secure, logdir):
    proc = thoughtwire(
        "no-auth", ["api", "--port", "1"], {"REDIS_URL": secure.redis.url, "JWT_SECRET": ""}, logdir
    )
    proc.start()
    assert proc.popen.wait(seconds(30)) == 2
    assert "pass --insecure" in proc.output()


def test_tokens_never_reach_the_logs(secure):
    secret_token = token("logged")
    httpx.get(f"{secure.frontends[0].http}/v1/jobs/nope?token={secret_token}")
    for frontend in secure.frontends:
        assert secret_token not in frontend.proc.output()
        assert SECRET not in frontend.proc.output()


async def test_browser_sockets_from_other_sites_are_refused(secure):
    a = secure.frontends[0]
    url = ws_url(a, token=token("browser"))
    assert await closed_with(url, origin="https://evil.example") == (1008, ORIGIN_REFUSAL)
    async with connect(url, origin=f"http://127.0.0.1:{a.port}") as ws:  # the frontend's own page
        await greeting(ws)


# --- open endpoints and hosts -----------------------------------------------------

SECURITY_DOC = Path(__file__).parent.parent / "docs" / "security.md"


def _documented_open_endpoints() -> set[tuple[str, str]]:
    """``(method, path)`` of the table under "Open endpoints" in docs/security.md."""
    section = SECURITY_DOC.read_text().split("## Open endpoints", 1)[1].split("\n## ", 1)[0]
    return set(re.findall(r"^\| `([A-Z]+) (/\S*)` \|", section, re.MULTILINE))


def _http_routes(routes, prefix=""):
    """``(method, path)`` of every HTTP route, through included routers."""
    for route in routes:
        included = getattr(route, "original_router", None)
        if included is not None:
            yield from _http_routes(included.routes, prefix + route.include_context.prefix)
        else:
            for method in sorted(route.methods - {"HEAD"}):
                yield method, prefix + route.path


def _every_route():
    """Every route of the app, with authentication on and off (some exist in one only)."""
    http, sockets = set(), set()
    for settings in (Settings(redis_url="redis://127.0.0.1:1/0", jwt_secret=SECRET), Settings()):
        app = create_app(settings)
        http |= set(_http_routes(app.routes))
        sockets |= set(app.socket_routes.paths)
    return http, sockets


def _concrete(path):
    return re.sub(r"\{[^}]+\}", "someone", path)


async def test_only_the_listed_endpoints_answer_without_a_token(secure):
    """Every route, HTTP and socket, without a token: only docs/security.md's list answers.

    Before: /openapi.json answered 200 too. After: it is not served (404).
    """
    open_endpoints = _documented_open_endpoints()
    assert open_endpoints, "docs/security.md lists no open endpoints"
    http_routes, socket_paths = _every_route()
    assert open_endpoints <= http_routes, "docs/security.md lists a route the app does not have"
    a = secure.frontends[0]
    answered = set()
    async with httpx.AsyncClient(timeout=seconds(10)) as http:
        for method, path in sorted(http_routes):
            body = {"prompt": "hi"} if method == "POST" else None
            response = await http.request(method, a.http + _concrete(path), json=body)
            print(method, path, response.status_code)
            if response.is_success:
                answered.add((method, path))
            else:
                assert response.status_code in (401, 404), (method, path, response.status_code)
    assert answered == open_endpoints
    for path in socket_paths:
        assert await closed_with(a.ws + _concrete(path)) == (4001, "missing token"), path


# (allowed hosts setting, authentication on, Host header) -> allowed
HOSTS = [
    ("", False, "127.0.0.1:8000", True),
    ("", False, "localhost:8000", True),
    ("", False, "LOCALHOST", True),
    ("", False, "[::1]:8000", True),
    ("", False, "attacker.example:8000", False),
    ("", False, "localhost.attacker.example", False),
    ("", False, "127.0.0.1.attacker.example:8000", False),
    ("", False, "", False),
    ("thoughtwire.test", False, "thoughtwire.test:8000", True),
    ("thoughtwire.test", False, "thoughtwire.test", True),
    ("thoughtwire.test:443", False, "thoughtwire.test:8000", False),
    ("thoughtwire.test:443", False, "thoughtwire.test:443", True),
    ("thoughtwire.test", False, "attacker.example", False),
    ("*", False, "attacker.example", True),
    ("", True, "attacker.example:8000", True),
    ("", True, "", True),
    ("thoughtwire.test", True, "attacker.example", False),
    ("thoughtwire.test", True, "localhost:8000", True),
    ("thoughtwire.test", True, "Thoughtwire.Test", True),
]


@pytest.mark.parametrize(("allowed", "auth", "host", "expected"), HOSTS)
def test_host_allowed_table(allowed, auth, host, expected):
    settings = Settings(allowed_hosts=allowed, jwt_secret=SECRET if auth else None)
    headers = {"host": host} if host else {}
    assert host_allowed(headers, settings) is expected


@pytest.fixture(scope="module")
def local(redis_server, logdir):
    """A frontend without authentication, as ``thoughtwire up`` runs one."""
    c = start_cluster(
        redis_server, logdir, frontends=1, workers=0, THOUGHTWIRE_ALLOWED_HOSTS="thoughtwire.test"
    )
    yield c
    c.stop()


async def _host_answers(frontend, host):
    """``(status, body)`` of ``POST /v1/jobs``, and the socket's first frame or close, at ``host``."""
    async with httpx.AsyncClient(timeout=seconds(10)) as http:
        response = await http.post(
            frontend.http + "/v1/jobs", json={"prompt": "spend my key"}, headers={"Host": host}
        )
    # The socket goes to this frontend, whatever name its URL says, as a rebound name would.
    url = f"ws://{host}/ws/agent-thoughts"
    options = {"host": "127.0.0.1", "port": frontend.port, "origin": f"http://{host}"}
    async with connect(url, **options) as ws:
        try:
            socket = (await recv_json(ws))["type"]
        except websockets.ConnectionClosed as closed:
            socket = (closed.rcvd.code, closed.rcvd.reason)
    return response.status_code, response.json(), socket


async def test_requests_for_other_hosts_are_refused_without_auth(local):
    """DNS rebinding: Host and Origin both the attacker's.

    Before: POST /v1/jobs 202 and a socket greeted. After: 400, and the socket closed 1008.
    """
    frontend = local.frontends[0]
    port = frontend.port
    attacker = f"attacker.example:{port}"
    for _ in range(3):
        status, body, socket = await _host_answers(frontend, attacker)
        print("attacker host:", status, socket)
        assert status == 400, (status, body)
        assert body == {"detail": "host not allowed: set THOUGHTWIRE_ALLOWED_HOSTS"}
        assert socket == (1008, "host not allowed: set THOUGHTWIRE_ALLOWED_HOSTS")
    # The warning is logged before the refusal is sent: it is in the log by now, once.
    warnings = [
        line
        for line in frontend.proc.output().splitlines()
        if "WARNING" in line and "THOUGHTWIRE_ALLOWED_HOSTS" in line and attacker in line
    ]
    assert len(warnings) == 1, warnings
    for host in (f"127.0.0.1:{port}", f"localhost:{port}", f"thoughtwire.test:{port}"):
        status, body, socket = await _host_answers(frontend, host)
        assert (status, body["created"], socket) == (202, True, "session"), host


def _answer_to_head(frontend, *headers: str) -> str:
    """The status line a frontend answers a ``POST /v1/jobs`` head with, its body unsent."""
    import socket

    head = "\r\n".join(["POST /v1/jobs HTTP/1.1", "Host: 127.0.0.1", *headers]) + "\r\n\r\n"
    with socket.create_connection(("127.0.0.1", frontend.port), timeout=seconds(10)) as sock:
        sock.sendall(head.encode())
        return sock.makefile("rb").readline().decode().strip()


def test_an_api_request_is_authenticated_and_its_length_checked_before_its_body(secure):
    """No token: 401 whatever the length; with one, a length over the bound is 413; both
    answered while not a byte of the body has been sent."""
    frontend = secure.frontends[0]
    length = "Content-Length: 104857600"
    assert _answer_to_head(frontend, length).startswith("HTTP/1.1 401")
    bad = f"Authorization: Bearer {token(key='another-secret-that-is-32-bytes-long!!')}"
    assert _answer_to_head(frontend, length, bad).startswith("HTTP/1.1 401")
    good = f"Authorization: Bearer {token('bounded')}"
    assert _answer_to_head(frontend, length, good).startswith("HTTP/1.1 413")


async def test_a_key_set_that_never_answers_does_not_freeze_the_frontend(redis_server, logdir):
    """A token whose key must come from ``JWKS_URL`` is looked up off the event loop.

    The key set's server takes the request and never answers (an identity provider in
    trouble), and an anonymous client sends a made-up RS256 token naming an unknown
    ``kid``. Measured: ``/healthz`` on the same frontend took 29.7 s before (PyJWT's
    blocking fetch held the loop for its whole 30 s timeout: every socket stalled too),
    0.0 s after.
    """
    asked = asyncio.Event()
    held: list[asyncio.StreamWriter] = []

    async def never_answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)
        await reader.readline()
        asked.set()

    jwks = await asyncio.start_server(never_answer, "127.0.0.1", 0)
    port = jwks.sockets[0].getsockname()[1]
    c = start_cluster(
        redis_server,
        logdir,
        frontends=1,
        workers=0,
        JWKS_URL=f"http://127.0.0.1:{port}/jwks.json",
    )
    made_up = token("nobody", key=RSA_KEY, algorithm="RS256", headers={"kid": "unknown"})
    try:
        async with httpx.AsyncClient(timeout=seconds(60)) as http:
            url = c.frontends[0].http
            anonymous = asyncio.create_task(
                http.get(f"{url}/v1/jobs/x", headers={"Authorization": f"Bearer {made_up}"})
            )
            async with asyncio.timeout(seconds(10)):
                await asked.wait()
            started = time.monotonic()
            health = await http.get(f"{url}/healthz")
            took = time.monotonic() - started
            for writer in held:  # the key set's server goes: the lookup fails at once
                writer.transport.abort()
            answer = await anonymous
    finally:
        jwks.close()
        c.stop()
    print(
        f"\n/healthz while a key set lookup hangs: {took:.1f} s; the lookup's token: {answer.status_code}"
    )
    assert health.status_code == 200
    assert took < 5, f"/healthz took {took:.1f} s while a key set lookup hung"
    assert answer.status_code == 401


async def test_a_viewer_link_does_not_follow_its_session_name_to_a_new_owner(secure, redis_server):
    """A viewer token reads its session only while the user who minted it owns it.

    Alice's claim on a session name lapses (the owner key expires after
    ``THOUGHTWIRE_LOG_TTL`` without her; here it is deleted, as its expiry would) and Bob
    takes the name. Measured: Alice's viewer link, still valid, was let in and handed
    Bob's whole run before; it is refused with 4003 after.
    """
    a, b = secure.frontends
    alice, bob = token("alice-lapsed"), token("bob-later")
    session = f"a-name-{secrets.token_hex(3)}"
    async with connect(ws_url(a, token=alice, session=session)) as ws:
        await greeting(ws)
    async with httpx.AsyncClient(headers={"Authorization": f"Bearer {alice}"}) as http:
        grant = await http.post(f"{b.http}/v1/sessions/{session}/viewer-token")
    viewer = grant.json()["token"]
    with redis_server.client() as redis:
        redis.delete(Keys(secure.prefix).session_owner(session))
    async with connect(ws_url(a, token=bob, session=session)) as ws:
        await greeting(ws)
        await ws.send("Bob's own question")
        bobs = await run_events(ws)
    seen: list[dict] = []
    code = None
    async with connect(ws_url(b, token=viewer, session=session, after=0)) as ws:
        try:
            async with asyncio.timeout(seconds(10)):
                while len(seen) < len(bobs):
                    message = await recv_json(ws)
                    if "seq" in message:
                        seen.append(message)
        except websockets.ConnectionClosed as closed:
            code = closed.rcvd.code if closed.rcvd else None
    print(f"\nAlice's viewer link on Bob's session: closed {code}, {len(seen)} of his events")
    assert seen == [] and code == 4003, f"{len(seen)} of Bob's events reached Alice's viewer"
