"""The Python client (thoughtwire.client) against real frontends with authentication on.

Two frontends and one worker on a real Redis, ``JWT_SECRET`` set; tokens are HS256
tokens signed with it, handed to the client as a string or a callback.
"""

import asyncio
import contextlib
import json
import signal
import subprocess
import sys
import time
from contextlib import aclosing, asynccontextmanager
from pathlib import Path
from typing import Any

import jwt
import pytest
from websockets.asyncio.server import serve
from websockets.exceptions import ConnectionClosed

from tests.conftest import SIM_STEPS, sim_run, start_cluster
from tests.procs import free_port, seconds
from thoughtwire.api.auth import Authenticator
from thoughtwire.client import (
    Follower,
    Refused,
    State,
    StateChange,
    Unreachable,
    ask,
    socket_url,
)
from thoughtwire.shared.reducer import initial_state, reduce
from thoughtwire.shared.settings import Settings

SECRET = "a-client-test-secret-that-is-32-bytes-or-more"
THOUGHTS = SIM_STEPS


def token(sub="alice", ttl=600):
    now = int(time.time())
    return jwt.encode({"sub": sub, "iat": now, "exp": now + ttl}, SECRET, algorithm="HS256")


def viewer_token(owner, session):
    auth = Authenticator(Settings(jwt_secret=SECRET))
    return auth.viewer_token(owner, session)[0]


@pytest.fixture(scope="module")
def secure(redis_server, logdir):
    """Runs of about 2 s (60 answer tokens at 30 a second), so a frontend can go mid-run."""
    c = start_cluster(
        redis_server,
        logdir,
        JWT_SECRET=SECRET,
        THOUGHTWIRE_SIM_ANSWER_TOKENS="60",
        THOUGHTWIRE_SIM_TOKENS_PER_SECOND="30",
        THOUGHTWIRE_DRAIN_WINDOW="0.2",
    )
    yield c
    c.stop()


def assert_once_in_order(events):
    """Seqs 1..N, each once and in order; one run, whole."""
    seqs = [e["seq"] for e in events]
    assert seqs == list(range(1, len(seqs) + 1)), seqs
    assert [e["type"] for e in events] == sim_run(60)


# --- no server needed ---------------------------------------------------------


def test_importing_the_client_loads_none_of_the_servers_packages():
    """``import thoughtwire.client`` with fastapi, uvicorn, redis, fakeredis, openai and
    jwt made unimportable, as a program that only follows sessions would have them."""
    script = """
import sys
BLOCKED = {"fastapi", "uvicorn", "redis", "fakeredis", "openai", "jwt", "starlette"}
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"{name} must not be imported by the client")
sys.meta_path.insert(0, Block())
import thoughtwire.client
print(sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED))
"""
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=seconds(30)
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_socket_urls_are_built_not_concatenated():
    """A query already in the URL (even a token) is kept and merged, never doubled by '?'."""
    url = socket_url("ws://h:1/ws/agent-thoughts?token=T", {"session": "S", "after": 3})
    assert url == "ws://h:1/ws/agent-thoughts?token=T&session=S&after=3"
    assert socket_url("http://h:1/", {}) == "ws://h:1/ws/agent-thoughts"
    assert (
        socket_url("https://h/base", {"epoch": "e f"}) == "wss://h/base/ws/agent-thoughts?epoch=e+f"
    )
    resumed = socket_url(
        "ws://h/ws/agent-thoughts?session=OLD&after=1", {"session": "S", "after": 9}
    )
    assert resumed == "ws://h/ws/agent-thoughts?session=S&after=9"


def test_the_position_drops_duplicates_and_follows_gaps():
    """Plain data: a seq not past the position in the same epoch is not shown again."""
    follower = Follower("ws://h", "S", after=0)
    shown = [
        follower._advance(m)
        for m in (
            {"type": "thinking", "seq": 1, "epoch": "a", "run": "r"},
            {"type": "thinking", "seq": 2, "epoch": "a", "run": "r"},
            {"type": "thinking", "seq": 2, "epoch": "a", "run": "r"},  # a duplicate
            {"type": "gap", "reason": "epoch", "after": 2, "epoch": "b", "next": 1},
            {"type": "answer", "seq": 1, "epoch": "b", "run": "r"},  # a new epoch
            {"type": "ping"},
        )
    ]
    assert shown == [True, True, False, True, True, False]
    assert (follower.epoch, follower.seq) == ("b", 1)


def test_a_snapshot_is_the_state_and_the_position_and_raw_asks_for_none():
    """Plain data: a whole snapshot becomes ``folded`` and the position; one that is not a
    whole state, or not past the position, is not shown; ``replay="raw"`` is in the URL."""
    follower = Follower("ws://h", "S")
    state = {"epoch": "a", "seq": 7, "runs": {}, "order": []}
    shown = [
        follower._advance(m)
        for m in (
            {"type": "snapshot", "state": {"seq": 9}, "seq": 9, "epoch": "a"},  # not whole
            {"type": "snapshot", "state": state, "seq": 7, "epoch": "a"},
            {"type": "answer", "seq": 7, "epoch": "a", "run": "r"},  # the snapshot has it
            {"type": "snapshot", "state": state, "seq": 7, "epoch": "a"},  # not past it
            {"type": "answer", "seq": 8, "epoch": "a", "run": "r", "content": "x"},
        )
    ]
    assert shown == [False, True, False, False, True]
    assert (follower.epoch, follower.seq, follower.folded["seq"]) == ("a", 8, 8)
    assert "replay" not in follower.url(0)
    assert (
        Follower("ws://h", "S", replay="raw").url(0)
        == "ws://h/ws/agent-thoughts?session=S&replay=raw"
    )
    with pytest.raises(ValueError):
        Follower("ws://h", "S", replay="all")


async def test_an_unreachable_frontend_fails_within_the_timeout():
    """A port nobody listens on: Unreachable after ``timeout`` (2 s), not 50 retries later."""
    states = []
    follower = Follower(f"ws://127.0.0.1:{free_port()}", timeout=2, on_state=states.append)
    began = time.monotonic()
    with pytest.raises(Unreachable, match="within 2 s"):
        async with asyncio.timeout(seconds(10)):
            async for _ in follower.events("anyone?"):
                pass
    elapsed = time.monotonic() - began
    print(f"gave up after {elapsed:.2f} s")
    assert elapsed < 2 + seconds(6), f"gave up after {elapsed:.2f} s"
    assert states[0].state == State.CONNECTING and states[-1].state == State.CLOSED


# --- against the cluster ------------------------------------------------------


async def test_a_follower_resumes_on_frontend_b_after_a_is_sigtermed_mid_run(secure):
    """Both URLs and a token callback; frontend A drains (SIGTERM) mid-run. Every seq
    arrives once, on B after A, and the callback was called again for the reconnect."""
    a, b = secure.frontends
    calls, states = [], []

    async def get_token():
        calls.append(time.monotonic())
        return token("alice")

    follower = Follower([a.ws, b.ws], token=get_token, on_state=states.append, timeout=20)
    events, stopper = [], None
    async with asyncio.timeout(seconds(60)), aclosing(follower.events("through a restart")) as it:
        async for event in it:
            events.append(event)
            if event["type"] == "answer" and stopper is None:
                assert follower.url_in_use.startswith(a.ws)
                stopper = asyncio.create_task(asyncio.to_thread(a.proc.stop))
            if event["type"] == "done":
                break
        assert await stopper in (0, -signal.SIGTERM)
    assert_once_in_order(events)
    assert follower.url_in_use.startswith(b.ws)
    assert len(calls) >= 2, f"the token callback was called {len(calls)} times"
    kinds = [s.state for s in states]
    assert kinds[:2] == [State.CONNECTING, State.CONNECTED]
    assert State.RECONNECTING in kinds and State.RESUMED in kinds
    resumed = next(s for s in states if s.state == State.RESUMED)
    assert resumed.url.startswith(b.ws) and resumed.gap is None
    assert kinds[-1] == State.CLOSED
    secure.frontends[0] = secure.add_frontend()  # A again, for the tests that follow
    secure.frontends.pop()


async def test_a_string_token_is_never_put_in_the_url(secure):
    """The token goes in the Authorization header; the URLs the client used carry none."""
    tok = token("bob")
    follower = Follower(secure.frontends[0].ws, token=tok)
    async for event in follower.events("header only"):
        if event["type"] == "done":
            break
    assert tok not in follower.url_in_use and "token" not in follower.url_in_use


async def test_a_bad_token_string_is_final_4001(secure):
    follower = Follower(secure.frontends[0].ws, token="not-a-token")
    with pytest.raises(Refused) as info:
        async with asyncio.timeout(seconds(10)):
            async for _ in follower.events("hello"):
                pass
    assert info.value.code == 4001 and follower.reconnects == 0


async def test_a_4001_asks_the_callback_once_for_a_fresh_token(secure):
    """First an expired token, then a good one: one retry. A callback that only ever
    returns bad tokens is called twice, then the 4001 is final."""
    handed = [token("carol", ttl=-60), token("carol")]
    follower = Follower(secure.frontends[0].ws, token=lambda: handed.pop(0))
    async with asyncio.timeout(seconds(30)):
        events = [e async for e in ask_with(follower, "after a refresh")]
    assert events[-1]["type"] == "done" and handed == []

    calls = []

    def always_bad():
        calls.append(1)
        return "still-not-a-token"

    with pytest.raises(Refused) as info:
        async with asyncio.timeout(seconds(10)):
            async for _ in Follower(secure.frontends[0].ws, token=always_bad).events("x"):
                pass
    assert info.value.code == 4001 and len(calls) == 2


async def ask_with(follower, prompt):
    async for event in follower.events(prompt):
        yield event
        if event["type"] in ("done", "error", "cancelled"):
            return


async def test_ask_yields_its_own_run_when_another_writers_run_comes_first(secure):
    """Another writer (the HTTP API) has a run going and one queued behind it in the
    session; ``ask`` joins, prompts, and yields its own run, the third: the one its
    frontend named in the ``queued`` reply, not the queued run whose events come first.
    Before, ask took the first new run it saw for its own. The reply names the same run
    when the prompt is sent again with its key, on another frontend."""
    import httpx

    a, b = secure.frontends
    tok = token("frank")
    async with httpx.AsyncClient(headers={"Authorization": f"Bearer {tok}"}) as http:
        first = (await http.post(f"{b.http}/v1/jobs", json={"prompt": "one"})).json()
        session = first["session"]
        follower = Follower(a.ws, session, token=tok, heartbeat=None)
        async with asyncio.timeout(seconds(30)):
            async for event in follower.events():
                if event.get("run") == first["job"]:
                    break  # the first run is going: the next one waits behind it
        second = await http.post(f"{b.http}/v1/jobs", json={"prompt": "two", "session": session})
        second = second.json()["job"]
    runs = []
    async with asyncio.timeout(seconds(30)):
        async for event in ask("three", a.ws, session=session, token=tok, heartbeat=None):
            runs.append(event["run"])
    assert second not in runs and first["job"] not in runs
    assert len(set(runs)) == 1, runs

    async def queued_for(url, key):
        follower = Follower(url, session, token=tok, heartbeat=None)
        await follower.prompt("four", key=key)
        async with asyncio.timeout(seconds(30)):
            async for _ in follower.events():
                if follower.run_of(key) is not None:
                    return follower.run_of(key)

    assert await queued_for(a.ws, "k-4") == await queued_for(b.ws, "k-4")


async def test_a_key_used_in_another_session_is_refused_by_its_key(secure):
    """A prompt's key names one prompt of one session: sent again in another session,
    the frontend refused nothing and answered ``queued`` with the first session's run,
    whose events that socket never sees, so ``ask`` waited for ever. Now it is refused
    (``bad_message``, naming the key), and ``ask`` ends with :class:`Refused`."""
    a, b = secure.frontends
    tok = token("ivan")
    first = Follower(a.ws, token=tok, heartbeat=None)
    await first.prompt("in the first session", key="k-shared")
    async with asyncio.timeout(seconds(30)):
        async with aclosing(first.events()) as stream:
            async for _ in stream:
                if first.run_of("k-shared"):
                    break
    follower = Follower(b.ws, token=tok, heartbeat=None)
    await follower.prompt("in the first session", key="k-shared")  # the same prompt
    with pytest.raises(Refused) as info:
        async with asyncio.timeout(seconds(10)):
            async for _ in follower.events():
                pass
    assert info.value.error == "bad_message" and info.value.key == "k-shared"
    assert "another session" in info.value.reason
    assert follower._prompts == {}


async def test_cancel_ends_the_followed_run(secure):
    follower = Follower(secure.frontends[1].ws, token=token("dave"))
    events = []
    async with asyncio.timeout(seconds(30)):
        async for event in follower.events("cancel me"):
            events.append(event)
            if event["type"] == "answer" and len(events) == len(THOUGHTS) + 1:
                await follower.cancel(event["run"])
            if event["type"] in ("done", "error", "cancelled"):
                break
    assert events[-1]["type"] == "cancelled"


async def test_a_viewer_follows_from_another_frontend_but_its_prompt_is_an_error(secure):
    """The owner prompts on A; a viewer token follows the same run on B. The viewer's
    own prompt is refused (4003) and surfaces as :class:`Refused`, not a crash."""
    a, b = secure.frontends
    owner = Follower(a.ws, token=token("erin"))
    seen_by_owner, seen_by_viewer = [], []
    started = asyncio.Event()

    async def as_owner():
        async for event in ask_with(owner, "watch me"):
            seen_by_owner.append(event)
            started.set()

    async def as_viewer():
        await started.wait()
        viewer = Follower(b.ws, owner.session, after=0, token=viewer_token("erin", owner.session))
        async for event in viewer.events():
            seen_by_viewer.append(event)
            if event["type"] == "done":
                return

    async with asyncio.timeout(seconds(30)):
        await asyncio.gather(as_owner(), as_viewer())
    assert [e["seq"] for e in seen_by_viewer] == [e["seq"] for e in seen_by_owner]

    viewer = Follower(b.ws, owner.session, after=0, token=viewer_token("erin", owner.session))
    with pytest.raises(Refused) as info:
        async with asyncio.timeout(seconds(10)):
            async for event in viewer.events():
                if event["type"] == "done":
                    await viewer.prompt("may I?")
    assert info.value.code == 4003


async def test_ask_keeps_working_with_a_token(secure):
    """The one-call helper, as the README shows it, with a token option."""
    async with asyncio.timeout(seconds(30)):
        events = [e async for e in ask("hi", secure.frontends[1].http, token=token("frank"))]
    assert events[-1]["type"] == "done"
    answer = "".join(e["content"] for e in events if e["type"] == "answer")
    assert answer.strip().endswith("the whole reply.")


async def test_refresh_hands_the_open_socket_a_fresh_token(secure):
    """``refresh()`` sends an ``auth`` message; a token for another user closes with 4003."""
    follower = Follower(secure.frontends[0].ws, token=token("gina"))
    async with asyncio.timeout(seconds(30)):
        async for event in follower.events("refresh mid-run"):
            if event["seq"] == 2:
                await follower.refresh(token("gina"))
            if event["type"] == "done":
                break
    assert event["type"] == "done"
    again = Follower(secure.frontends[0].ws, follower.session, after=0, token=token("gina"))
    with pytest.raises(Refused) as info:
        async with asyncio.timeout(seconds(10)):
            async for event in again.events():
                if event["seq"] == 1:
                    await again.refresh(token("someone-else"))
    assert info.value.code == 4003


def test_state_changes_are_plain_data():
    change = StateChange(State.CLOSED, code=4001, reason="token expired")
    assert json.loads(json.dumps({"state": change.state, "code": change.code})) == {
        "state": "closed",
        "code": 4001,
    }


async def test_with_on_error_a_viewers_refused_prompt_is_reported_and_following_goes_on(secure):
    """As the JavaScript client does: the 4003 that answers a viewer's prompt goes to
    ``on_error``, the prompt is not sent again, and the run still arrives whole, once."""
    a, b = secure.frontends
    owner = Follower(a.ws, token=token("hana"))
    errors, seen, started = [], [], asyncio.Event()

    async def as_owner():
        async for _event in ask_with(owner, "a viewer will try to prompt"):
            started.set()

    async def as_viewer():
        await started.wait()
        viewer = Follower(
            b.ws,
            owner.session,
            after=0,
            token=viewer_token("hana", owner.session),
            on_error=errors.append,
        )
        async with aclosing(viewer.events()) as stream:
            async for event in stream:
                seen.append(event)
                if len(seen) == 1:
                    await viewer.prompt("may I?")
                if event["type"] == "done":
                    return

    async with asyncio.timeout(seconds(30)):
        await asyncio.gather(as_owner(), as_viewer())
    assert [(e.code, e.action) for e in errors] == [(4003, "prompt")]
    assert_once_in_order(seen)


async def test_a_heartbeat_keeps_a_quiet_follower_past_the_idle_timeout(secure):
    """A frontend that closes sockets quiet both ways for 1 s: a follower of a quiet
    session with a 0.3 s heartbeat is still on its first socket 3 s later; without one
    it is closed with 1000 `idle timeout`, which is final."""
    frontend = secure.add_frontend(THOUGHTWIRE_IDLE_TIMEOUT="1")
    secure.frontends.remove(frontend)
    try:
        beating = Follower(frontend.ws, "quiet-session", after=0, token=token(), heartbeat=0.3)
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(seconds(3)), aclosing(beating.events()) as stream:
                async for event in stream:
                    raise AssertionError(f"the session is quiet: {event}")
        assert beating.reconnects == 0

        silent = Follower(frontend.ws, "quiet-session", after=0, token=token(), heartbeat=None)
        with pytest.raises(Refused) as info:
            async with asyncio.timeout(seconds(10)):
                async for event in silent.events():
                    raise AssertionError(f"the session is quiet: {event}")
        assert (info.value.code, info.value.reason) == (1000, "idle timeout")
    finally:
        await asyncio.to_thread(frontend.proc.stop)


async def test_what_waits_for_a_connection_is_bounded():
    """Prompts waiting for their runs and cancels waiting for a socket: 64 each, then
    :class:`Refused` (no socket is opened here)."""
    follower = Follower("ws://127.0.0.1:1")
    for i in range(64):
        await follower.prompt(f"p{i}")
        await follower.cancel()
    with pytest.raises(Refused, match="64 prompts"):
        await follower.prompt("one too many")
    with pytest.raises(Refused, match="64 messages"):
        await follower.cancel()


# --- approvals, multitask and the folded state ------------------------------------

CONFORMANCE = Path(__file__).resolve().parent.parent / "clients" / "conformance" / "reducer.json"


def conformance_case(words):
    """The case of clients/conformance/reducer.json whose name has ``words``."""
    (case,) = [c for c in json.loads(CONFORMANCE.read_text())["cases"] if words in c["name"]]
    return case


async def test_approve_and_multitask_frames_and_the_folded_state():
    """A stand-in frontend greets, keeps what the follower sends and hands it a v2 run:
    ``approve`` and ``multitask`` go out as docs/protocol.md gives them, and ``folded``
    is the reducer's state of the run."""
    case = conformance_case("to its done")
    frames = case["frames"]
    received = []

    async def frontend(ws):
        await ws.send(json.dumps({"type": "session", "session": frames[0]["session"]}))
        for _ in range(3):
            received.append(json.loads(await ws.recv()))
        for frame in frames:
            await ws.send(json.dumps(frame))
        await ws.wait_closed()

    async with serve(frontend, "127.0.0.1", 0) as server:
        port = server.sockets[0].getsockname()[1]
        follower = Follower(f"ws://127.0.0.1:{port}", heartbeat=None)
        # Before any connection: kept, and sent once the session is known.
        await follower.approve("r1", "c1", "deny", "not that file")
        await follower.approve("r1", "c2", "allow")
        async with (
            asyncio.timeout(seconds(10)),
            aclosing(follower.events("go on", multitask="interrupt")) as stream,
        ):
            async for event in stream:
                assert follower.folded["seq"] == event["seq"]
                if event["seq"] == frames[-1]["seq"]:
                    break
    prompt = received[2]  # after the approvals asked for before it
    assert prompt.pop("key") and prompt == {
        "type": "prompt",
        "content": "go on",
        "multitask": "interrupt",
    }
    assert received[:2] == [
        {
            "type": "approve",
            "run": "r1",
            "call_id": "c1",
            "decision": "deny",
            "reason": "not that file",
        },
        {"type": "approve", "run": "r1", "call_id": "c2", "decision": "allow"},
    ]
    assert follower.folded == case["expected"]


async def test_a_multitask_or_a_decision_the_protocol_does_not_have_is_refused_here():
    follower = Follower("ws://127.0.0.1:1")
    with pytest.raises(ValueError, match="multitask"):
        await follower.prompt("x", multitask="later")
    with pytest.raises(ValueError, match="allow or deny"):
        await follower.approve("r1", "c1", "maybe")


async def test_a_late_joiner_gets_one_snapshot_then_the_next_run_event_by_event(secure):
    """A follower that joins a session after its run, with no position, gets one
    ``snapshot`` (the finished run's answer, in far fewer frames than the log), then the
    next run's events from the snapshot's seq on, each once."""
    a, b = secure.frontends
    owner = Follower(a.ws, token=token("ines"))
    async with asyncio.timeout(seconds(30)):
        first = [e async for e in ask_with(owner, "What is a snapshot?")]
    late = Follower(b.ws, owner.session, token=token("ines"))
    seen = []
    async with asyncio.timeout(seconds(30)):
        async for event in late.events():
            seen.append(event)
            if event["type"] == "snapshot":
                second = [e async for e in ask_with(owner, "And again?")]
            if event["type"] == "done":
                break
    assert seen[0]["type"] == "snapshot" and seen[0]["seq"] == first[-1]["seq"]
    assert [e["type"] for e in seen].count("snapshot") == 1
    assert [e["seq"] for e in seen[1:]] == [e["seq"] for e in second]
    assert 1 + len(second) < len(first) + len(second)
    run = late.folded["runs"][first[-1]["run"]]
    answer = "".join(e["content"] for e in first if e["type"] == "answer")
    assert run["status"] == "done"
    assert "".join(b["text"] for b in run["blocks"] if b["kind"] == "text") == answer
    assert late.folded["order"] == owner.folded["order"]
    assert late.folded["runs"][second[-1]["run"]] == owner.folded["runs"][second[-1]["run"]]


async def test_the_folded_state_of_a_real_run(secure):
    """A run through a frontend and a worker folds to one run, done, whose text blocks
    hold the answer its ``answer`` events carried."""
    follower = Follower(secure.frontends[0].ws, token=token("hana"))
    async with asyncio.timeout(seconds(30)):
        events = [e async for e in ask_with(follower, "What is folding?")]
    run = follower.folded["runs"][events[-1]["run"]]
    answer = "".join(e["content"] for e in events if e["type"] == "answer")
    assert follower.folded["order"] == [events[-1]["run"]]
    assert follower.folded["seq"] == events[-1]["seq"]
    assert run["status"] == "done" and all(b["done"] for b in run["blocks"])
    assert "".join(b["text"] for b in run["blocks"] if b["kind"] == "text") == answer
    assert [b["kind"] for b in run["blocks"]].count("tool_result") == 1


async def test_a_call_approved_through_the_follower_goes_on_and_folds_with_its_decision(
    redis_server, logdir
):
    """A worker that asks before "search": the follower sees the run wait, approves the
    call, and the run finishes with the call's approval in its folded state."""
    cluster = start_cluster(
        redis_server, logdir, frontends=1, JWT_SECRET=SECRET, THOUGHTWIRE_APPROVAL_TOOLS="search"
    )
    try:
        follower = Follower(cluster.frontends[0].ws, token=token("ivan"))
        waiting = None
        async with asyncio.timeout(seconds(30)):
            async for event in ask_with(follower, "find cats"):
                if event["type"] == "approval":
                    waiting = follower.folded["runs"][event["run"]]["status"]
                    await follower.approve(event["run"], event["call_id"], "allow", "fine")
    finally:
        await asyncio.to_thread(cluster.stop)
    run = follower.folded["runs"][event["run"]]
    (call,) = [b for b in run["blocks"] if b["kind"] == "tool_call"]
    assert waiting == "waiting" and run["status"] == "done"
    assert call["approval"] == {"status": "allow", "reason": "fine", "by": "user"}
    assert call["tool"] == "search" and call["done"]


async def test_an_approval_decided_elsewhere_does_not_end_following_and_on_error_hears_refusals():
    """A stand-in frontend refuses an ``approve`` (``not_waiting``: decided on another
    frontend) and a prompt (``busy``), then sends a run: without ``on_error`` the
    follower drops the first and raises the second; with it, both are reported and the
    run is still followed to its end."""
    case = conformance_case("to its done")
    frames = case["frames"]

    def frontend_with(refusals):
        async def frontend(ws):
            await ws.send(json.dumps({"type": "session", "session": frames[0]["session"]}))
            for code in refusals:
                await ws.send(json.dumps({"type": "error", "code": code, "message": code}))
            for frame in frames:
                await ws.send(json.dumps(frame))
            await ws.wait_closed()

        return frontend

    async def follow(refusals, on_error=None):
        async with serve(frontend_with(refusals), "127.0.0.1", 0) as server:
            port = server.sockets[0].getsockname()[1]
            follower = Follower(f"ws://127.0.0.1:{port}", heartbeat=None, on_error=on_error)
            async with asyncio.timeout(seconds(10)), aclosing(follower.events()) as stream:
                async for event in stream:
                    if event["seq"] == frames[-1]["seq"]:
                        break
            return follower

    follower = await follow(["not_waiting"])
    assert follower.folded == case["expected"]
    with pytest.raises(Refused) as info:
        await follow(["busy"])
    assert info.value.error == "busy"
    heard = []
    follower = await follow(["not_waiting", "busy"], on_error=heard.append)
    assert [refused.error for refused in heard] == ["not_waiting", "busy"]
    assert follower.folded == case["expected"]


@asynccontextmanager
async def following(frontend, **options):
    """A follower of session S from its start, on the stand-in ``frontend`` (a handler)."""
    async with serve(frontend, "127.0.0.1", 0) as server:
        port = server.sockets[0].getsockname()[1]
        yield Follower(f"ws://127.0.0.1:{port}", "S", after=0, heartbeat=None, **options)


async def greeted(ws, received: list[list[dict]]) -> list[dict]:
    """Greet a stand-in frontend's new connection on session S; the list its frames go
    in, the last of ``received``."""
    frames: list[dict] = []
    received.append(frames)
    await ws.send(json.dumps({"type": "session", "session": "S"}))
    return frames


async def test_a_frontend_that_greets_then_closes_at_once_is_backed_off_from_not_stormed():
    """A frontend that takes the socket and closes it at once with 1013 (its event log
    unreachable, as api/viewer.py closes a catch-up that fails): the delays still grow,
    as for a frontend that refuses outright. Measured before: 49 connections in 2 s
    (a fresh 25-50 ms backoff after every greeting)."""
    opened = 0

    async def frontend(ws):
        nonlocal opened
        opened += 1
        await ws.send(json.dumps({"type": "session", "session": "S"}))
        await ws.close(1013, "the event log is unavailable; reconnect and resume")

    async with following(frontend) as follower:
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(2):
                async for _ in follower.events():
                    pass
    print(f"{opened} connections in 2 s")
    # 50 ms doubling to 2 s, x0.5-1: at most 7 tries fit in 2 s.
    assert 2 <= opened <= 8, opened


async def test_a_frame_that_is_no_json_object_drops_the_connection_and_the_stream_resumes():
    """A proxy's page in the middle of a stream: no traceback; the follower reconnects
    and resumes from the last event it kept, and gets every event once."""
    events = [
        {"type": "thinking", "run": "r1", "epoch": "e", "seq": n, "session": "S", "content": "x"}
        for n in (1, 2)
    ]
    asked: list[str] = []

    async def frontend(ws):
        asked.append(ws.request.path)
        await ws.send(json.dumps({"type": "session", "session": "S"}))
        if len(asked) == 1:
            await ws.send(json.dumps(events[0]))
            await ws.send("<html>502 Bad Gateway</html>")
            await ws.wait_closed()
            return
        await ws.send(json.dumps(events[1]))
        await ws.send(json.dumps({**events[1], "type": "done", "seq": 3, "content": ""}))
        await ws.wait_closed()

    async with following(frontend) as follower:
        seen = []
        async with asyncio.timeout(seconds(10)), aclosing(follower.events()) as stream:
            async for event in stream:
                seen.append(event["seq"])
                if event["type"] == "done":
                    break
    assert seen == [1, 2, 3]
    assert "after=1" in asked[1], asked


def drops_its_first_socket(
    first: dict, answers: dict[str, dict]
) -> tuple[Any, list, asyncio.Event]:
    """A stand-in frontend whose first socket sends ``first``, reads one frame and closes
    with 1012 without acting on it (a drain: it stopped reading); each later socket keeps
    the frames it gets and answers a frame of a type in ``answers`` with that event.
    Returns the handler, the frames each socket kept (the first's: none), and an event
    set once the first socket is closed."""
    received: list[list[dict]] = []
    dropped = asyncio.Event()

    async def frontend(ws):
        frames = await greeted(ws, received)
        if len(received) == 1:
            await ws.send(json.dumps(first))
            await ws.recv()  # written as the frontend stopped reading: never acted on
            await ws.close(1012, "frontend restarting; reconnect and resume")
            dropped.set()
            return
        async for frame in ws:
            frames.append(json.loads(frame))
            answer = answers.get(frames[-1]["type"])
            if answer is not None:
                await ws.send(json.dumps(answer))

    return frontend, received, dropped


async def test_a_stop_sent_as_the_frontend_closes_is_sent_again_until_its_run_ends():
    """A frontend stops reading before it closes (a drain's 1012, a slow reader's 4008):
    a cancel written in that moment is never read. The next connection carries the
    cancel of that run again, until the run's terminal event shows it ended. Before,
    the Stop was lost and the run went on."""
    run_event = {"type": "thinking", "run": "r1", "epoch": "e", "seq": 1, "session": "S"}
    ended = {**run_event, "type": "cancelled", "seq": 2}
    frontend, received, dropped = drops_its_first_socket(run_event, {"cancel": ended})

    async with following(frontend) as follower:
        seen = []
        async with asyncio.timeout(seconds(10)), aclosing(follower.events()) as stream:
            async for event in stream:
                seen.append(event["type"])
                if event["type"] == "thinking":
                    await follower.cancel("r1")
                    await dropped.wait()
                if event["type"] == "cancelled":
                    break
    assert seen == ["thinking", "cancelled"]
    assert received[1] == [{"type": "cancel", "run": "r1"}], received
    assert not follower._cancels  # the run ended: nothing left to send again


async def test_a_prompt_withdrawn_after_it_was_sent_has_its_run_cancelled_on_a_later_socket():
    """``cancel(key=...)`` of a prompt written on a socket that then closed before the
    frontend's ``queued`` reply (its frontend had queued it and died): the next
    connection sends the prompt again, which names its run, and cancels that run.
    Before, the prompt was dropped, no reply ever named its run, and the run went on."""
    received: list[list[dict]] = []
    read, withdrawn = asyncio.Event(), asyncio.Event()
    ended = {"type": "cancelled", "run": "r1", "epoch": "e", "seq": 1, "session": "S"}

    async def frontend(ws):
        frames = await greeted(ws, received)
        if len(received) == 1:
            frames.append(json.loads(await ws.recv()))  # queued as r1; the reply is lost
            read.set()
            await withdrawn.wait()
            await ws.close(1012, "frontend restarting; reconnect and resume")
            return
        async for frame in ws:
            frames.append(json.loads(frame))
            if frames[-1]["type"] == "prompt":
                queued = {"type": "queued", "session": "S", "run": "r1", "key": frames[-1]["key"]}
                await ws.send(json.dumps(queued))
            elif frames[-1] == {"type": "cancel", "run": "r1"}:
                await ws.send(json.dumps(ended))

    async with following(frontend) as follower:
        key = await follower.prompt("stop me")

        async def interrupt():
            await read.wait()
            await follower.cancel(key=key)
            withdrawn.set()

        interrupting = asyncio.create_task(interrupt())
        seen = []
        async with asyncio.timeout(seconds(5)), aclosing(follower.events()) as stream:
            async for event in stream:
                seen.append(event["type"])
                break
        await interrupting
    assert seen == ["cancelled"]
    assert [f["type"] for f in received[1]] == ["prompt", "cancel"], received


APPROVAL = {
    "type": "approval",
    "run": "r1",
    "call_id": "c1",
    "block": "b1",
    "tool": "search",
    "epoch": "e",
    "seq": 1,
    "session": "S",
}


def approve_frame(call_id: str, decision: str = "allow") -> dict:
    return {"type": "approve", "run": "r1", "call_id": call_id, "decision": decision}


def decided(call_id: str, seq: int, decision: str = "allow") -> dict:
    """The run's ``decision`` event for ``call_id``."""
    fields = {"call_id": call_id, "seq": seq, "decision": decision, "reason": None, "by": "user"}
    return {**APPROVAL, "type": "decision", **fields}


def not_waiting(call_id: str) -> dict:
    """A frontend's refusal of an approve for ``call_id`` in run r1 (api/sockets.py)."""
    message = "that call is not waiting for an approval"
    return {
        "type": "error",
        "code": "not_waiting",
        "message": message,
        "run": "r1",
        "call_id": call_id,
    }


async def test_an_approval_sent_as_the_frontend_closes_is_sent_again_until_it_is_decided():
    """A frontend stops reading before it closes (a drain's 1012, a link that died): an
    approve written in that moment is never read. The next connection carries it again,
    until the run's ``decision`` for the call shows it counted. Before, it was sent once,
    and the run waited until the timeout denied the call the user had allowed."""
    frontend, received, dropped = drops_its_first_socket(APPROVAL, {"approve": decided("c1", 2)})

    async with following(frontend) as follower:
        seen = []
        async with asyncio.timeout(seconds(5)), aclosing(follower.events()) as stream:
            async for event in stream:
                seen.append(event["type"])
                if event["type"] == "approval":
                    await follower.approve("r1", "c1", "allow")
                    await dropped.wait()
                if event["type"] == "decision":
                    break
    assert seen == ["approval", "decision"]
    assert received[1] == [approve_frame("c1")], received
    assert not follower._approvals  # decided: nothing left to send again


async def test_an_approval_decided_before_the_reconnect_is_not_sent_again():
    """Of two approvals of a run, the first's ``decision`` came before the socket closed:
    the next connection sends only the second, written as the frontend stopped reading.
    That run then ends (cancelled while it waited: no decision), and the connection after
    sends no approval at all."""
    received: list[list[dict]] = []
    second = {**APPROVAL, "call_id": "c2", "block": "b2", "seq": 3}

    async def frontend(ws):
        frames = await greeted(ws, received)
        if len(received) == 1:
            await ws.send(json.dumps(APPROVAL))
            frames.append(json.loads(await ws.recv()))
            await ws.send(json.dumps(decided("c1", 2)))
            await ws.send(json.dumps(second))
            frames.append(json.loads(await ws.recv()))  # never acted on: the frontend closes
            await ws.close(1012, "frontend restarting; reconnect and resume")
            return
        if len(received) == 2:
            frames.append(json.loads(await ws.recv()))
            await ws.send(json.dumps({**APPROVAL, "type": "cancelled", "seq": 4}))
            await ws.close(1012, "frontend restarting; reconnect and resume")
            return
        await ws.send(json.dumps({**APPROVAL, "type": "thinking", "run": "r2", "seq": 5}))
        async for frame in ws:
            frames.append(json.loads(frame))

    async with (
        following(frontend) as follower,
        asyncio.timeout(seconds(5)),
        aclosing(follower.events()) as stream,
    ):
        async for event in stream:
            if event["type"] == "approval":
                decision = "allow" if event["call_id"] == "c1" else "deny"
                await follower.approve("r1", event["call_id"], decision)
            if event["run"] == "r2":
                break
    first, again = approve_frame("c1"), approve_frame("c2", "deny")
    assert received == [[first, again], [again], []], received
    assert not follower._approvals


async def test_the_not_waiting_reply_to_an_approval_sent_again_is_not_an_error():
    """The frontend applied an approve just as it closed, before the run's ``decision``
    went out: the next connection sends it again, the resume brings the decision, and the
    reply to the resend is ``not_waiting``, naming the call. ``on_error`` does not hear
    of it; a ``not_waiting`` for an approval sent once (a stale answer) is still heard."""
    received: list[list[dict]] = []
    heard: list[Refused] = []

    async def frontend(ws):
        frames = await greeted(ws, received)
        if len(received) == 1:
            await ws.send(json.dumps(APPROVAL))
            frames.append(json.loads(await ws.recv()))  # applied; its decision is not sent
            await ws.close(1012, "frontend restarting; reconnect and resume")
            return
        await ws.send(json.dumps(decided("c1", 2)))  # the resume's catch-up
        async for frame in ws:
            frames.append(json.loads(frame))
            await ws.send(json.dumps(not_waiting(frames[-1]["call_id"])))
            if frames[-1]["call_id"] == "c9":
                await ws.send(json.dumps({**APPROVAL, "type": "done", "seq": 3}))

    async with (
        following(frontend, on_error=heard.append) as follower,
        asyncio.timeout(seconds(5)),
        aclosing(follower.events()) as stream,
    ):
        async for event in stream:
            if event["type"] == "approval":
                await follower.approve("r1", "c1", "allow")
            if event["type"] == "decision":
                await follower.approve("r1", "c9", "deny")  # a call that never waited
            if event["type"] == "done":
                break
    assert received[1] == [approve_frame("c1"), approve_frame("c9", "deny")], received
    assert [(r.error, r.action) for r in heard] == [("not_waiting", "approve")]
    assert not follower._approvals


async def test_an_approval_refused_otherwise_is_reported_and_not_sent_again():
    """An approve the frontend refuses for what it is (``bad_message``: a reason too long,
    say), its reply naming it: reported once, and the next connection does not carry it.
    Before, only ``not_waiting`` settled one, so this was sent again on every socket."""
    received: list[list[dict]] = []

    async def frontend(ws):
        frames = await greeted(ws, received)
        if len(received) == 1:
            await ws.send(json.dumps(APPROVAL))
            frames.append(json.loads(await ws.recv()))
            refusal = {**not_waiting("c1"), "code": "bad_message", "message": "too long"}
            await ws.send(json.dumps(refusal))
            await ws.close(1012, "frontend restarting; reconnect and resume")
            return
        await ws.send(json.dumps({**APPROVAL, "type": "done", "seq": 2}))
        async for frame in ws:
            frames.append(json.loads(frame))

    heard: list[Refused] = []
    async with following(frontend) as follower:
        follower.on_error = heard.append
        async with asyncio.timeout(seconds(5)), aclosing(follower.events()) as stream:
            async for event in stream:
                if event["type"] == "approval":
                    await follower.approve("r1", "c1", "allow", "x")
                if event["type"] == "done":
                    break
    assert received[1] == [], received
    assert [(r.error, r.action) for r in heard] == [("bad_message", "approve")]
    assert not follower._approvals


async def test_a_token_handed_to_refresh_is_the_one_the_next_connection_sends():
    """``refresh(token)`` with a string token: after the socket is lost, the reconnect
    signs in with the fresh token, not the first one (which may have expired by then:
    a 4001, final for a string). Before, the reconnect sent the first token again."""
    seen: list[str | None] = []

    async def frontend(ws):
        seen.append(ws.request.headers.get("Authorization"))
        await ws.send(json.dumps({"type": "session", "session": "S"}))
        if len(seen) == 1:
            assert json.loads(await ws.recv()) == {"type": "auth", "token": "fresh"}
            await ws.close(1012, "frontend restarting; reconnect and resume")
        else:
            await ws.send(json.dumps({"type": "done", "run": "r", "epoch": "e", "seq": 1}))
            await ws.wait_closed()

    async with serve(frontend, "127.0.0.1", 0) as server:
        port = server.sockets[0].getsockname()[1]
        states: list[StateChange] = []

        def on_state(change: StateChange) -> None:
            states.append(change)
            if change.state == State.CONNECTED:
                refreshing.append(asyncio.ensure_future(follower.refresh("fresh")))

        refreshing: list[asyncio.Future] = []
        follower = Follower(
            f"ws://127.0.0.1:{port}", "S", after=0, token="first", on_state=on_state, heartbeat=None
        )
        async with asyncio.timeout(seconds(10)), aclosing(follower.events()) as stream:
            async for event in stream:
                assert event["type"] == "done"
                break
        await asyncio.gather(*refreshing)
    assert seen == ["Bearer first", "Bearer fresh"], seen


async def kinds_asked_of(frontend):
    """The types of the events ``ask`` yields, continuing session S, from ``frontend``."""
    async with serve(frontend, "127.0.0.1", 0) as server:
        port = server.sockets[0].getsockname()[1]
        async with asyncio.timeout(seconds(10)):
            return [
                e["type"]
                async for e in ask("again", f"ws://127.0.0.1:{port}", session="S", heartbeat=None)
            ]


async def test_ask_in_a_session_with_runs_skips_its_snapshot_and_yields_its_own_run():
    """``ask`` continuing a session that has runs (``session=S``, no ``after``): the join
    starts with the session's ``snapshot``, which is no run's event; ``ask`` yields its
    own run's events only, not those of a run the snapshot showed going on. Before, the
    snapshot ended ``ask`` in a KeyError."""
    earlier = {"type": "thinking", "run": "r1", "epoch": "e", "seq": 2, "content": "..."}
    state = reduce(initial_state(), earlier)

    async def frontend(ws):
        await ws.send(json.dumps({"type": "session", "session": "S"}))
        await ws.send(json.dumps({"type": "snapshot", "state": state, "seq": 2, "epoch": "e"}))
        prompt = json.loads(await ws.recv())
        await ws.send(json.dumps({**earlier, "seq": 3}))  # the earlier run goes on
        queued = {"type": "queued", "session": "S", "run": "r2", "key": prompt["key"]}
        await ws.send(json.dumps(queued))
        for seq, kind in ((4, "answer"), (5, "done")):
            event = {"type": kind, "run": "r2", "epoch": "e", "seq": seq, "content": "hi"}
            await ws.send(json.dumps(event))
        await ws.wait_closed()

    assert await kinds_asked_of(frontend) == ["answer", "done"]


@pytest.mark.parametrize("lost", ["after the queued reply", "before the queued reply"])
async def test_ask_in_a_joined_empty_session_ends_when_its_run_ended_while_disconnected(lost):
    """``ask`` (and ``chat``) in a session named by the caller that has no events yet: the
    socket is lost before the run's first event, and the run ends before the next one
    opens. The reconnect asks for the log from the start (``after=0``), where the run's
    end is. Before, it asked for no position, got a snapshot, which holds no run's event,
    and ``ask`` waited for ever for an end it had been shown folded away."""
    asked: list[str] = []
    run = [
        {"type": kind, "run": "r1", "epoch": "e", "seq": seq, "content": "hi"}
        for seq, kind in ((1, "thinking"), (2, "answer"), (3, "done"))
    ]
    ended = reduce(reduce(reduce(initial_state(), run[0]), run[1]), run[2])

    async def frontend(ws):
        asked.append(ws.request.path)
        await ws.send(json.dumps({"type": "session", "session": "S"}))
        if len(asked) == 1:  # the first socket: the prompt, maybe its reply, then lost
            prompt = json.loads(await ws.recv())
            if lost == "after the queued reply":
                queued = {"type": "queued", "session": "S", "run": "r1", "key": prompt["key"]}
                await ws.send(json.dumps(queued))
            await ws.close(1012, "restarting")
            return
        if "after=0" in ws.request.path:
            for event in run:
                await ws.send(json.dumps(event))
        else:
            await ws.send(json.dumps({"type": "snapshot", "state": ended, "seq": 3, "epoch": "e"}))
        with contextlib.suppress(ConnectionClosed):
            async for frame in ws:  # a prompt sent again: the key names the run it queued
                key = json.loads(frame)["key"]
                await ws.send(
                    json.dumps({"type": "queued", "session": "S", "run": "r1", "key": key})
                )

    async with serve(frontend, "127.0.0.1", 0) as server:
        port = server.sockets[0].getsockname()[1]
        url = f"ws://127.0.0.1:{port}"
        async with asyncio.timeout(seconds(10)):
            kinds = [e["type"] async for e in ask("hi", url, session="S", heartbeat=None)]
    assert kinds == ["thinking", "answer", "done"], kinds
    assert "after=0" in asked[1], asked


async def test_ask_ends_when_its_whole_run_came_before_the_queued_reply():
    """All of a run's events before the frontend's ``queued`` reply: a fast worker, or a
    prompt sent again after its socket was lost, whose run ended meanwhile and is
    replayed on the resume before the prompt is read. ``ask`` yields the run and ends.
    Before, its events were held until a message after the reply, which never came, and
    ``ask`` waited for ever."""

    async def frontend(ws):
        await ws.send(json.dumps({"type": "session", "session": "S"}))
        prompt = json.loads(await ws.recv())
        for seq, kind in ((1, "answer"), (2, "done")):
            event = {"type": kind, "run": "r1", "epoch": "e", "seq": seq, "content": "hi"}
            await ws.send(json.dumps(event))
        queued = {"type": "queued", "session": "S", "run": "r1", "key": prompt["key"]}
        await ws.send(json.dumps(queued))
        await ws.wait_closed()

    assert await kinds_asked_of(frontend) == ["answer", "done"]


async def test_ask_with_on_error_ends_when_its_prompt_is_refused():
    """``ask(..., on_error=...)``: a refusal of its own prompt (named by its key) ends
    ``ask`` with :class:`Refused`; ``on_error`` hears the other refusals. Before, the
    refusal went to ``on_error`` alone and ``ask`` waited for a run that never came."""

    async def frontend(ws):
        await ws.send(json.dumps({"type": "session", "session": "S"}))
        prompt = json.loads(await ws.recv())
        other = {"type": "error", "code": "not_waiting", "message": "that call is not waiting"}
        await ws.send(json.dumps(other))
        busy = {"type": "error", "code": "busy", "message": "a run is unfinished"}
        await ws.send(json.dumps({**busy, "run": "r0", "key": prompt["key"]}))
        await ws.wait_closed()

    heard: list[Refused] = []
    async with serve(frontend, "127.0.0.1", 0) as server:
        port = server.sockets[0].getsockname()[1]
        with pytest.raises(Refused) as info:
            async with asyncio.timeout(seconds(10)):
                async for _ in ask(
                    "now", f"ws://127.0.0.1:{port}", on_error=heard.append, heartbeat=None
                ):
                    pass
    assert info.value.error == "busy" and info.value.action == "prompt"
    assert [r.error for r in heard] == ["not_waiting"]


async def test_a_gap_while_events_are_held_comes_out_behind_them():
    """Plain data: events of a new run are held until the ``queued`` reply names the
    prompt's run; a ``gap`` that comes meanwhile is held behind them, so what is passed
    on stays in the order it came. Before, the gap went out at once, ahead of lower seqs."""
    from thoughtwire.client import OwnRun

    follower = Follower("ws://h", "S")
    own = OwnRun(follower, await follower.prompt("mine", key="k"))
    early = {"type": "answer", "run": "r2", "epoch": "e", "seq": 5, "content": "a"}
    gap = {"type": "gap", "reason": "trimmed", "after": 5, "epoch": "e", "next": 9}
    later = {"type": "done", "run": "r2", "epoch": "e", "seq": 9}
    assert own.events(early) == [] and own.events(gap) == []
    queued = {"type": "queued", "session": "S", "run": "r2", "key": "k"}
    await follower._was_queued(queued)
    assert own.events(queued) == [early, gap]
    assert own.events(later) == [later]


async def test_a_run_the_snapshot_holds_is_not_taken_for_a_prompts_run():
    """Plain data: a prompt waits for its run; the next event of a run the join's
    snapshot held is not that run, so the prompt is still sent again on a reconnect.
    Before, that event ended the prompt's wait, and a prompt lost in a reconnect was
    not sent again."""
    follower = Follower("ws://h", "S")
    earlier = {"type": "thinking", "run": "r1", "epoch": "e", "seq": 2, "content": "..."}
    state = reduce(initial_state(), earlier)
    key = await follower.prompt("next question")
    follower._advance({"type": "snapshot", "state": state, "seq": 2, "epoch": "e"})
    follower._advance({**earlier, "seq": 3})
    follower._advance({"type": "thinking", "run": "r3", "epoch": "e", "seq": 4})  # another's
    assert len(follower._prompts) == 1
    await follower._was_queued({"type": "queued", "session": "S", "run": "r2", "key": key})
    assert follower._prompts == {} and follower.run_of(key) == "r2"


async def test_a_refused_prompt_is_not_sent_again_on_the_next_connection():
    """A prompt refused with an ``error`` reply (``busy``: multitask ``reject`` while a
    run is unfinished) is heard by ``on_error`` and given up: the next connection does
    not send it again, where it would run after all. Before, it did."""
    received: list[list[dict]] = []

    async def frontend(ws):
        frames = await greeted(ws, received)
        if len(received) == 1:
            frames.append(json.loads(await ws.recv()))
            busy = {"type": "error", "code": "busy", "message": "a run is unfinished"}
            await ws.send(json.dumps(busy))
            await ws.close(1012, "frontend restarting; reconnect and resume")
            return
        await ws.send(json.dumps({"type": "done", "run": "r0", "epoch": "e", "seq": 1}))
        async for frame in ws:
            frames.append(json.loads(frame))

    refusals: list[Refused] = []
    async with (
        following(frontend, on_error=refusals.append) as follower,
        asyncio.timeout(seconds(10)),
        aclosing(follower.events("now", multitask="reject")) as stream,
    ):
        async for event in stream:
            assert event["type"] == "done"
            break
    assert [r.error for r in refusals] == ["busy"]
    assert [f["type"] for f in received[0]] == ["prompt"]
    assert received[1] == [], received


@pytest.fixture(scope="module")
def limited(redis_server, logdir):
    """One frontend taking 3 frames a minute from each user."""
    c = start_cluster(
        redis_server, logdir, frontends=1, JWT_SECRET=SECRET, THOUGHTWIRE_RATE_LIMIT="3"
    )
    yield c
    c.stop()


async def test_a_prompt_over_the_rate_is_named_by_its_key_and_given_up(limited):
    """The frontend's refusal names the prompt's key; the follower gives that prompt up
    (``on_error`` hears of it, as a refused ``prompt``) and sends the others on. Before,
    a rate-limited prompt stayed waiting and ran on the next connection, maybe hours
    later; and an error reply named no frame, so a refusal was pinned on the oldest."""
    import websockets

    tok = token("grace")
    headers = {"Authorization": f"Bearer {tok}"}
    async with websockets.connect(
        limited.frontends[0].ws + "/ws/agent-thoughts", additional_headers=headers
    ) as ws:
        await ws.recv()  # the greeting
        for key in ("k1", "k2", "k3"):  # the socket's opening was the first request
            await ws.send(json.dumps({"type": "prompt", "content": "hi", "key": key}))
        replies = []
        async with asyncio.timeout(seconds(10)):
            while not any(r.get("code") == "rate_limited" for r in replies):
                reply = json.loads(await ws.recv())
                if "seq" not in reply:
                    replies.append(reply)
    print(replies)
    assert [(r["type"], r["key"]) for r in replies] == [
        ("queued", "k1"),
        ("queued", "k2"),
        ("error", "k3"),
    ]

    refusals: list[Refused] = []
    follower = Follower(
        limited.frontends[0].ws, token=token("heidi"), on_error=refusals.append, heartbeat=None
    )
    keys = [await follower.prompt(text) for text in ("one", "two", "over the rate")]

    async def follow() -> None:  # the follower reads its replies while events are taken
        async with aclosing(follower.events()) as stream:
            async for _ in stream:
                pass

    reading = asyncio.create_task(follow())
    try:
        # The refusal may be the last frame of all, after every event: watch for it
        # rather than look only when an event comes.
        async with asyncio.timeout(seconds(10)):
            while not (refusals and not follower._prompts):
                await asyncio.sleep(0.02)
    finally:
        reading.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await reading
    assert [(r.error, r.action) for r in refusals] == [("rate_limited", "prompt")]
    assert follower._prompts == {}, "the refused one is not sent again on the next connection"
    assert follower.run_of(keys[0]) and follower.run_of(keys[1])
    assert follower.run_of(keys[2]) is None


async def test_a_prompt_refused_as_unavailable_is_named_by_its_key_too():
    """Plain data: a prompt the frontend could not take because Redis was briefly away
    (``unavailable``) is named by its key, as every refused prompt is (docs/protocol.md,
    "Error codes"). Before, that reply alone named none: the clients kept the prompt and
    ran it on their next connection, maybe hours later, and the page, which could not put
    it back in the box, told the user to send it again, so it could run twice."""
    from types import SimpleNamespace

    from thoughtwire.api.sockets import SessionSocket

    class Guard:
        async def check_rate(self, principal):
            raise ConnectionError("Redis is away")

    sent: list[str] = []
    socket = SessionSocket.__new__(SessionSocket)
    socket.raw_prompts = False
    socket.principal = None
    socket.frontend = SimpleNamespace(settings=Settings(), guard=Guard())
    socket.conn = SimpleNamespace(send=sent.append)
    await socket._handle_frame(json.dumps({"type": "prompt", "content": "hi", "key": "k1"}))
    await socket._handle_frame(json.dumps({"type": "cancel"}))
    replies = [json.loads(frame) for frame in sent]
    assert [(r["code"], r.get("key")) for r in replies] == [
        ("unavailable", "k1"),
        ("unavailable", None),
    ]


async def test_a_stop_then_a_prompt_while_disconnected_go_out_in_that_order():
    """While no socket is open, a cancel of every run, then a prompt: the next connection
    sends them in that order, so the cancel does not stop the prompt's own run. Before,
    the prompt went first, and the cancel then stopped it."""
    received: list[dict] = []

    async def frontend(ws):
        await ws.send(json.dumps({"type": "session", "session": "S"}))
        for _ in range(2):
            received.append(json.loads(await ws.recv()))
        await ws.send(json.dumps({"type": "done", "run": "r1", "epoch": "e", "seq": 1}))
        await ws.wait_closed()

    async with following(frontend) as follower:
        await follower.cancel()
        await follower.prompt("instead")
        async with asyncio.timeout(seconds(10)), aclosing(follower.events()) as stream:
            async for event in stream:
                assert event["type"] == "done"
                break
    assert [m["type"] for m in received] == ["cancel", "prompt"], received
