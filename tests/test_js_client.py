"""The JavaScript client (clients/js/thoughtwire.js) in a real headless chromium.

Its pages are served by the frontends themselves (`/healthz`, then the module from
`/thoughtwire.js`); the clients speak to real frontends with authentication on.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
from playwright.async_api import Page

from tests.browser import browser_context, client_module_page
from tests.conftest import Cluster, sim_run, start_cluster
from tests.procs import free_port, seconds

pytestmark = pytest.mark.browser

SECRET = "a-js-client-test-secret-of-32-bytes-or-more"
# What the simulated agent yields for one prompt (start_cluster asks for 8 answer tokens).
RUN_SHAPE = sim_run(8)


def token(sub: str = "alice", expires_in: int = 600) -> str:
    now = int(time.time())
    return jwt.encode({"sub": sub, "iat": now, "exp": now + expires_in}, SECRET, algorithm="HS256")


@dataclass
class Tokens:
    """The page's token callback: a fresh token per call, minted as it is asked for.

    The first calls get ``first`` (a token, or the lifetime in seconds of one to mint);
    the others live ten minutes.
    """

    first: list[str | int] = field(default_factory=list)
    issued: list[str] = field(default_factory=list)

    @property
    def calls(self) -> int:
        return len(self.issued)

    def __call__(self) -> str:
        given = self.first.pop(0) if self.first else 600
        self.issued.append(given if isinstance(given, str) else token(expires_in=given))
        return self.issued[-1]


@pytest.fixture(scope="module")
def secure(redis_server, logdir):
    """Two frontends with authentication on, one worker, runs slow enough to cut into."""
    c = start_cluster(
        redis_server,
        logdir,
        JWT_SECRET=SECRET,
        # The test pages come from one frontend and open sockets to the others.
        THOUGHTWIRE_ALLOWED_ORIGINS="*",
        THOUGHTWIRE_SIM_STEP_DELAY="0.3",
        THOUGHTWIRE_SIM_TOKENS_PER_SECOND="20",
    )
    yield c
    c.stop()


@pytest.fixture(scope="module")
def pinging(redis_server, logdir):
    """One frontend and worker, authentication off, pinging a silent client after 1 s
    (the client's watchdog then waits 2.5 s: a busy machine's pause is not a dead link)."""
    c = start_cluster(redis_server, logdir, frontends=1, THOUGHTWIRE_PING_INTERVAL="1")
    yield c
    c.stop()


@contextlib.asynccontextmanager
async def client_page(origin: str, tokens: Tokens | None = None) -> AsyncIterator[Page]:
    """A page of ``origin`` that can import the client; ``freshToken()`` calls ``tokens``."""
    async with browser_context() as context:
        page = await context.new_page()
        if tokens is not None:
            await page.expose_function("freshToken", tokens)
        await page.goto(origin + "/healthz")
        yield page


# Opens a client as window.clients[name], recording everything it dispatches in
# window.logs[name]. Returns the session, or what connect() was rejected with.
OPEN = """async ({name, options, callback}) => {
  const { Thoughtwire } = await import("/thoughtwire.js");
  window.clients ??= {};
  window.logs ??= {};
  const log = window.logs[name] = {
    state: [], event: [], gap: [], message: [], error: [], snapshot: [], presence: [],
  };
  if (callback) options.token = () => window.freshToken();
  const tw = window.clients[name] = new Thoughtwire({backoff: {initial: 50, max: 1000}, ...options});
  for (const kind of Object.keys(log)) tw.addEventListener(kind, (e) => log[kind].push(e.detail));
  try {
    await tw.connect();
    return {session: tw.session};
  } catch (err) {
    return {code: err.code, reason: err.reason};
  }
}"""


async def open_client(
    page: Page, name: str, callback: bool = False, **options: Any
) -> dict[str, Any]:
    result: dict[str, Any] = await page.evaluate(
        OPEN, {"name": name, "options": options, "callback": callback}
    )
    return result


async def log_of(page: Page, name: str) -> dict[str, list[Any]]:
    log: dict[str, list[Any]] = await page.evaluate("(name) => window.logs[name]", name)
    return log


async def wait_for(page: Page, expression: str, name: str, arg: Any = None) -> None:
    """Wait until ``expression`` (JS, over ``log``, ``tw`` and ``arg``) is true."""
    await page.wait_for_function(
        f"([name, arg]) => {{ const log = window.logs[name], tw = window.clients[name]; return {expression}; }}",
        arg=[name, arg],
        timeout=seconds(20) * 1000,
    )


def runs_done(count: int) -> str:
    return f"log.event.filter((e) => e.type === 'done').length >= {count}"


def seqs(events: list[dict[str, Any]]) -> list[int]:
    """The seqs the events cover: a frame merged for a lagging reader (docs/protocol.md,
    "Slow viewers") covers ``from_seq`` to ``seq``."""
    covered: list[int] = []
    for e in events:
        covered.extend(range(e.get("from_seq", e["seq"]), e["seq"] + 1))
    return covered


def states(log: dict[str, list[Any]]) -> list[str]:
    return [s["state"] for s in log["state"]]


async def test_it_prompts_and_gets_a_whole_run_exactly_once(secure: Cluster):
    """A prompt's run arrives whole: seqs 1..N once each, in order, ended by ``done``."""
    a = secure.frontends[0]
    tokens = Tokens()
    async with client_page(a.http, tokens) as page:
        opened = await open_client(page, "alice", callback=True, urls=a.http)
        await page.evaluate("window.clients.alice.prompt('What is streaming?', {key: 'k-1'})")
        await wait_for(page, runs_done(1), "alice")
        log = await log_of(page, "alice")
        position = await page.evaluate("[window.clients.alice.epoch, window.clients.alice.seq]")
    events = log["event"]
    print("events:", len(events), "token callbacks:", tokens.calls)
    assert [e["type"] for e in events] == RUN_SHAPE
    assert seqs(events) == list(range(1, len(RUN_SHAPE) + 1))
    assert {e["session"] for e in events} == {opened["session"]}
    assert position == [events[-1]["epoch"], events[-1]["seq"]]
    assert states(log) == ["connecting", "connected"]
    assert tokens.calls == 1
    assert log["error"] == [] and log["gap"] == []
    assert [m["type"] for m in log["message"]] == ["session", "queued"]
    assert log["message"][1]["run"] == events[0]["run"]  # the prompt's run, named


@pytest.mark.parametrize("how", ["SIGTERM", "SIGKILL"])
async def test_a_frontend_restart_mid_run_loses_and_repeats_nothing(secure: Cluster, how: str):
    """The client's frontend goes (drained, or killed -9) mid-run; it resumes on the next.

    The answer is whole and duplicate-free, and the token callback was called again
    for the new socket.
    """
    doomed = secure.add_frontend()  # its own, so the module's frontends live on
    survivor = secure.frontends[1]
    tokens = Tokens()
    try:
        async with client_page(survivor.http, tokens) as page:
            await open_client(page, "alice", callback=True, urls=[doomed.ws, survivor.ws])
            first_url = await page.evaluate("window.clients.alice.url")
            assert first_url.startswith(doomed.ws)
            await page.evaluate("window.clients.alice.prompt('Tell me about resuming')")
            await wait_for(page, "log.event.length >= 2", "alice")
            if how == "SIGKILL":
                doomed.proc.kill()
            else:
                doomed.proc.signal(signal.SIGTERM)
            before = len((await log_of(page, "alice"))["event"])
            await wait_for(page, runs_done(1), "alice")
            log = await log_of(page, "alice")
            url = await page.evaluate("window.clients.alice.url")
    finally:
        doomed.proc.stop()
    events = log["event"]
    print(f"{how}: {before} events before the restart, {len(events)} in all;", states(log))
    assert before < len(RUN_SHAPE), "the restart did not land mid-run"
    assert [e["type"] for e in events] == RUN_SHAPE
    assert seqs(events) == list(range(1, len(RUN_SHAPE) + 1))
    assert url.startswith(survivor.ws)
    assert states(log)[:2] == ["connecting", "connected"]
    assert "reconnecting" in states(log) and states(log)[-1] == "resumed"
    assert tokens.calls >= 2, "the token callback was not called for the new socket"
    assert log["gap"] == []


@pytest.mark.parametrize("first", ["invalid", "expired"])
async def test_a_4001_gets_one_fresh_token_and_goes_on(secure: Cluster, first: str):
    """Refused at the door (an invalid token) or closed at once (one just expired): 4001.

    With a token callback the client asks it once more and goes on; the run is whole.
    """
    a = secure.frontends[0]
    # Expired five seconds ago: within the server's leeway, so the socket is taken and
    # then closed with 4001 as its token's time runs out.
    tokens = Tokens(first=["not-a-token" if first == "invalid" else -5])
    async with client_page(a.http, tokens) as page:
        opened = await open_client(page, "alice", callback=True, urls=a.ws)
        await wait_for(page, "tw.state === 'connected' || tw.state === 'resumed'", "alice")
        await page.evaluate("window.clients.alice.prompt('Go on')")
        await wait_for(page, runs_done(1), "alice")
        log = await log_of(page, "alice")
    print(first, states(log), [(s.get("code"), s.get("reason")) for s in log["state"]])
    assert "session" in opened
    retries = [s for s in log["state"] if s["state"] == "reconnecting"]
    assert [s["code"] for s in retries] == [4001]
    assert tokens.calls == 2
    assert [e["type"] for e in log["event"]] == RUN_SHAPE
    assert seqs(log["event"]) == list(range(1, len(RUN_SHAPE) + 1))


async def test_refresh_hands_the_socket_a_fresh_token_before_the_old_expires(secure: Cluster):
    """The first token expires within three seconds, before two runs end; ``refresh()`` replaces it.

    Without the refresh the socket is closed with 4001 at that time and the client
    reconnects; with it, two runs later the first socket is still the one in use.
    """
    a = secure.frontends[0]
    tokens = Tokens(first=[3])
    async with client_page(a.http, tokens) as page:
        await open_client(page, "alice", callback=True, urls=a.ws)
        await page.evaluate("window.clients.alice.refresh()")
        for n in (1, 2):
            await page.evaluate("window.clients.alice.prompt('Keep going')")
            await wait_for(page, runs_done(n), "alice")
        log = await log_of(page, "alice")
    expires = jwt.decode(tokens.issued[0], options={"verify_signature": False})["exp"]
    print("states:", log["state"], "token callbacks:", tokens.calls)
    assert time.time() > expires, "the runs ended before the first token expired"
    assert states(log) == ["connecting", "connected"]
    assert tokens.calls == 2
    assert [m["type"] for m in log["message"]] == ["session", "queued", "queued"]
    assert seqs(log["event"]) == list(range(1, 2 * len(RUN_SHAPE) + 1))


async def test_a_callback_whose_tokens_keep_failing_is_asked_once_more_not_forever(
    secure: Cluster,
):
    """Every token the callback gives has just expired: taken, then closed with 4001 at once.

    The client asks the callback once more, then closes (4001) instead of reconnecting
    in a loop.
    """
    a = secure.frontends[0]
    tokens = Tokens(first=[-5] * 5)
    async with client_page(a.http, tokens) as page:
        await open_client(page, "alice", callback=True, urls=a.ws)
        await wait_for(page, "tw.state === 'closed'", "alice")
        log = await log_of(page, "alice")
    print(states(log), "token callbacks:", tokens.calls)
    assert states(log) == ["connecting", "connected", "reconnecting", "resumed", "closed"]
    assert (log["state"][-1]["code"], log["state"][-1]["reason"]) == (4001, "token expired")
    assert tokens.calls == 2


async def test_a_4001_without_a_callback_is_final(secure: Cluster):
    a = secure.frontends[0]
    async with client_page(a.http) as page:
        opened = await open_client(page, "nobody", urls=a.ws, token="not-a-token")
        log = await log_of(page, "nobody")
    assert opened == {"code": 4001, "reason": "invalid token"}
    assert states(log) == ["connecting", "closed"]


async def test_a_viewer_follows_and_its_prompt_is_an_error_event(secure: Cluster):
    """A viewer token reads the session from another frontend; its prompt is refused.

    The refusal (4003) comes as an ``error`` event; the viewer resumes and still sees
    the owner's next run, every event once.
    """
    a, b = secure.frontends[:2]
    owner_token = token("owner")
    async with client_page(a.http) as page:
        opened = await open_client(page, "owner", urls=a.ws, token=owner_token)
        session = opened["session"]
        await page.evaluate("window.clients.owner.prompt('First question')")
        await wait_for(page, runs_done(1), "owner")
        async with httpx.AsyncClient() as http:
            minted = await http.post(
                f"{a.http}/v1/sessions/{session}/viewer-token",
                headers={"Authorization": f"Bearer {owner_token}"},
                timeout=seconds(10),
            )
        minted.raise_for_status()
        viewer = minted.json()["token"]

        await open_client(page, "viewer", urls=b.ws, token=viewer, session=session, after=0)
        await wait_for(page, runs_done(1), "viewer")
        await page.evaluate("window.clients.viewer.prompt('Let me in')")
        await wait_for(page, "log.error.length >= 1 && tw.state === 'resumed'", "viewer")
        await page.evaluate("window.clients.owner.prompt('Second question')")
        await wait_for(page, runs_done(2), "owner")
        await wait_for(page, runs_done(2), "viewer")
        owner, seen = await log_of(page, "owner"), await log_of(page, "viewer")
    print("viewer states:", states(seen), "errors:", seen["error"])
    assert seen["error"] == [
        {"action": "prompt", "code": 4003, "reason": seen["error"][0]["reason"]}
    ]
    assert seqs(seen["event"]) == seqs(owner["event"]) == list(range(1, 2 * len(RUN_SHAPE) + 1))
    assert "closed" not in states(seen)


LONG_RUN_TOKENS = 2000


@pytest.fixture(scope="module")
def long_runs(redis_server, logdir):
    """Two frontends with authentication on, whose runs answer in 2,000 tokens at once."""
    c = start_cluster(
        redis_server,
        logdir,
        JWT_SECRET=SECRET,
        THOUGHTWIRE_ALLOWED_ORIGINS="*",
        THOUGHTWIRE_SIM_ANSWER_TOKENS=str(LONG_RUN_TOKENS),
    )
    yield c
    c.stop()


def answer_of(folded: dict[str, Any], run: str) -> str:
    return "".join(b["text"] for b in folded["runs"][run]["blocks"] if b["kind"] == "text")


async def test_a_late_joiner_of_a_long_run_gets_one_snapshot_and_resumes_after_it(
    long_runs: Cluster,
):
    """A client that joins a session of 2,000 tokens without a position gets one
    ``snapshot`` (the state, not the log) on the other frontend; a dropped socket resumes
    from the snapshot's position; the next run comes once, event by event; presence
    counts both clients; ``replay: "raw"`` gets no snapshot."""
    a, b = long_runs.frontends
    owner_token = token("owner")
    async with client_page(a.http) as page:
        opened = await open_client(page, "owner", urls=a.ws, token=owner_token)
        session = opened["session"]
        await page.evaluate("window.clients.owner.prompt('A long one')")
        await wait_for(page, runs_done(1), "owner")
        log_length = len((await log_of(page, "owner"))["event"])

        await open_client(
            page, "late", urls=b.ws, token=owner_token, session=session, presence=True
        )
        await wait_for(page, "log.snapshot.length === 1", "late")
        await wait_for(page, "log.presence.some((p) => p.sockets === 2)", "late")
        late = await log_of(page, "late")
        folded = await page.evaluate("[window.clients.owner.folded, window.clients.late.folded]")
        position = await page.evaluate("[window.clients.late.epoch, window.clients.late.seq]")
        snapshot = late["snapshot"][0]
        frames = len(late["message"]) + len(late["event"]) + len(late["snapshot"])
        print(f"a log of {log_length} events; the late joiner got {frames} frames")
        assert frames < log_length / 10
        assert late["event"] == [], "nothing past the snapshot yet"
        assert position == [snapshot["epoch"], snapshot["seq"]] and snapshot["seq"] == log_length
        run = folded[0]["order"][0]
        assert answer_of(folded[1], run) == answer_of(folded[0], run)
        assert len(answer_of(folded[1], run)) > LONG_RUN_TOKENS
        assert folded[1]["runs"][run]["status"] == "done"

        # The socket drops: the reconnect resumes from the snapshot's seq, and the next
        # run comes as events, each once.
        await page.evaluate("window.clients.late._ws.close(4000, 'dropped by the test')")
        await wait_for(page, "tw.state === 'resumed'", "late")
        url = await page.evaluate("window.clients.late.url")
        assert f"after={log_length}&epoch={snapshot['epoch']}" in url
        await page.evaluate("window.clients.owner.prompt('Another')")
        await wait_for(page, runs_done(2), "owner")
        await wait_for(page, runs_done(1), "late")
        owner, late = await log_of(page, "owner"), await log_of(page, "late")
        assert seqs(late["event"]) == seqs(owner["event"])[log_length:]
        assert len(late["snapshot"]) == 1 and late["gap"] == []

        await open_client(page, "raw", urls=b.ws, token=owner_token, session=session, replay="raw")
        assert "replay=raw" in await page.evaluate("window.clients.raw.url")
        await page.evaluate("window.clients.owner.prompt('A third')")
        await wait_for(page, runs_done(1), "raw")
        raw = await log_of(page, "raw")
    assert raw["snapshot"] == [] and raw["presence"] == []
    runs = {e["run"] for e in raw["event"]}
    assert len(runs) == 1 and not runs & {e["run"] for e in owner["event"]}, "the new run only"


async def test_a_gap_is_a_gap_event_and_a_resumed_state(secure: Cluster):
    """Resuming from a position of another epoch: a ``gap``, then the log from its start."""
    a = secure.frontends[0]
    alice = token()
    async with client_page(a.http) as page:
        opened = await open_client(page, "writer", urls=a.ws, token=alice)
        await page.evaluate("window.clients.writer.prompt('Something to resume')")
        await wait_for(page, runs_done(1), "writer")
        epoch = await page.evaluate("window.clients.writer.epoch")
        stale = "0000deadbeef"
        await open_client(
            page, "reader", urls=a.ws, token=alice, session=opened["session"], after=3, epoch=stale
        )
        await wait_for(page, runs_done(1), "reader")
        log = await log_of(page, "reader")
    print("states:", log["state"], "gap:", log["gap"])
    [gap] = log["gap"]
    assert (gap["reason"], gap["after"], gap["epoch"], gap["next"]) == ("epoch", 3, epoch, 1)
    assert log["state"] == [
        {"state": "connecting"},
        {"state": "resumed", "gap": None},
        {"state": "resumed", "gap": gap},
    ]
    assert seqs(log["event"]) == list(range(1, len(RUN_SHAPE) + 1))


async def test_after_an_expired_log_the_next_resume_is_not_told_of_the_loss_again(
    secure: Cluster,
):
    """A ``gap`` of reason ``expired`` (the log is gone: its epoch is null) leaves the client
    at the start of no epoch, so its next resume is not told of the same loss again.

    Measured: gaps on the resume after an expired gap, 1 before (the old epoch was kept
    with seq 0, which the frontend cannot confirm), 0 after.
    """
    a = secure.frontends[0]
    alice = token()
    session = f"gone-{time.monotonic_ns()}"
    async with client_page(a.http) as page:
        await open_client(
            page, "first", urls=a.ws, token=alice, session=session, after=3, epoch="0000deadbeef"
        )
        await wait_for(page, "log.gap.length >= 1", "first")
        position = await page.evaluate(
            "({epoch: window.clients.first.epoch, seq: window.clients.first.seq})"
        )
        await open_client(
            page,
            "next",
            urls=a.ws,
            token=alice,
            session=session,
            after=position["seq"],
            epoch=position["epoch"],
        )
        await page.evaluate("window.clients.next.prompt('After the loss')")
        await wait_for(page, runs_done(1), "next")
        first, following = await log_of(page, "first"), await log_of(page, "next")
    print("expired gap:", first["gap"], "position after it:", position)
    print(f"gaps on the next resume: {len(following['gap'])}")
    [gap] = first["gap"]
    assert (gap["reason"], gap["epoch"], gap["next"]) == ("expired", None, 1)
    assert position == {"epoch": None, "seq": 0}
    assert following["gap"] == [], f"{len(following['gap'])} gaps on the next resume"
    assert seqs(following["event"]) == list(range(1, len(RUN_SHAPE) + 1))


# A socket the page controls: frames are pushed to it by the test, so duplicates and
# stale events can be put in front of the client.
FAKE = """async () => {
  const { Thoughtwire } = await import("/thoughtwire.js");
  const sockets = [];
  class FakeSocket {
    constructor(url, protocols) { this.url = url; this.protocols = protocols; this.sent = []; sockets.push(this); }
    send(data) { this.sent.push(JSON.parse(data)); }
    close() {}
    frame(obj) { this.onmessage({data: JSON.stringify(obj)}); }
    drop(code) { this.onclose({code, reason: "test"}); }
  }
  const event = (seq, epoch = "e1") => ({type: "answer", content: String(seq), session: "S", run: "R", seq, epoch, ts: 0});
  const delivered = [];
  const tw = new Thoughtwire({urls: ["ws://one.test", "http://two.test/"], token: "T0", WebSocket: FakeSocket,
                              backoff: {initial: 1, max: 1}});
  tw.addEventListener("event", (e) => delivered.push([e.detail.epoch, e.detail.seq]));
  const opened = tw.connect();
  await new Promise((r) => setTimeout(r, 0));
  sockets[0].frame({type: "session", session: "S"});
  await opened;
  tw.prompt("queued nowhere: the socket is open", {key: "k"});
  sockets[0].frame({type: "queued", session: "S", run: "R", key: "k"});
  for (const seq of [1, 2, 2, 1, 3]) sockets[0].frame(event(seq));
  sockets[0].drop(1012);
  while (sockets.length < 2) await new Promise((r) => setTimeout(r, 5));
  tw.cancel();  // waits for the next socket's greeting
  const waiting = sockets[1].sent.length;
  sockets[1].frame({type: "session", session: "S"});
  for (const seq of [3, 4]) sockets[1].frame(event(seq));
  sockets[1].frame({type: "gap", reason: "epoch", after: 4, epoch: "e2", next: 1});
  for (const seq of [1, 2]) sockets[1].frame(event(seq, "e2"));
  tw.close();
  return {delivered, urls: sockets.map((s) => s.url), protocols: sockets[0].protocols,
          sent: sockets.map((s) => s.sent), waiting};
}"""


async def test_duplicates_are_dropped_and_the_resume_names_the_position(secure: Cluster):
    """Pure client behaviour, on sockets the page controls: no frontend answers them."""
    async with client_page(secure.frontends[0].http) as page:
        result = await page.evaluate(FAKE)
    print(result)
    assert result["delivered"] == [["e1", 1], ["e1", 2], ["e1", 3], ["e1", 4], ["e2", 1], ["e2", 2]]
    assert result["urls"] == [
        "ws://one.test/ws/agent-thoughts?ping=1",
        "ws://two.test/ws/agent-thoughts?session=S&after=3&epoch=e1&ping=1",
    ]
    assert result["protocols"] == ["thoughtwire.v1", "bearer.T0"]
    assert result["sent"] == [
        [{"type": "prompt", "content": "queued nowhere: the socket is open", "key": "k"}],
        [{"type": "cancel"}],
    ]
    assert result["waiting"] == 0, "a cancel was sent before the frontend took the socket"


async def test_it_gives_up_after_max_reconnects(secure: Cluster):
    nowhere = f"ws://127.0.0.1:{free_port()}"
    async with client_page(secure.frontends[0].http) as page:
        opened = await open_client(page, "lost", urls=nowhere, maxReconnects=2)
        log = await log_of(page, "lost")
    print(log["state"])
    assert opened["code"] == 1006 and opened["reason"].startswith("gave up after 2 reconnects")
    assert states(log) == ["connecting", "reconnecting", "reconnecting", "closed"]


async def test_every_frontend_serves_the_client_as_a_cacheable_module(secure: Cluster):
    """``GET /thoughtwire.js`` is the package's file, JavaScript, cacheable, without a token."""
    source = (Path(__file__).parent.parent / "clients" / "js" / "thoughtwire.js").read_bytes()
    async with httpx.AsyncClient(timeout=seconds(10)) as http:
        for frontend in secure.frontends[:2]:
            response = await http.get(frontend.http + "/thoughtwire.js")
            assert response.status_code == 200
            assert response.content == source
            assert response.headers["content-type"].startswith("text/javascript")
            assert "max-age" in response.headers["cache-control"]
            assert response.headers["content-encoding"] == "gzip"  # httpx takes gzip
            again = await http.get(
                frontend.http + "/thoughtwire.js",
                headers={"If-None-Match": response.headers["etag"]},
            )
            assert again.status_code == 304
            plain = await http.get(
                frontend.http + "/thoughtwire.js", headers={"Accept-Encoding": "identity"}
            )
            assert plain.content == source and "content-encoding" not in plain.headers
            assert plain.headers["etag"] != response.headers["etag"]  # another representation


async def test_a_heartbeat_keeps_a_quiet_session_open_past_the_idle_timeout(secure: Cluster):
    """A frontend closes a socket that saw no frame either way for its idle timeout;
    the client's heartbeat keeps a follower of a quiet session open, where one without
    it is closed (1000, final) and would stop following for good."""
    quiet = secure.add_frontend(THOUGHTWIRE_IDLE_TIMEOUT="1.5")
    try:
        async with client_page(quiet.http) as page:
            for name, beat in (("beating", 300), ("silent", 0)):
                opened = await open_client(page, name, urls=quiet.ws, token=token(), heartbeat=beat)
                assert "session" in opened, opened
            # The silent one's close is the sign that the idle timeout has passed.
            await wait_for(page, "tw.state === 'closed'", "silent")
            silent, beating = await log_of(page, "silent"), await log_of(page, "beating")
            state = await page.evaluate("window.clients.beating.state")
    finally:
        quiet.proc.stop()
    assert silent["state"][-1]["code"] == 1000
    assert silent["state"][-1]["reason"] == "idle timeout"
    assert state == "connected" and states(beating) == ["connecting", "connected"]


def conformance_case(words: str) -> dict[str, Any]:
    """The case of clients/conformance/reducer.json whose name has ``words``."""
    path = Path(__file__).resolve().parent.parent / "clients/conformance/reducer.json"
    (case,) = [c for c in json.loads(path.read_text())["cases"] if words in c["name"]]
    return case


# A WebSocket stand-in: it greets with a session, keeps what the client sends, and
# hands the client whatever frames the test gives it.
FAKE_SOCKET = """() => {
  window.sockets = [];
  window.FakeSocket = class {
    constructor(url, protocols) {
      this.url = url;
      this.sent = [];
      window.sockets.push(this);
      setTimeout(() => this.receive({type: "session", session: "S"}), 0);
    }
    receive(frame) { this.onmessage?.({data: JSON.stringify(frame)}); }
    send(data) { this.sent.push(JSON.parse(data)); }
    close() {}
  };
  // A client of session S from its start, reconnecting at once, on these sockets.
  window.resuming = () => new window.tw.Thoughtwire({
    urls: "ws://fake.test", WebSocket: window.FakeSocket, heartbeat: 0,
    session: "S", after: 0, backoff: {initial: 1, max: 1},
  });
  // Resolves once the client has its nth socket and that socket has greeted it.
  window.greeted = (tw, n) => new Promise((resolve) => {
    const check = () => (window.sockets.length >= n && tw._admitted ? resolve() : setTimeout(check, 5));
    check();
  });
}"""


async def test_approve_and_multitask_frames_and_the_folded_state():
    """``approve`` and ``prompt``'s ``multitask`` send the frames docs/protocol.md gives;
    bad values throw; ``folded`` is the reducer's state, up to date in each ``event``."""
    case = conformance_case("to its done")
    async with client_module_page() as page:
        await page.evaluate(FAKE_SOCKET)
        result = await page.evaluate(
            """async (frames) => {
              const tw = new window.tw.Thoughtwire({urls: "ws://fake.test", WebSocket: window.FakeSocket, heartbeat: 0});
              const seen = [];
              tw.addEventListener("event", (e) => seen.push(tw.folded.seq === e.detail.seq));
              await tw.connect();
              tw.prompt("go on", {key: "k1", multitask: "interrupt"});
              tw.prompt("plain");
              tw.approve("r1", "c1", "deny", "no");
              tw.approve("r1", "c2", "allow");
              const thrown = [];
              for (const bad of [() => tw.prompt("x", {multitask: "later"}), () => tw.approve("r1", "c1", "maybe")]) {
                try { bad(); } catch (err) { thrown.push(err.name); }
              }
              for (const frame of frames) window.sockets[0].receive(frame);
              tw.close();
              return {sent: window.sockets[0].sent, thrown, seen, folded: tw.folded};
            }""",
            case["frames"],
        )
    assert result["sent"] == [
        {"type": "prompt", "content": "go on", "key": "k1", "multitask": "interrupt"},
        {"type": "prompt", "content": "plain", "key": result["sent"][1].get("key")},
        {"type": "approve", "run": "r1", "call_id": "c1", "decision": "deny", "reason": "no"},
        {"type": "approve", "run": "r1", "call_id": "c2", "decision": "allow"},
    ]
    assert len(result["sent"][1]["key"]) == 32, "a prompt without a key is given one"
    assert result["thrown"] == ["TypeError", "TypeError"]
    assert result["seen"] == [True] * len(case["frames"])
    assert result["folded"] == case["expected"]


async def test_the_folded_state_of_a_real_run(secure: Cluster):
    """A run through a frontend and a worker folds to one run, done, whose text blocks
    hold the answer the ``answer`` events carried."""
    a = secure.frontends[0]
    async with client_page(a.http) as page:
        await open_client(page, "alice", urls=a.http, token=token())
        await page.evaluate("window.clients.alice.prompt('What is folding?')")
        await wait_for(page, runs_done(1), "alice")
        log = await log_of(page, "alice")
        folded = await page.evaluate("window.clients.alice.folded")
    events = log["event"]
    run = folded["runs"][events[-1]["run"]]
    answer = "".join(e["content"] for e in events if e["type"] == "answer")
    assert folded["order"] == [events[-1]["run"]] and folded["seq"] == events[-1]["seq"]
    assert run["status"] == "done" and all(b["done"] for b in run["blocks"])
    assert "".join(b["text"] for b in run["blocks"] if b["kind"] == "text") == answer
    assert [b["kind"] for b in run["blocks"]].count("tool_result") == 1


async def test_a_frontend_that_greets_then_closes_at_once_is_backed_off_from_not_stormed():
    """Sockets greeted and closed at once with 1013 (a frontend whose event log is
    unreachable): the reconnect delays still double, as after refusals. Before, each
    greeting restarted them at ``initial`` (measured: 50, 50, 50, 50, 50 ms)."""
    async with client_module_page() as page:
        delays = await page.evaluate(
            """async () => {
              Math.random = () => 1; // each delay is its ceiling
              class GreetsThenCloses {
                constructor() {
                  setTimeout(() => {
                    this.onmessage?.({data: JSON.stringify({type: "session", session: "S"})});
                    this.onclose?.({code: 1013, reason: "the event log is unavailable"});
                  }, 0);
                }
                send() {}
                close() {}
              }
              const tw = new window.tw.Thoughtwire({
                urls: "ws://fake.test", WebSocket: GreetsThenCloses, heartbeat: 0,
                session: "S", after: 0, backoff: {initial: 50, max: 10000},
              });
              const delays = [];
              await new Promise((resolve) => {
                tw.addEventListener("state", (e) => {
                  if (e.detail.state !== "reconnecting") return;
                  delays.push(e.detail.delay);
                  if (delays.length === 5) resolve();
                });
                tw.connect();
              });
              tw.close();
              return delays;
            }"""
        )
    assert delays == [50, 100, 200, 400, 800], delays


async def test_a_stop_sent_as_the_frontend_closes_is_sent_again_until_its_run_ends():
    """A frontend stops reading before it closes (a drain's 1012, a slow reader's 4008):
    a cancel written in that moment is never read. The next socket carries that run's
    cancel again; once the run's ``cancelled`` came, the one after does not. Before,
    the Stop was lost and the run went on."""
    async with client_module_page() as page:
        await page.evaluate(FAKE_SOCKET)
        sent = await page.evaluate(
            """async () => {
              const tw = window.resuming();
              const event = {type: "thinking", run: "r1", epoch: "e", seq: 1, session: "S"};
              const greeted = (n) => window.greeted(tw, n);
              await tw.connect();
              window.sockets[0].receive(event);
              tw.cancel("r1"); // written, never read: the frontend closes
              window.sockets[0].onclose({code: 1012, reason: "frontend restarting"});
              await greeted(2);
              window.sockets[1].receive({...event, type: "cancelled", seq: 2});
              window.sockets[1].onclose({code: 1012, reason: "frontend restarting"});
              await greeted(3);
              tw.close();
              return window.sockets.map((s) => s.sent);
            }"""
        )
    cancel = {"type": "cancel", "run": "r1"}
    assert sent == [[cancel], [cancel], []], sent


async def test_a_prompt_sent_as_the_frontend_closes_is_sent_again_until_it_is_queued():
    """A prompt written as its frontend stopped reading is sent again, with the same key,
    on the next socket; once the frontend's ``queued`` reply named its run, the socket
    after does not carry it, nor a prompt refused as ``busy``. Another writer's new run
    is not taken for it: that prompt is still sent. Before, a lost prompt never ran, and
    later the first new run of the session, anyone's, counted as the prompt's."""
    async with client_module_page() as page:
        await page.evaluate(FAKE_SOCKET)
        sent = await page.evaluate(
            """async () => {
              const tw = window.resuming();
              const greeted = (n) => window.greeted(tw, n);
              await tw.connect();
              const key = tw.prompt("hello"); // written, never read: the frontend closes
              window.sockets[0].onclose({code: 1012, reason: "frontend restarting"});
              await greeted(2);
              window.sockets[1].receive({type: "thinking", run: "other", epoch: "e", seq: 1, session: "S"});
              window.sockets[1].onclose({code: 1012, reason: "frontend restarting"});
              await greeted(3);
              window.sockets[2].receive({type: "queued", run: "r1", key, session: "S"});
              const run = tw.runOf(key);
              tw.prompt("and then", {multitask: "reject"});
              window.sockets[2].receive({type: "error", code: "busy", message: "a run is unfinished"});
              window.sockets[2].onclose({code: 1012, reason: "frontend restarting"});
              await greeted(4);
              tw.close();
              return {sent: window.sockets.map((s) => s.sent), run};
            }"""
        )
    assert sent.pop("run") == "r1"
    [[first], [again], [still, refused], after] = sent["sent"]
    assert still == first, "another writer's run is not this prompt's"
    assert first == again and first["content"] == "hello" and len(first["key"]) == 32
    assert refused["content"] == "and then"
    assert after == [], "a run started, or the prompt was refused: neither is sent again"


# An approval of run r1 waiting on its call c1, and the run's frames about it.
APPROVAL_JS = """
  const approval = {type: "approval", run: "r1", call_id: "c1", block: "b1", tool: "search",
                    epoch: "e", seq: 1, session: "S"};
  const decided = (callId, seq) => ({...approval, type: "decision", call_id: callId, seq,
                                     decision: "allow", reason: null, by: "user"});
  const notWaiting = (callId) => ({type: "error", code: "not_waiting", run: "r1", call_id: callId,
                                   message: "that call is not waiting for an approval"});
"""


def approve_frame(call_id: str, decision: str = "allow") -> dict[str, str]:
    return {"type": "approve", "run": "r1", "call_id": call_id, "decision": decision}


async def with_approvals(body: str) -> Any:
    """What ``body`` returns, run in a page with the client on fake sockets, the approval
    frames (APPROVAL_JS), ``tw`` (a resuming client, connected) and ``greeted(n)``; the
    client is closed after it."""
    async with client_module_page() as page:
        await page.evaluate(FAKE_SOCKET)
        return await page.evaluate(
            "async () => {"
            + APPROVAL_JS
            + """
              const tw = window.resuming();
              const greeted = (n) => window.greeted(tw, n);
              await tw.connect();
              try {"""
            + body
            + "} finally { tw.close(); } }"
        )


async def test_an_approval_sent_as_the_frontend_closes_is_sent_again_until_it_is_decided():
    """An approve written as its frontend stopped reading (a drain's 1012, a link that
    died) is sent again on the next socket; once the run's ``decision`` for the call came,
    the socket after does not carry it. Before, it was sent once, and the run waited
    until the timeout denied the call the user had allowed."""
    sent = await with_approvals(
        """
          window.sockets[0].receive(approval);
          tw.approve("r1", "c1", "allow"); // written, never read: the frontend closes
          window.sockets[0].onclose({code: 1012, reason: "frontend restarting"});
          await greeted(2);
          window.sockets[1].receive(decided("c1", 2));
          window.sockets[1].onclose({code: 1012, reason: "frontend restarting"});
          await greeted(3);
          return window.sockets.map((s) => s.sent);
"""
    )
    assert sent == [[approve_frame("c1")], [approve_frame("c1")], []], sent


async def test_an_approval_decided_before_the_reconnect_is_not_sent_again():
    """Of two approvals of a run, the first's ``decision`` came before the socket closed:
    the next socket carries only the second. That run then ends (cancelled while it
    waited: no decision), and the socket after carries no approval at all."""
    sent = await with_approvals(
        """
          window.sockets[0].receive(approval);
          tw.approve("r1", "c1", "allow");
          window.sockets[0].receive(decided("c1", 2));
          window.sockets[0].receive({...approval, call_id: "c2", block: "b2", seq: 3});
          tw.approve("r1", "c2", "deny"); // written, never read: the frontend closes
          window.sockets[0].onclose({code: 1012, reason: "frontend restarting"});
          await greeted(2);
          window.sockets[1].receive({...approval, type: "cancelled", seq: 4});
          window.sockets[1].onclose({code: 1012, reason: "frontend restarting"});
          await greeted(3);
          return window.sockets.map((s) => s.sent);
"""
    )
    first, again = approve_frame("c1"), approve_frame("c2", "deny")
    assert sent == [[first, again], [again], []], sent


async def test_the_not_waiting_reply_to_an_approval_sent_again_is_not_an_error():
    """The frontend applied an approve just as it closed, before the run's ``decision``
    went out: the next socket sends it again, the resume brings the decision, and the
    reply to the resend is ``not_waiting``, naming the call. The application does not
    hear of it, and it is not sent again; a ``not_waiting`` for an approval sent once (a
    stale answer) is still a ``message``."""
    result = await with_approvals(
        """
          const heard = [];
          tw.addEventListener("message", (e) => { if (e.detail.type === "error") heard.push(e.detail); });
          tw.addEventListener("error", (e) => heard.push(e.detail));
          window.sockets[0].receive(approval);
          tw.approve("r1", "c1", "allow"); // applied; the frontend closes before its decision
          window.sockets[0].onclose({code: 1012, reason: "frontend restarting"});
          await greeted(2);
          window.sockets[1].receive(decided("c1", 2)); // the resume's catch-up
          window.sockets[1].receive(notWaiting("c1")); // the reply to the resend
          tw.approve("r1", "c9", "deny"); // a call that never waited
          window.sockets[1].receive(notWaiting("c9"));
          window.sockets[1].onclose({code: 1012, reason: "frontend restarting"});
          await greeted(3);
          return {sent: window.sockets.map((s) => s.sent), heard};"""
    )
    c1, c9 = approve_frame("c1"), approve_frame("c9", "deny")
    assert result["sent"] == [[c1], [c1, c9], []], result["sent"]
    assert [(h["code"], h.get("call_id")) for h in result["heard"]] == [("not_waiting", "c9")]


async def test_an_approval_refused_otherwise_is_a_message_and_not_sent_again():
    """An approve refused for what it is (``bad_message``, its reply naming it): one
    ``message``, and the next socket does not carry it. Before, only ``not_waiting``
    settled one, so this was sent again on every socket."""
    result = await with_approvals(
        """
          const heard = [];
          tw.addEventListener("message", (e) => { if (e.detail.type === "error") heard.push(e.detail); });
          window.sockets[0].receive(approval);
          tw.approve("r1", "c1", "allow", "x");
          window.sockets[0].receive({...notWaiting("c1"), code: "bad_message"});
          window.sockets[0].onclose({code: 1012, reason: "frontend restarting"});
          await greeted(2);
          return {sent: window.sockets.map((s) => s.sent), heard};"""
    )
    first = {**approve_frame("c1"), "reason": "x"}
    assert result["sent"] == [[first], []], result["sent"]
    assert [(h["code"], h.get("call_id")) for h in result["heard"]] == [("bad_message", "c1")]


async def test_a_link_gone_silent_past_its_ping_interval_is_dropped_and_resumed():
    """A link that dies without a close (a laptop asleep, a NAT that forgot it) gave the
    page no sign for minutes, until TCP gave up. The client asks for pings (``ping=1``);
    the greeting says how often they come, and after 2.5 intervals with no frame the
    client drops the socket and resumes from its position on the next one. A frame in
    time keeps the socket."""
    async with client_module_page() as page:
        await page.evaluate(FAKE_SOCKET)
        result = await page.evaluate(
            """async () => {
              window.FakeSocket = class extends window.FakeSocket {
                constructor(url, protocols) { super(url, protocols); this.closed = null; }
                close(code, reason) { this.closed = [code, reason]; }
              };
              const tw = new window.tw.Thoughtwire({urls: "ws://fake.test", WebSocket: window.FakeSocket,
                                                   heartbeat: 0, backoff: {initial: 1, max: 1}});
              const states = [];
              tw.addEventListener("state", (e) => states.push([e.detail.state, e.detail.reason ?? null]));
              await tw.connect();
              const first = window.sockets[0];
              first.receive({type: "session", session: "S", ping: 0.2});  // silence: 500 ms
              first.receive({type: "answer", run: "r", epoch: "e", seq: 1, session: "S"});
              for (let i = 0; i < 4; i++) {  // a frame every 200 ms keeps it
                await new Promise((r) => setTimeout(r, 200));
                first.receive({type: "ping"});
              }
              const keptFor = window.sockets.length;
              const sleep = Date.now();
              while (window.sockets.length < 2 && Date.now() - sleep < 5000) {
                await new Promise((r) => setTimeout(r, 20));
              }
              const waited = Date.now() - sleep;
              tw.close();
              return {keptFor, waited, urls: window.sockets.map((s) => s.url), closed: first.closed, states};
            }"""
        )
    print(result)
    assert result["keptFor"] == 1, "frames in time keep the socket"
    assert 400 <= result["waited"] < 1500
    assert result["closed"] == [4000, "no frame from the frontend"]
    assert result["urls"][0] == "ws://fake.test/ws/agent-thoughts?ping=1"
    assert result["urls"][1] == "ws://fake.test/ws/agent-thoughts?session=S&after=1&epoch=e&ping=1"
    assert ["reconnecting", "no frame from the frontend in 0.5 s"] in result["states"]


async def test_a_socket_that_asks_for_pings_is_pinged_and_told_how_often(pinging: Cluster):
    """``?ping=1`` on ``/ws/agent-thoughts``: the greeting carries ``ping`` (the
    frontend's interval) and a silent client gets ``ping`` frames; without it, neither
    (what the seed's clients see is unchanged)."""
    import websockets

    url = pinging.frontends[0].ws + "/ws/agent-thoughts"
    async with websockets.connect(url + "?ping=1") as ws:
        greeting = json.loads(await ws.recv())
        assert greeting["type"] == "session" and greeting["ping"] == 1.0
        async with asyncio.timeout(seconds(8)):
            assert json.loads(await ws.recv()) == {"type": "ping"}
            await ws.send(json.dumps({"type": "pong"}))
            assert json.loads(await ws.recv()) == {"type": "ping"}
    async with websockets.connect(url) as ws:
        assert set(json.loads(await ws.recv())) == {"type", "session"}
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(2):  # two intervals
                await ws.recv()


async def test_a_quiet_session_whose_client_beats_more_often_than_pings_is_kept(
    pinging: Cluster,
):
    """The frontend pinged only a client it had not heard from for an interval, so a
    client whose heartbeat came more often (or a frontend whose interval was longer than
    the heartbeat, 240 s by default) got no frame at all on a quiet session, and its
    watchdog dropped a healthy socket every 2.5 intervals. Pings come whenever the client
    has been sent nothing for an interval too."""
    async with client_page(pinging.frontends[0].http) as page:
        opened = await open_client(page, "beating", urls=pinging.frontends[0].ws, heartbeat=100)
        assert "session" in opened, opened
        await wait_for(
            page,
            "log.message.filter((m) => m.type === 'ping').length >= 4"
            " || log.state.some((s) => s.state === 'reconnecting')",
            "beating",
        )
        log = await log_of(page, "beating")
        await page.evaluate("window.clients.beating.close()")
    assert states(log) == ["connecting", "connected"]


async def test_pings_cost_a_user_none_of_the_rate_for_prompts(secure: Cluster):
    """Every socket asks for pings, and the client answered each with a ``pong``, which
    counts against the user's THOUGHTWIRE_RATE_LIMIT as every frame does: on a frontend
    that pinged every second, a user with two quiet tabs had the prompts refused as over
    the rate. The frontend needs no answer (a ping is there to be heard), so none is sent."""
    pinged = secure.add_frontend(THOUGHTWIRE_PING_INTERVAL="0.4", THOUGHTWIRE_RATE_LIMIT="10")
    try:
        async with client_page(pinged.http) as page:
            opened = await open_client(page, "quiet", urls=pinged.ws, token=token("pinged"))
            assert "session" in opened, opened
            await wait_for(
                page, "log.message.filter((m) => m.type === 'ping').length >= 15", "quiet"
            )
            key = await page.evaluate("window.clients.quiet.prompt('still mine to send')")
            await wait_for(
                page, "log.message.some((m) => m.key === arg && m.type !== 'prompt')", "quiet", key
            )
            log = await log_of(page, "quiet")
            await page.evaluate("window.clients.quiet.close()")
    finally:
        pinged.proc.stop()
    (answer,) = [m for m in log["message"] if m.get("key") == key]
    assert answer["type"] == "queued", answer


async def test_a_refusal_naming_a_prompts_key_gives_up_that_prompt_only():
    """Two prompts wait; the frontend refuses the second (over the rate), naming its key:
    the next socket sends the first again and not the second. Before, a ``rate_limited``
    prompt was sent again on every later socket, and a refusal was pinned on the oldest."""
    async with client_module_page() as page:
        await page.evaluate(FAKE_SOCKET)
        sent = await page.evaluate(
            """async () => {
              const tw = window.resuming();
              await tw.connect();
              tw.prompt("first", {key: "k1"});
              tw.prompt("second", {key: "k2"});
              window.sockets[0].receive({type: "error", code: "rate_limited", message: "slow down", key: "k2"});
              window.sockets[0].onclose({code: 1012, reason: "frontend restarting"});
              await window.greeted(tw, 2);
              tw.close();
              return window.sockets.map((s) => s.sent.map((f) => f.key));
            }"""
        )
    assert sent == [["k1", "k2"], ["k1"]]


async def test_a_stop_then_a_prompt_while_disconnected_go_out_in_that_order():
    """Before the first socket is taken, a cancel of every run, then a prompt: they go out
    in that order, so the cancel does not stop the prompt's own run."""
    async with client_module_page() as page:
        await page.evaluate(FAKE_SOCKET)
        sent = await page.evaluate(
            """async () => {
              const tw = new window.tw.Thoughtwire({urls: "ws://fake.test", WebSocket: window.FakeSocket, heartbeat: 0});
              tw.cancel();
              tw.prompt("instead", {key: "k"});
              await tw.connect();
              tw.close();
              return window.sockets[0].sent;
            }"""
        )
    assert sent == [{"type": "cancel"}, {"type": "prompt", "content": "instead", "key": "k"}]
