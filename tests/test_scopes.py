"""Scoped viewer tokens: an ``answer`` viewer never sees reasoning, tool arguments or results.

Pure projections first, then a real run with a tool call (the simulated agent's
``search`` has arguments) watched live, resumed, over SSE and joined late; then what
cannot widen a scope; then the cost: once per event and scope, whatever the sockets.
"""

import asyncio
import json
import time
from functools import partial

import httpx
import jwt
import pytest
import websockets

from tests.conftest import start_cluster
from tests.procs import seconds
from tests.wsclient import connect, greeting, recv_json, run_events
from thoughtwire.api import scopes
from thoughtwire.api.auth import Authenticator, AuthError
from thoughtwire.api.hub import Hub
from thoughtwire.api.scopes import project_event, project_frame, project_state
from thoughtwire.api.viewer import Viewer
from thoughtwire.client import Follower
from thoughtwire.shared.redis import RedisFactory
from thoughtwire.shared.redis.pubsub import open_link
from thoughtwire.shared.reducer import fold
from thoughtwire.shared.settings import Settings
from thoughtwire.shared.vocab import ViewScope

SECRET = "a-test-secret-that-is-at-least-32-bytes-long"
TOPIC = "zebra-migration-routes"  # in the search's arguments, its action and its result
HIDDEN = ("thinking", "tool_input")
ANSWER = ViewScope.ANSWER


def event(seq, type_, content="", **fields):
    return {
        "type": type_,
        "content": content,
        **fields,
        "session": "s",
        "run": "r",
        "ts": 1,
        "seq": seq,
        "epoch": "e",
    }


SEARCH = {"tool": "search", "call_id": "call_1"}
RUN = [
    event(1, "thinking", "Let me think about zebras", block="b1", delta=False),
    event(2, "tool_input", '{"query": "zeb', block="b2", delta=True, **SEARCH),
    event(3, "tool_input", 'ras"}', block="b2", delta=True, **SEARCH),
    event(
        4,
        "action",
        "Searching: zebras",
        block="b2",
        delta=False,
        arguments={"query": "zebras"},
        **SEARCH,
    ),
    event(
        5,
        "approval",
        block="b2",
        arguments={"query": "zebras"},
        timeout_ms=1000,
        default="deny",
        **SEARCH,
    ),
    event(
        6, "decision", block="b2", call_id="call_1", decision="allow", reason="zebras ok", by="user"
    ),
    event(
        7, "observation", "Found: zebras migrate", block="b3", delta=False, is_error=False, **SEARCH
    ),
    event(8, "thinking", "Now the answer", block="b4", delta=True),
    event(9, "block_end", block="b4"),
    event(10, "answer", "They ", block="b5", delta=True),
    event(11, "answer", "walk.", block="b5", delta=True),
    event(12, "block_end", block="b5"),
    event(13, "done", "They walk.", usage={"total_tokens": 9}),
]


def hides_everything(frames):
    """No reasoning, no tool argument or result, in frames (dicts) an answer viewer got."""
    for frame in frames:
        assert frame["type"] not in HIDDEN, frame
        assert "arguments" not in frame, frame
        text = json.dumps(frame)
        assert TOPIC not in text and "zebra" not in text.replace('"They walk."', ""), frame
        if frame["type"] == "action":
            assert frame["content"] == frame["tool"], frame
        if frame["type"] == "observation":
            assert frame["content"] == "", frame
        if frame["type"] == "decision":
            assert frame["reason"] is None, frame


# --- the projection, with plain data ------------------------------------------


def test_an_answer_viewer_gets_the_answer_and_the_shape_of_the_run_only():
    shown = [e for e in (project_event(dict(e), ANSWER) for e in RUN) if e is not None]
    hides_everything(shown)
    assert [e["seq"] for e in shown] == [4, 5, 6, 7, 9, 10, 11, 12, 13]
    assert shown[0] == {
        "type": "action",
        "session": "s",
        "run": "r",
        "ts": 1,
        "block": "b2",
        "delta": False,
        "tool": "search",
        "call_id": "call_1",
        "content": "search",
        "seq": 4,
        "epoch": "e",
    }
    assert all(project_event(e, ViewScope.FULL) is e for e in RUN)
    assert project_event(event(1, "some_new_type", "secret"), ANSWER) is None


def test_a_projected_frame_keeps_its_position_last_and_replies_pass():
    from thoughtwire.shared.protocol import event_position

    for e in RUN:
        frame = json.dumps(e, separators=(",", ":"))
        view = project_frame(frame, ANSWER)
        if view is not None:
            assert event_position(view) == (e["seq"], "e")
    answer = json.dumps(RUN[9], separators=(",", ":"))
    assert project_frame(answer, ANSWER) is answer  # kept whole: not even re-encoded
    gap = '{"type":"gap","session":"s","reason":"trimmed","after":1,"epoch":"e","next":5}'
    assert project_frame(gap, ANSWER) is gap


def test_the_reducer_folds_the_projected_stream_to_the_projected_state():
    shown = [e for e in (project_event(dict(e), ANSWER) for e in RUN) if e is not None]
    state = project_state(fold(RUN), ANSWER)
    assert fold(shown) == state  # seq jumps are no gap to the reducer
    blocks = state["runs"]["r"]["blocks"]
    assert [b["kind"] for b in blocks] == ["tool_call", "tool_result", "text"]
    assert blocks[0]["arguments"] is None and blocks[0]["input"] == ""
    assert blocks[0]["approval"] == {"status": "allow", "reason": None, "by": "user"}
    assert blocks[2]["text"] == "They walk."
    assert state["seq"] == 13


def test_a_snapshot_frame_is_projected():
    state = fold(RUN)
    frame = json.dumps(
        {"type": "snapshot", "session": "s", "seq": 13, "epoch": "e", "state": state}
    )
    view = json.loads(project_frame(frame, ANSWER))
    assert view["type"] == "snapshot" and view["seq"] == 13
    assert view["state"] == project_state(state, ANSWER)
    assert "zebra" not in json.dumps(view).replace("They walk.", "")


def test_a_token_carries_its_scope_and_an_unknown_one_is_invalid():
    auth = Authenticator(Settings(jwt_secret=SECRET))
    full, _ = auth.viewer_token("owner", "s1")
    answer, _ = auth.viewer_token("owner", "s1", scope=ANSWER)
    assert auth.authenticate(full).scope is ViewScope.FULL
    assert auth.authenticate(answer).scope is ANSWER
    claims = {"sub": "owner", "sid": "s1", "scope": "view", "aud": "thoughtwire:viewer"}
    claims |= {"exp": int(time.time()) + 60, "view": "everything"}
    odd = jwt.encode(claims, SECRET, algorithm="HS256", headers={"typ": "viewer+jwt"})
    with pytest.raises(AuthError, match="invalid token"):
        auth.authenticate(odd)


# --- a real run -----------------------------------------------------------------


@pytest.fixture(scope="module")
def scoped(redis_server, logdir):
    c = start_cluster(redis_server, logdir, JWT_SECRET=SECRET, THOUGHTWIRE_SIM_STEP_DELAY="0.2")
    yield c
    c.stop()


def user_token(sub):
    now = int(time.time())
    return jwt.encode({"sub": sub, "iat": now, "exp": now + 600}, SECRET, algorithm="HS256")


async def mint(frontend, owner, session, scope=None, as_token=None):
    headers = {"Authorization": f"Bearer {as_token or owner}"}
    body = None if scope is None else {"scope": scope}
    async with httpx.AsyncClient(headers=headers) as http:
        return await http.post(f"{frontend.http}/v1/sessions/{session}/viewer-token", json=body)


def url(frontend, **query):
    return f"{frontend.ws}/ws/agent-thoughts?" + "&".join(f"{k}={v}" for k, v in query.items())


async def sse_events(frontend, session, viewer, after=0):
    events = []
    async with httpx.AsyncClient(timeout=seconds(20)) as http:
        address = f"{frontend.http}/v1/sessions/{session}/events?after={after}&token={viewer}"
        async with asyncio.timeout(seconds(20)), http.stream("GET", address) as response:
            assert response.status_code == 200
            async for line in response.aiter_lines():
                if line.startswith("data: "):
                    events.append(json.loads(line[6:]))
                    if events[-1]["type"] == "done":
                        return events
    raise AssertionError("the stream ended before the run's done")


async def test_a_scoped_viewer_never_sees_reasoning_or_tool_details(scoped):
    a, b = scoped.frontends
    owner = user_token("owner-scopes")
    async with connect(url(a, token=owner)) as mine:
        session = await greeting(mine)
        grant = (await mint(a, owner, session, "answer")).json()
        assert grant["scope"] == "answer"
        viewer = grant["token"]
        # Live, on the other frontend; a query naming another scope changes nothing.
        async with connect(url(b, token=viewer, session=session, scope="full")) as live:
            await greeting(live)
            await mine.send(f"tell me about {TOPIC}")
            everything = await run_events(mine)
            shown = await run_events(live)
    assert [e["type"] for e in everything if e["type"] in HIDDEN]  # the run has them
    assert any(TOPIC in json.dumps(e) for e in everything)
    hides_everything(shown)
    assert [e for e in everything if e["type"] == "answer"] == [
        e for e in shown if e["type"] == "answer"
    ]
    assert {"action", "observation", "done"} <= {e["type"] for e in shown}
    assert shown[-1]["seq"] == everything[-1]["seq"]
    seqs = [e["seq"] for e in shown]
    assert seqs == sorted(set(seqs)) and len(seqs) < len(everything)  # jumps, in order

    # Resumed from the start, and from the middle, on either frontend.
    middle = everything[3]["seq"]
    for frontend, after in ((a, 0), (b, middle)):
        async with connect(url(frontend, token=viewer, session=session, after=after)) as ws:
            await greeting(ws)
            replayed = await run_events(ws)
        hides_everything(replayed)
        # Compared folded: a frontend may merge a lagging client's deltas into one frame.
        assert fold(replayed) == fold([e for e in shown if e["seq"] > after])

    # A resume message that names a scope changes nothing either.
    last = everything[-1]["seq"]
    epoch = everything[-1]["epoch"]
    async with connect(url(a, token=viewer, session=session, after=last, epoch=epoch)) as ws:
        await greeting(ws)
        resume = {"type": "resume", "session": session, "after": 0, "scope": "full"}
        await ws.send(json.dumps(resume))
        await greeting(ws)
        replayed = await run_events(ws)
    hides_everything(replayed)
    assert fold(replayed) == fold(shown)

    # Server-sent events.
    over_sse = await sse_events(b, session, viewer)
    hides_everything(over_sse)
    assert fold(over_sse) == fold(shown)

    # The Python client takes the seq jumps as no gap, and folds what it was shown.
    follower = Follower([a.ws, b.ws], session, token=viewer, after=0, epoch=shown[0]["epoch"])
    followed = []
    async with asyncio.timeout(seconds(20)):
        async for item in follower.events():
            followed.append(item)
            if item["type"] == "done":
                break
    assert "gap" not in [e["type"] for e in followed]
    hides_everything(followed)
    assert follower.folded == fold(shown) == project_state(fold(everything), ANSWER)


async def test_a_scoped_late_joiner_mid_run_sees_no_reasoning_or_tool_details(scoped):
    """Joined while a run is past its tool call: its first frames (a snapshot of the run
    so far, where snapshots are on) show none of it either."""
    a, b = scoped.frontends
    owner = user_token("owner-late")
    async with connect(url(a, token=owner)) as mine:
        session = await greeting(mine)
        viewer = (await mint(a, owner, session, "answer")).json()["token"]
        await mine.send(f"tell me about {TOPIC}")
        async with asyncio.timeout(seconds(10)):
            while (await recv_json(mine)).get("type") != "observation":
                pass
        async with connect(url(b, token=viewer, session=session)) as late:
            await greeting(late)
            joined = []
            async with asyncio.timeout(seconds(20)):
                while not joined or joined[-1]["type"] != "done":
                    joined.append(await recv_json(late))
    hides_everything([f for f in joined if f["type"] != "snapshot"])
    for frame in joined:
        text = json.dumps(frame)
        assert TOPIC not in text and '"reasoning"' not in text and '"arguments": {' not in text
    snapshots = [f for f in joined if f["type"] == "snapshot"]
    for snapshot in snapshots:
        (run,) = snapshot["state"]["runs"].values()
        assert [b["kind"] for b in run["blocks"]] == ["tool_call", "tool_result"]
        assert run["blocks"][0]["text"] == "search" and run["blocks"][1]["text"] == ""


async def test_a_scope_cannot_be_widened(scoped):
    a, b = scoped.frontends
    owner = user_token("owner-widen")
    async with connect(url(a, token=owner)) as mine:
        session = await greeting(mine)
    narrow = (await mint(a, owner, session, "answer")).json()["token"]
    wide = (await mint(a, owner, session)).json()
    assert wide["scope"] == "full"
    assert (await mint(a, owner, session, "everything")).status_code == 422
    # A misspelt field is no scope at all: refused, where it minted a full token before.
    headers = {"Authorization": f"Bearer {owner}"}
    async with httpx.AsyncClient(headers=headers) as http:
        path = f"{a.http}/v1/sessions/{session}/viewer-token"
        misspelt = await http.post(path, json={"Scope": "answer"})
        assert misspelt.status_code == 422, misspelt.text
        assert "Scope" in misspelt.text and "token" not in misspelt.json()
        # So is one in a job's body: a retry under a misspelt key ran twice before.
        job = await http.post(f"{a.http}/v1/jobs", json={"prompt": "x", "idempotencyKey": "k"})
        assert job.status_code == 422 and "idempotencyKey" in job.text, job.text
    # A viewer mints nothing, not even its own scope.
    for scope in ("full", "answer", None):
        assert (await mint(b, owner, session, scope, as_token=narrow)).status_code == 403
    # An auth refresh with another scope closes the socket (4003).
    async with connect(url(b, token=narrow, session=session)) as ws:
        await greeting(ws)
        await ws.send(json.dumps({"type": "auth", "token": wide["token"]}))
        with pytest.raises(websockets.ConnectionClosed) as info:
            while True:
                await recv_json(ws)
        assert info.value.rcvd.code == 4003
    # The same scope refreshes.
    again = (await mint(a, owner, session, "answer")).json()["token"]
    async with connect(url(b, token=narrow, session=session)) as ws:
        await greeting(ws)
        await ws.send(json.dumps({"type": "auth", "token": again}))
        await ws.send(json.dumps({"type": "ping"}))
        reply = await recv_json(ws)
        assert reply["type"] == "error" and reply["code"] != "forbidden", reply


# --- the cost -------------------------------------------------------------------


class Sink:
    """A transport that keeps up: takes every frame at once."""

    def __init__(self):
        self.frames = []
        self.arrived = asyncio.Event()

    def write(self, frame, wire):
        self.frames.append(frame)
        self.arrived.set()
        return True

    async def send(self, frame):
        return self.write(frame, None)

    def close(self, code, reason): ...


async def test_the_projection_runs_once_per_event_and_scope(redis_server, prefix, monkeypatch):
    calls = []
    real = scopes.project_frame

    def counted(frame, scope):
        calls.append(scope)
        return real(frame, scope)

    monkeypatch.setattr(scopes, "project_frame", counted)
    hub = Hub(partial(open_link, RedisFactory(Settings(redis_url=redis_server.url))), prefix)
    await hub.start()
    channel = f"{prefix}:session"
    try:
        sockets = [(Sink(), ANSWER) for _ in range(50)] + [(Sink(), ViewScope.FULL) for _ in "ab"]
        viewers = []
        for sink, scope in sockets:
            viewers.append(Viewer(None, hub, sink, queue_size=100, scope=scope))
            await hub.join(channel, viewers[-1], scope)
        with redis_server.client() as r:
            for e in RUN:
                r.publish(channel, json.dumps(e, separators=(",", ":")))
        async with asyncio.timeout(seconds(10)):
            for sink, scope in sockets:
                while len(sink.frames) < (9 if scope is ANSWER else len(RUN)):
                    sink.arrived.clear()
                    await sink.arrived.wait()
        assert calls == [ANSWER] * len(RUN)  # once per event for 50 answer sockets
        for sink, scope in sockets:
            got = [json.loads(f) for f in sink.frames]
            if scope is ANSWER:
                hides_everything(got)
                assert [e["seq"] for e in got] == [4, 5, 6, 7, 9, 10, 11, 12, 13]
            else:
                assert got == RUN
        for viewer in viewers[:50]:  # the scoped ones leave: the channel is plain again
            await hub.leave(channel, viewer)
        assert not hub._scoped and hub.channels() == [channel]
    finally:
        await hub.close()
