"""Two users choosing the same name never see or block each other, against running frontends.

Every name a client chooses has a row: idempotency keys, session ids, client ids and
run ids, wherever a client can send one. In each row Alice uses the name first and Bob
then chooses the same one: either Bob's own prompt runs, or he is refused with a clear
403 / 4003; and nothing Bob receives carries Alice's data (her prompt's text, which the
simulated agent repeats in its events, or her run and session ids). The protocol has no
other id a client sends: tool ``call_id`` values are the model's, in events going out.
:func:`test_every_name_a_client_chooses_has_a_row` fails when a new one appears.
"""

from __future__ import annotations

import dataclasses
import json
import secrets
import time
from collections.abc import Awaitable, Callable
from typing import Any

import httpx
import jwt
import pytest
import websockets

from tests.conftest import Cluster, start_cluster
from tests.procs import seconds
from tests.wsclient import connect, greeting, recv_json, run_events
from thoughtwire.api.app import create_app
from thoughtwire.api.http import JobRequest
from thoughtwire.shared import protocol
from thoughtwire.shared.settings import Settings

SECRET = "a-test-secret-for-isolation-at-least-32-bytes"
REFUSED = (4003, "this session belongs to someone else")


@pytest.fixture(scope="module")
def cluster(redis_server, logdir):
    """Two frontends and a worker with authentication on; a run lasts about two seconds."""
    c = start_cluster(
        redis_server,
        logdir,
        JWT_SECRET=SECRET,
        THOUGHTWIRE_SIM_STEP_DELAY="0.2",
        THOUGHTWIRE_SIM_TOKENS_PER_SECOND="10",
    )
    yield c
    c.stop()


def token(user: str) -> str:
    now = int(time.time())
    return jwt.encode({"sub": user, "iat": now, "exp": now + 600}, SECRET, algorithm="HS256")


@dataclasses.dataclass
class User:
    """One of the two users of a row, and what they hold."""

    name: str
    secret: str  # text in this user's prompts, to look for in what the other receives

    @property
    def token(self) -> str:
        return token(self.name)

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    def ws(self, frontend: Any, path: str = "/ws/agent-thoughts", **query: str) -> str:
        query = {"token": self.token, **query}
        return frontend.ws + path + "?" + "&".join(f"{k}={v}" for k, v in query.items())


@dataclasses.dataclass
class Row:
    """Alice and Bob for one row, on the cluster's two frontends; Bob's traffic is kept."""

    cluster: Cluster
    alice: User
    bob: User
    seen_by_bob: list[str] = dataclasses.field(default_factory=list)

    @property
    def a(self) -> Any:
        return self.cluster.frontends[0]

    @property
    def b(self) -> Any:
        return self.cluster.frontends[1]

    def bob_saw(self, data: Any) -> Any:
        self.seen_by_bob.append(data if isinstance(data, str) else json.dumps(data))
        return data

    def assert_bob_saw_nothing_of(self, *names: str) -> None:
        for name in (self.alice.secret, *names):
            leaks = [seen for seen in self.seen_by_bob if name in seen]
            assert not leaks, f"Bob saw Alice's {name!r}: {leaks[:2]}"


# --- helpers: every wait is bounded ------------------------------------------------


async def closed_with(row: Row, url: str) -> tuple[int, str]:
    """Read Bob's socket until it closes; returns the close code and reason."""
    async with connect(url) as ws:
        with pytest.raises(websockets.ConnectionClosed) as info:
            while True:
                row.bob_saw(await recv_json(ws))
    return info.value.rcvd.code, info.value.rcvd.reason


async def sse_run(
    http: httpx.AsyncClient, frontend: Any, session: str, user: User
) -> list[dict[str, Any]]:
    """A session's events over SSE, from the start until a run ends."""
    events = []
    url = f"{frontend.http}/v1/sessions/{session}/events?after=0"
    async with http.stream("GET", url, headers=user.headers, timeout=seconds(20)) as response:
        assert response.status_code == 200
        async for line in response.aiter_lines():
            if line.startswith("data: "):
                events.append(json.loads(line[6:]))
                if events[-1]["type"] in ("done", "error", "cancelled"):
                    return events
    raise AssertionError("the event stream ended before the run did")


async def alice_has_a_session(row: Row) -> tuple[str, list[dict[str, Any]]]:
    """Alice chooses a session id, prompts in it and reads the whole run."""
    session = "s-" + secrets.token_hex(4)
    async with connect(row.alice.ws(row.a, session=session)) as ws:
        assert await greeting(ws) == session
        await ws.send(row.alice.secret)
        events = await run_events(ws)
    assert events[-1]["type"] == "done"
    return session, events


async def bob_runs_his_own(row: Row, ws: Any, session: str) -> list[dict[str, Any]]:
    """On Bob's socket in his ``session``: his prompt runs there."""
    await ws.send(row.bob.secret)
    events = [row.bob_saw(e) for e in await run_events(ws)]
    assert events[-1]["type"] == "done", events[-1]
    assert {e["session"] for e in events} == {session}
    return events


# --- the rows -----------------------------------------------------------------------


async def http_idempotency_key(row: Row) -> None:
    """``POST /v1/jobs`` ``idempotency_key``: Bob's job is his own, and it runs."""
    body = {"idempotency_key": "order-1"}
    async with httpx.AsyncClient(timeout=seconds(10)) as http:
        first = await http.post(
            row.a.http + "/v1/jobs",
            json={"prompt": row.alice.secret, **body},
            headers=row.alice.headers,
        )
        assert first.status_code == 202 and first.json()["created"] is True
        alice = first.json()
        second = await http.post(
            row.b.http + "/v1/jobs",
            json={"prompt": row.bob.secret, **body},
            headers=row.bob.headers,
        )
        bob = row.bob_saw(second.json())
        print("Bob's submit under Alice's key:", second.status_code, bob)
        assert second.status_code == 202
        assert bob["created"] is True, "Bob was handed Alice's job"
        events = [row.bob_saw(e) for e in await sse_run(http, row.b, bob["session"], row.bob)]
        assert events[-1]["type"] == "done" and {e["run"] for e in events} == {bob["job"]}
        # The key still does its work for its own user.
        again = await http.post(
            row.a.http + "/v1/jobs",
            json={"prompt": row.alice.secret, **body},
            headers=row.alice.headers,
        )
        assert again.json() == {**alice, "created": False}
    row.assert_bob_saw_nothing_of(alice["job"], alice["session"])


async def socket_prompt_key(row: Row) -> None:
    """A socket ``prompt``'s ``key``: Bob's prompt runs (it was dropped before)."""
    prompt = {"type": "prompt", "key": "k-1"}
    async with connect(row.alice.ws(row.a)) as ws:
        alice_session = await greeting(ws)
        await ws.send(json.dumps({**prompt, "content": row.alice.secret}))
        alice_run = (await run_events(ws))[0]["run"]
    async with connect(row.bob.ws(row.b)) as ws:
        session = row.bob_saw(await recv_json(ws))["session"]
        await ws.send(json.dumps({**prompt, "content": row.bob.secret}))
        try:
            events = [row.bob_saw(e) for e in await run_events(ws)]
        except TimeoutError:
            raise AssertionError("Bob's prompt never ran") from None
    assert events[-1]["type"] == "done" and {e["session"] for e in events} == {session}
    row.assert_bob_saw_nothing_of(alice_run, alice_session)


async def socket_session_query(row: Row) -> None:
    """A socket's ``?session=``: Bob on Alice's session is refused with 4003."""
    session, events = await alice_has_a_session(row)
    assert await closed_with(row, row.bob.ws(row.b, session=session)) == REFUSED
    assert await closed_with(row, row.bob.ws(row.b, session=session, after="0")) == REFUSED
    row.assert_bob_saw_nothing_of(events[0]["run"])


async def socket_resume(row: Row) -> None:
    """A ``resume`` to Alice's session on Bob's own socket: 4003, and nothing of hers."""
    session, events = await alice_has_a_session(row)
    async with connect(row.bob.ws(row.b)) as ws:
        row.bob_saw(await recv_json(ws))
        await ws.send(json.dumps({"type": "resume", "session": session, "after": 0}))
        with pytest.raises(websockets.ConnectionClosed) as info:
            while True:
                row.bob_saw(await recv_json(ws))
    assert (info.value.rcvd.code, info.value.rcvd.reason) == REFUSED
    row.assert_bob_saw_nothing_of(events[0]["run"])


async def sse_session(row: Row) -> None:
    """``GET /v1/sessions/{session}/events`` of Alice's session: 403."""
    session, events = await alice_has_a_session(row)
    async with httpx.AsyncClient(timeout=seconds(10)) as http:
        url = f"{row.b.http}/v1/sessions/{session}/events?after=0"
        response = await http.get(url, headers=row.bob.headers)
    assert response.status_code == 403
    row.bob_saw(response.text)
    row.assert_bob_saw_nothing_of(events[0]["run"])


async def http_job_session(row: Row) -> None:
    """``POST /v1/jobs`` ``session`` naming Alice's: 403; Bob's prompt in his own runs."""
    session, events = await alice_has_a_session(row)
    async with httpx.AsyncClient(timeout=seconds(10)) as http:
        body = {"prompt": row.bob.secret, "session": session}
        response = await http.post(row.b.http + "/v1/jobs", json=body, headers=row.bob.headers)
        assert response.status_code == 403
        row.bob_saw(response.text)
        # Alice's session is as she left it: Bob's prompt is in no event of it.
        assert all(
            row.bob.secret not in e["content"]
            for e in await sse_run(http, row.a, session, row.alice)
        )
    row.assert_bob_saw_nothing_of(events[0]["run"])


async def viewer_token_session(row: Row) -> None:
    """``POST /v1/sessions/{session}/viewer-token`` for Alice's session: 403, no token."""
    session, events = await alice_has_a_session(row)
    async with httpx.AsyncClient(timeout=seconds(10)) as http:
        url = f"{row.b.http}/v1/sessions/{session}/viewer-token"
        response = await http.post(url, headers=row.bob.headers)
    assert response.status_code == 403 and "token" not in response.json()
    row.bob_saw(response.text)
    row.assert_bob_saw_nothing_of(events[0]["run"])


async def client_id(row: Row) -> None:
    """``/ws/{client_id}``: Bob cannot take Alice's id; a personal message to her is hers."""
    alice_id, bob_id = row.alice.name, row.bob.name
    async with connect(row.alice.ws(row.a, f"/ws/{alice_id}")) as alice_ws:
        assert (await recv_json(alice_ws))["client"] == alice_id
        refusal = await closed_with(row, row.bob.ws(row.b, f"/ws/{alice_id}"))
        assert refusal == (4003, "a client id is your own user id")
        async with connect(row.bob.ws(row.b, f"/ws/{bob_id}")) as bob_ws:
            hello = row.bob_saw(await recv_json(bob_ws))
            assert hello["client"] == bob_id
            # To Alice, from Bob: it reaches Alice, under Bob's own id.
            await bob_ws.send(json.dumps({"type": "personal", "to": alice_id, "content": "hi"}))
            message = await recv_json(alice_ws)
            assert (message["type"], message["sender"], message["to"]) == (
                "personal",
                bob_id,
                alice_id,
            )
            # Alice's own messages to herself never reach Bob: he gets only what follows.
            await alice_ws.send(
                json.dumps({"type": "personal", "to": alice_id, "content": row.alice.secret})
            )
            assert (await recv_json(alice_ws))["content"] == row.alice.secret
            await bob_runs_his_own(row, bob_ws, hello["session"])
    row.assert_bob_saw_nothing_of()


async def alice_is_running(row: Row, ws: Any) -> str:
    """Alice prompts on her socket; returns her run's id once it is going."""
    await greeting(ws)
    await ws.send(row.alice.secret)
    first = await recv_json(ws)
    assert first["type"] == "thinking", first
    return str(first["run"])


async def alice_run_ends_done(ws: Any, run: str) -> None:
    events = await run_events(ws)
    assert (events[-1]["type"], events[-1]["run"]) == ("done", run), events[-1]


async def alice_run_state(row: Row, run: str) -> str:
    async with httpx.AsyncClient(timeout=seconds(10)) as http:
        response = await http.get(f"{row.a.http}/v1/jobs/{run}", headers=row.alice.headers)
    return str(response.json()["status"])


async def socket_cancel_run(row: Row) -> None:
    """A ``cancel`` naming Alice's run, on Bob's socket: her run goes on to its end."""
    async with connect(row.alice.ws(row.a)) as alice_ws:
        run = await alice_is_running(row, alice_ws)
        async with connect(row.bob.ws(row.b)) as ws:
            session = row.bob_saw(await recv_json(ws))["session"]
            await ws.send(json.dumps({"type": "cancel", "run": run}))
            await ws.send(row.bob.secret)
            # A socket's frames are handled in order: once Bob's prompt has an event,
            # his cancel has been handled, and Alice's run (about 2 s) is still going.
            first = row.bob_saw(await recv_json(ws))
            assert (first["type"], first["session"]) == ("thinking", session), first
            status = await alice_run_state(row, run)
            print("Alice's run once Bob's cancel was handled:", status)
            assert status == "running", f"Alice's run is {status!r} after Bob's cancel"
            events = [row.bob_saw(e) for e in await run_events(ws)]
            assert events[-1]["type"] == "done"
        await alice_run_ends_done(alice_ws, run)
    row.assert_bob_saw_nothing_of(run)


async def http_cancel_run(row: Row) -> None:
    """``DELETE /v1/jobs/{id}`` of Alice's run: 403, and her run goes on to its end."""
    async with connect(row.alice.ws(row.a)) as alice_ws:
        run = await alice_is_running(row, alice_ws)
        async with httpx.AsyncClient(timeout=seconds(10)) as http:
            response = await http.delete(f"{row.b.http}/v1/jobs/{run}", headers=row.bob.headers)
        assert response.status_code == 403
        row.bob_saw(response.text)
        status = await alice_run_state(row, run)
        assert status == "running", f"Alice's run is {status!r} after Bob's DELETE"
        await alice_run_ends_done(alice_ws, run)
    row.assert_bob_saw_nothing_of()


async def http_read_run(row: Row) -> None:
    """``GET /v1/jobs/{id}`` of Alice's finished run: 403, with nothing of hers."""
    session, events = await alice_has_a_session(row)
    async with httpx.AsyncClient(timeout=seconds(10)) as http:
        response = await http.get(
            f"{row.b.http}/v1/jobs/{events[0]['run']}", headers=row.bob.headers
        )
    assert response.status_code == 403
    row.bob_saw(response.text)
    row.assert_bob_saw_nothing_of(session)


async def socket_approve_run(row: Row) -> None:
    """An ``approve`` naming Alice's run, on Bob's socket: 4003, and her run goes on."""
    async with connect(row.alice.ws(row.a)) as alice_ws:
        run = await alice_is_running(row, alice_ws)
        async with connect(row.bob.ws(row.b)) as ws:
            row.bob_saw(await recv_json(ws))
            decision = {"type": "approve", "run": run, "call_id": "call_1", "decision": "deny"}
            await ws.send(json.dumps(decision))
            with pytest.raises(websockets.ConnectionClosed) as info:
                while True:
                    row.bob_saw(await recv_json(ws))
        assert info.value.rcvd.code == 4003, info.value.rcvd
        row.bob_saw(info.value.rcvd.reason)
        await alice_run_ends_done(alice_ws, run)
    row.assert_bob_saw_nothing_of(run)


async def http_approve_run(row: Row) -> None:
    """``POST /v1/runs/{run}/approvals/{call_id}`` on Alice's run: 403, not "not waiting"."""
    async with connect(row.alice.ws(row.a)) as alice_ws:
        run = await alice_is_running(row, alice_ws)
        async with httpx.AsyncClient(timeout=seconds(10)) as http:
            response = await http.post(
                f"{row.b.http}/v1/runs/{run}/approvals/call_1",
                headers=row.bob.headers,
                json={"decision": "deny"},
            )
        assert response.status_code == 403, response.text
        row.bob_saw(response.text)
        assert await alice_run_state(row, run) == "running"
        await alice_run_ends_done(alice_ws, run)
    row.assert_bob_saw_nothing_of()


Scenario = Callable[[Row], Awaitable[None]]

# One row per name a client chooses, and where it chooses it.
NAMES: dict[str, Scenario] = {
    "idempotency key: POST /v1/jobs idempotency_key": http_idempotency_key,
    "idempotency key: socket prompt.key": socket_prompt_key,
    "session id: socket ?session=": socket_session_query,
    "session id: socket resume": socket_resume,
    "session id: SSE": sse_session,
    "session id: POST /v1/jobs session": http_job_session,
    "session id: viewer-token minting": viewer_token_session,
    "client id: /ws/{client_id} and personal.to": client_id,
    "run id: socket cancel.run": socket_cancel_run,
    "run id: DELETE /v1/jobs/{job}": http_cancel_run,
    "run id: GET /v1/jobs/{job}": http_read_run,
    "run id: socket approve.run": socket_approve_run,
    "run id: POST /v1/runs/{run}/approvals/{call_id}": http_approve_run,
}


@pytest.mark.parametrize("name", list(NAMES))
async def test_two_users_choosing_the_same_name_never_meet(cluster, name):
    """Bob chooses a name Alice chose first: his prompt runs, or he gets 403/4003; he sees nothing of hers.

    Before the fix, both idempotency-key rows failed: Bob's POST got Alice's job and
    session with ``created: false``, and his socket prompt never ran.
    """
    tag = secrets.token_hex(3)
    row = Row(
        cluster,
        User(f"alice-{tag}", f"alice-secret-{tag}"),
        User(f"bob-{tag}", f"bob-secret-{tag}"),
    )
    await NAMES[name](row)


# Where a client chooses a name: message fields, HTTP body fields, path parameters.
# Each is covered by the rows above, or is not a name.
CHOSEN = {
    "Prompt.key": "idempotency key: socket prompt.key",
    "Resume.session": "session id: socket resume",
    "Cancel.run": "run id: socket cancel.run",
    "Personal.to": "client id: /ws/{client_id} and personal.to",
    "JobRequest.idempotency_key": "idempotency key: POST /v1/jobs idempotency_key",
    "JobRequest.session": "session id: POST /v1/jobs session",
    "{job}": "run id: GET /v1/jobs/{job}",
    "{session}": "session id: SSE",
    "{client_id}": "client id: /ws/{client_id} and personal.to",
    "Approve.run": "run id: socket approve.run",
    "{run}": "run id: POST /v1/runs/{run}/approvals/{call_id}",
}
NOT_NAMES = {
    "Prompt.content",
    "Personal.content",
    "Broadcast.content",
    "Resume.after",  # a position in a session the grant was checked for
    "Resume.epoch",  # likewise: it only selects where to read from
    "Auth.token",  # a credential, checked to name the same user
    "JobRequest.prompt",
    "JobRequest.on_disconnect",
    "Prompt.multitask",  # a closed vocabulary (reject, enqueue, interrupt), not a name
    "JobRequest.multitask",
    "Resume.replay",  # a closed vocabulary ("raw"), how to catch up, not what to read
    "Approve.call_id",  # a tool call's id within a run the grant was checked for
    "{call_id}",
    "Approve.decision",  # a closed vocabulary (allow, deny)
    "Approve.reason",  # free text shown in the log of the caller's own session
    "{name:path}",  # /static/{name:path}: one of the page's own files, the same for everyone
}


def test_every_name_a_client_chooses_has_a_row():
    """A new id field in the protocol, the job body or a path fails here until it has a row."""
    fields = {
        f"{kind.__name__}.{field.name}"
        for kind in protocol.ClientMessage.__args__
        for field in dataclasses.fields(kind)
    }
    fields |= {f"JobRequest.{name}" for name in JobRequest.model_fields}
    app = create_app(Settings(jwt_secret=SECRET))
    paths = [*app.socket_routes.paths, *_paths(app.routes)]
    fields |= {param for path in paths for param in _params(path)}
    assert fields == set(CHOSEN) | NOT_NAMES
    assert set(CHOSEN.values()) <= set(NAMES)


def _paths(routes):
    for route in routes:
        included = getattr(route, "original_router", None)
        if included is not None:
            yield from _paths(included.routes)
        else:
            yield route.path


def _params(path: str) -> list[str]:
    return ["{" + part.split("}")[0] + "}" for part in path.split("{")[1:]]
