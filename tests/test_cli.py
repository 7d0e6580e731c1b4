"""The ``thoughtwire`` command: its failures, chat through a kill -9, Ctrl-C, help and tokens.

Every expected failure is run as a real process; its stderr must be one line, with
no traceback, and its exit code the one ``--help`` lists for it.
"""

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time

import httpx
import jwt
import pytest
from websockets.asyncio.server import serve

from tests.conftest import start_cluster
from tests.procs import free_port, seconds, wait_until
from thoughtwire.api.auth import Authenticator
from thoughtwire.cli import Exit, environment_variables
from thoughtwire.shared.settings import Settings

SECRET = "a-cli-test-secret-that-is-at-least-32-bytes"


def token(sub="alice", ttl=600):
    now = int(time.time())
    return jwt.encode({"sub": sub, "iat": now, "exp": now + ttl}, SECRET, algorithm="HS256")


@pytest.fixture(scope="module")
def secure(redis_server, logdir):
    """Two frontends and a worker with authentication on; runs of about 3 s."""
    c = start_cluster(
        redis_server,
        logdir,
        JWT_SECRET=SECRET,
        THOUGHTWIRE_SIM_ANSWER_TOKENS="60",
        THOUGHTWIRE_SIM_TOKENS_PER_SECOND="20",
    )
    yield c
    c.stop()


def command(*args, env=None, timeout=30):
    """Run ``thoughtwire ARGS`` to its end; environment: this one without Redis or JWT settings."""
    base = {
        k: v for k, v in os.environ.items() if not k.startswith(("THOUGHTWIRE_", "JWT_", "REDIS"))
    }
    return subprocess.run(
        [sys.executable, "-m", "thoughtwire", *args],
        env={**base, "PYTHONUNBUFFERED": "1", **(env or {})},
        capture_output=True,
        text=True,
        timeout=seconds(timeout),
        stdin=subprocess.DEVNULL,
    )


def assert_one_line(result, code, *words):
    """Exit ``code``; stderr is one line, no traceback, and says ``words``."""
    lines = result.stderr.strip().splitlines()
    assert result.returncode == code, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr
    assert len(lines) == 1, result.stderr
    for word in words:
        assert word in lines[0], lines[0]
    print(f"exit {result.returncode}: {lines[0]}")


# --- failures, one line each ----------------------------------------------------


def test_a_misspelt_setting_is_named_at_start_with_the_one_it_may_mean():
    """A ``THOUGHTWIRE_`` variable that is no setting was ignored without a word, its
    setting left at the default; now each command names it, once, and goes on."""
    result = command(
        "token",
        "--sub",
        "ann",
        env={"JWT_SECRET": "s" * 32, "THOUGHTWIRE_MAX_SOCKET_PER_USER": "3", "THOUGHTWIRE_X": "1"},
    )
    assert result.returncode == Exit.OK and result.stdout.count(".") == 2  # still a token
    assert result.stderr.splitlines() == [
        "thoughtwire token: THOUGHTWIRE_MAX_SOCKET_PER_USER is not a setting and is ignored; "
        "did you mean THOUGHTWIRE_MAX_SOCKETS_PER_USER?",
        "thoughtwire token: THOUGHTWIRE_X is not a setting and is ignored",
    ]


def test_no_token_is_one_line_and_exit_3(secure):
    result = command("chat", "hi", "--url", secure.frontends[0].ws)
    assert_one_line(result, Exit.UNAUTHORIZED, "not authenticated (missing token)", "--token")


def test_a_bad_token_is_one_line_and_exit_3(secure):
    result = command("chat", "hi", "--url", secure.frontends[0].ws, "--token", "nonsense")
    assert_one_line(result, Exit.UNAUTHORIZED, "invalid token")


def test_a_viewer_token_that_prompts_is_one_line_and_exit_4(secure):
    viewer = Authenticator(Settings(jwt_secret=SECRET)).viewer_token("alice", "some-session")[0]
    url = secure.frontends[0].ws
    result = command("chat", "hi", "--url", url, "--session", "some-session", "--token", viewer)
    assert_one_line(result, Exit.FORBIDDEN, "forbidden", "--follow")


def test_an_unreachable_frontend_fails_within_the_timeout_with_exit_5():
    """A port nobody listens on, --timeout 2: one line after about 2 s. It took 72 s of
    silence, then a traceback, before. The bound leaves room for a slow process start on
    a loaded machine; it only has to tell 2 s from 72."""
    began = time.monotonic()
    result = command("chat", "hi", "--url", f"ws://127.0.0.1:{free_port()}", "--timeout", "2")
    elapsed = time.monotonic() - began
    assert_one_line(result, Exit.UNREACHABLE, "no frontend answered", "within 2 s")
    print(f"gave up after {elapsed:.2f} s (process start included)")
    assert elapsed < 30, f"gave up after {elapsed:.2f} s"


async def test_a_socket_that_never_greets_fails_within_the_timeout_with_exit_5():
    """A --url whose socket opens but never says which session it serves (the seed's
    ``/ws/agent``, say): one line within the timeout. Before, ``chat`` waited in silence
    for ever, its prompt never sent, whatever ``--timeout`` said."""
    opened = 0

    async def silent(ws):
        nonlocal opened
        opened += 1
        await ws.wait_closed()

    async with serve(silent, "127.0.0.1", 0) as server:
        port = server.sockets[0].getsockname()[1]
        chat = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "thoughtwire", "chat", "hi",
            "--url", f"ws://127.0.0.1:{port}/ws/agent", "--timeout", "2",
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )  # fmt: skip
        try:
            async with asyncio.timeout(seconds(60)):  # "within the timeout" on a loaded machine
                out, err = await chat.communicate()
        finally:
            if chat.returncode is None:
                chat.kill()
                await chat.wait()
    result = subprocess.CompletedProcess([], chat.returncode, out.decode(), err.decode())
    assert_one_line(result, Exit.UNREACHABLE, "no frontend answered", "no session greeting")
    assert opened >= 1


@pytest.mark.parametrize("url", ["ws://[::1", "ws://127.0.0.1:99999", "ftp://127.0.0.1:1"])
def test_a_url_that_is_no_frontend_url_is_one_line_at_once(url):
    """A --url no connection can be made to (an unclosed IPv6 bracket, a port past
    65535, a scheme other than ws, wss, http or https): a usage error at once. The
    first two ended in a traceback before, the third after --timeout as unreachable. The
    timeout is long so that "at once" is told from "after it" however slowly the process
    starts."""
    began = time.monotonic()
    result = command("chat", "hi", "--url", url, "--timeout", "120", timeout=150)
    assert_one_line(result, Exit.USAGE, "--url")
    assert time.monotonic() - began < 60


def _chat_of(*argv):
    """A ``chat`` command fed frames by hand, its prompt's key ``k``: what it printed, and
    ``feed(frames)``, the exit codes its events gave (None: going on)."""
    import io

    from thoughtwire.cli import Chat, parser

    args = parser().parse_args(["chat", *argv, "--url", "ws://h:1"])
    from thoughtwire.client import OwnRun

    chat = Chat(args, out=io.StringIO())
    chat.own = OwnRun(chat.follower, "k")

    def feed(frames):
        ends = []
        for frame in frames:
            if frame["type"] == "queued":
                asyncio.run(chat.follower._was_queued(frame))
                continue
            assert chat.follower._advance(frame)
            shown = [chat._show(event) for event in chat.own.events(frame)]
            ends.append(next((end for end in shown if end is not None), None))
        return ends

    return chat, feed


def test_chat_in_a_session_with_a_run_going_shows_its_own_run_not_that_one():
    """Plain data: ``chat --session S`` joins with the session's snapshot, which holds an
    earlier run still going; that run's next event is not this prompt's run, and does not
    end the command. Before, chat printed the earlier run and exited at its end."""
    from thoughtwire.shared.reducer import initial_state, reduce

    chat, feed = _chat_of("again", "--session", "S")
    earlier = {"type": "answer", "run": "r1", "epoch": "e", "seq": 1, "content": "old"}
    snapshot = {
        "type": "snapshot",
        "state": reduce(initial_state(), earlier),
        "seq": 1,
        "epoch": "e",
    }
    ends = feed(
        [
            snapshot,
            {**earlier, "type": "done", "seq": 2},
            {"type": "queued", "session": "S", "run": "r2", "key": "k"},
            {"type": "answer", "run": "r2", "epoch": "e", "seq": 3, "content": "new"},
            {"type": "done", "run": "r2", "epoch": "e", "seq": 4},
        ]
    )
    assert ends == [None, None, None, Exit.OK]
    assert chat.own.run == "r2"
    assert "old" not in chat.out.getvalue() and "new" in chat.out.getvalue()


def test_chat_shows_the_run_its_frontend_named_not_another_writers_newer_run():
    """Plain data: another tab's prompt starts a run in the session first; chat waits for
    the ``queued`` reply naming its own, holds what came before it, and shows only its run.
    Before, it took the first new run for its own and exited at that run's end."""
    chat, feed = _chat_of("mine", "--session", "S", "--json")
    other = {"type": "answer", "run": "theirs", "epoch": "e", "content": "not mine"}
    ends = feed(
        [
            {**other, "seq": 1},
            {"type": "answer", "run": "r2", "epoch": "e", "seq": 2, "content": "early"},
            {**other, "type": "done", "seq": 3},
            {"type": "queued", "session": "S", "run": "r2", "key": "k"},
            {**other, "seq": 4, "run": "theirs-too"},
            {"type": "done", "run": "r2", "epoch": "e", "seq": 5},
        ]
    )
    assert ends == [None, None, None, None, Exit.OK]
    shown = [json.loads(line) for line in chat.out.getvalue().splitlines()]
    assert [(e["run"], e["seq"]) for e in shown] == [("r2", 2), ("r2", 5)]


def test_a_prompt_cancelled_before_it_is_queued_cancels_only_its_own_run_once_it_is():
    """Plain data: Ctrl-C before the frontend named the prompt's run sent the cancel of
    every run in the session, other writers' too. Now the prompt is not sent again, and its
    run alone is cancelled once the ``queued`` reply names it."""
    from thoughtwire.client import Follower

    sent = []

    class Socket:
        state = None

        async def send(self, frame):
            sent.append(json.loads(frame))

    async def go():
        follower = Follower("ws://h:1", "S")
        key = await follower.prompt("hi")  # no socket yet: held for the next
        await follower.cancel(key=key)
        assert follower._prompts == {} and follower._outbox == []
        from websockets.protocol import State

        Socket.state = State.OPEN
        follower._ws = Socket()
        await follower._was_queued({"type": "queued", "session": "S", "run": "r9", "key": key})
        return follower

    follower = asyncio.run(go())
    assert sent == [{"type": "cancel", "run": "r9"}]
    assert follower.run_of(next(iter(follower._queued))) == "r9"


@pytest.mark.parametrize("timeout", ["0", "nan", "inf"])
def test_a_timeout_that_never_ends_is_one_line_and_exit_2(timeout):
    """NaN and infinity waited for an unreachable frontend for ever."""
    result = command("chat", "hi", "--url", f"ws://127.0.0.1:{free_port()}", "--timeout", timeout)
    assert_one_line(result, Exit.USAGE, "--timeout")


def test_the_default_timeout_is_10_seconds():
    result = command("chat", "--help")
    assert "--timeout TIMEOUT" in result.stdout and "(default: 10.0)" in result.stdout


@pytest.mark.parametrize("args", [["api", "--insecure", "--port", "0"], ["worker"], ["up"]])
def test_redis_unreachable_at_start_is_one_line_and_exit_6(args):
    """A password in REDIS_URL is never printed; the address is."""
    port = free_port()
    url = f"redis://:hunter2-password@127.0.0.1:{port}/0"
    result = command(*args, env={"REDIS_URL": url}, timeout=30)
    assert_one_line(result, Exit.REDIS_UNREACHABLE, f"Redis at redis://127.0.0.1:{port}/0")
    assert "hunter2" not in result.stderr + result.stdout


@pytest.mark.parametrize(
    "url", ["http://127.0.0.1:6379", "redis://127.0.0.1:notaport/0", "redis:///0", "localhost"]
)
@pytest.mark.parametrize("args", [["api", "--insecure"], ["worker"], ["up"]])
def test_a_malformed_redis_url_is_one_line_and_exit_7(args, url):
    result = command(*args, env={"REDIS_URL": url})
    assert_one_line(result, Exit.BAD_REDIS_URL, "REDIS_URL cannot be used")


@pytest.mark.parametrize("args", [["api", "--insecure", "--host", "127.0.0.1"], ["up"]])
def test_a_busy_port_is_one_line_and_exit_8_before_any_worker_starts(args, redis_server):
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        result = command(*args, "--port", str(port), env={"REDIS_URL": redis_server.url})
    assert_one_line(result, Exit.PORT_BUSY, f"127.0.0.1:{port}", "--port")
    assert "workers" not in result.stdout and "claiming jobs" not in result.stderr


def test_a_workers_busy_metrics_port_is_one_line_and_exit_8(redis_server):
    """The port serves the worker's probes: a worker without them ran on, logging one
    error, until its orchestrator's probes failed and it was restarted, again and again."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        env = {"REDIS_URL": redis_server.url, "THOUGHTWIRE_METRICS_PORT": str(port)}
        result = command("worker", env=env)
    assert_one_line(result, Exit.PORT_BUSY, f":{port}", "THOUGHTWIRE_METRICS_PORT")
    assert "claiming jobs" not in result.stderr


def test_a_bad_setting_is_one_line_and_exit_2():
    result = command("worker", env={"REDIS_URL": "redis://x", "THOUGHTWIRE_AGENT": "nope"})
    assert_one_line(result, Exit.USAGE, "THOUGHTWIRE_AGENT")


@pytest.mark.parametrize("args", [["api", "--insecure", "--port", "0"], ["worker"], ["up"]])
@pytest.mark.parametrize(
    ("variable", "value"),
    [("THOUGHTWIRE_LEASE_SECONDS", "nan"), ("THOUGHTWIRE_LOG_TTL", "-1")],
)
def test_a_number_out_of_range_is_one_line_and_exit_2(args, variable, value):
    """Not a traceback from a timer at start, nor a log that expires as it is written."""
    result = command(*args, env={"REDIS_URL": "redis://x", variable: value})
    assert_one_line(result, Exit.USAGE, variable)


@pytest.mark.parametrize(
    ("args", "word"),
    [
        (["up", "--port", "99999"], "--port"),  # getaddrinfo wraps it: 99999 listened on 34463
        (["api", "--insecure", "--port", "-1"], "--port"),
        (["up", "--workers", "-1"], "--workers"),
        (["token", "--sub", "a", "--ttl", "-60"], "--ttl"),  # printed a token dead already
        (["token", "--sub", "a", "--ttl", "99999999999999999999"], "--ttl"),  # one for ever
    ],
)
def test_a_port_or_worker_count_out_of_range_is_one_line_and_exit_2(args, word):
    env = {"REDIS_URL": "redis://x", "JWT_SECRET": SECRET}
    result = command(*args, env=env, timeout=10)
    assert_one_line(result, Exit.USAGE, word)


@pytest.mark.parametrize(
    "args", [["api", "--insecure", "--port", "0"], ["worker"], ["up", "--port", "0"]]
)
def test_a_trace_file_that_cannot_be_opened_is_one_line_and_exit_2(args, redis_server, tmp_path):
    pytest.importorskip("opentelemetry.sdk", reason="tracing needs the otel extra")
    env = {
        "REDIS_URL": redis_server.url,
        "THOUGHTWIRE_TRACING": "1",
        "THOUGHTWIRE_TRACE_FILE": str(tmp_path / "missing" / "spans.jsonl"),
    }
    result = command(*args, env=env, timeout=15)
    assert_one_line(result, Exit.USAGE, "THOUGHTWIRE_TRACE_FILE")


@pytest.mark.parametrize("args", [["worker"], ["up", "--port", "0"]])
@pytest.mark.parametrize("tools", ["no_such_module:tool", "json:no_such_function"])
def test_a_tool_that_cannot_be_loaded_is_one_line_and_exit_2(args, tools):
    env = {"REDIS_URL": "redis://x", "OPENAI_API_KEY": "sk-test", "THOUGHTWIRE_TOOLS": tools}
    result = command(*args, env=env, timeout=15)
    assert_one_line(result, Exit.USAGE, "THOUGHTWIRE_TOOLS", tools)


@pytest.mark.parametrize("args", [["worker"], ["up", "--port", "0"]])
@pytest.mark.parametrize("openai", [False, True])
def test_an_approval_tool_no_agent_has_is_one_line_and_exit_2(args, openai):
    """A misspelt name would let the tool it meant run without asking."""
    env = {"REDIS_URL": "redis://x", "THOUGHTWIRE_APPROVAL_TOOLS": "search,calculater"}
    if openai:
        env["OPENAI_API_KEY"] = "sk-test"
    result = command(*args, env=env, timeout=15)
    assert_one_line(result, Exit.USAGE, "THOUGHTWIRE_APPROVAL_TOOLS", "calculater")
    assert ("calculator" in result.stderr) == openai  # the tools it could have meant


def test_a_token_without_jwt_secret_is_one_line_and_exit_2():
    assert_one_line(command("token", "--sub", "a"), Exit.USAGE, "JWT_SECRET")


def test_chat_without_a_prompt_is_one_line_and_exit_2():
    assert_one_line(command("chat"), Exit.USAGE, "--follow")
    assert_one_line(command("chat", "--follow"), Exit.USAGE, "--session")


# --- chat through a kill -9, and Ctrl-C -------------------------------------------


class Chat:
    """``thoughtwire chat --json`` as a child process, read line by line with bounded waits."""

    def __init__(self, proc):
        self.proc = proc
        self.events = []

    @classmethod
    async def start(cls, *args):
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "thoughtwire",
            "chat",
            "--json",
            *args,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            stdin=asyncio.subprocess.DEVNULL,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        return cls(proc)

    async def until(self, check, timeout=20):
        """Read events until ``check(event)``; returns that event."""
        async with asyncio.timeout(seconds(timeout)):
            while True:
                line = await self.proc.stdout.readline()
                assert line, await self.proc.stderr.read()
                event = json.loads(line)
                self.events.append(event)
                if check(event):
                    return event

    async def finish(self, timeout=20):
        """The rest of stdout, the exit code and stderr."""
        async with asyncio.timeout(seconds(timeout)):
            rest, err = await self.proc.communicate()
        self.events += [json.loads(line) for line in rest.splitlines()]
        return self.proc.returncode, err.decode()

    def kill(self):
        if self.proc.returncode is None:
            self.proc.kill()


async def test_chat_streams_a_run_once_per_seq_through_a_kill_9_of_frontend_a(redis_server, logdir):
    """--token T --url A --url B; A is killed (SIGKILL) after the first answer token. The
    run streams to its end from B: seqs 1..N once each, exit 0."""
    cluster = start_cluster(
        redis_server,
        logdir,
        JWT_SECRET=SECRET,
        THOUGHTWIRE_SIM_ANSWER_TOKENS="60",
        THOUGHTWIRE_SIM_TOKENS_PER_SECOND="20",
    )
    a, b = cluster.frontends
    chat = await Chat.start("through a kill", "--token", token(), "--url", a.ws, "--url", b.ws)
    try:
        await chat.until(lambda e: e["type"] == "answer")
        a.proc.kill()
        code, err = await chat.finish()
    finally:
        chat.kill()
        await asyncio.to_thread(cluster.stop)
    assert code == Exit.OK, err
    assert "Traceback" not in err and "resumed on" in err, err
    seqs = [e["seq"] for e in chat.events]
    assert seqs == list(range(1, len(seqs) + 1)), seqs
    assert chat.events[-1]["type"] == "done"
    assert sum(e["type"] == "answer" for e in chat.events) == 60


async def test_a_reader_that_goes_away_stops_chat_quietly(secure):
    """``chat ... | head -1``: the reader closes the pipe after one line. ``chat`` stops
    without a line, exit 0. Before, the next write ended in a traceback and exit 1."""
    read_end, write_end = os.pipe()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "thoughtwire", "chat", "--json", "read one line",
        "--token", token(), "--url", secure.frontends[0].ws,
        stdout=write_end, stderr=asyncio.subprocess.PIPE, stdin=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    os.close(write_end)
    try:
        with os.fdopen(read_end, "rb") as head:
            async with asyncio.timeout(seconds(20)):
                first = await asyncio.to_thread(head.readline)  # the proc's end unblocks it
        assert json.loads(first)["type"] == "thinking"
        async with asyncio.timeout(seconds(30)):
            err = (await proc.stderr.read()).decode()
            code = await proc.wait()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert code == Exit.OK, err
    assert "Traceback" not in err and "uncaught" not in err and "Broken pipe" not in err, err


async def test_ctrl_c_cancels_the_run_and_exits_130(secure):
    """SIGINT mid-run: the chat sends `cancel`, sees `cancelled`, exits 130, and the run's
    state says cancelled."""
    a = secure.frontends[0]
    tok = token("ctrl-c")
    chat = await Chat.start("interrupt me", "--token", tok, "--url", a.ws)
    try:
        first = await chat.until(lambda e: e["type"] == "answer")
        chat.proc.send_signal(signal.SIGINT)
        code, err = await chat.finish()
    finally:
        chat.kill()
    assert code == Exit.INTERRUPTED, err
    assert "Traceback" not in err and "the run was cancelled" in err, err
    assert chat.events[-1]["type"] == "cancelled"
    async with httpx.AsyncClient(headers={"Authorization": f"Bearer {tok}"}) as http:
        state = (await http.get(f"{a.http}/v1/jobs/{first['run']}")).json()
    assert state["status"] == "cancelled", state


async def test_ctrl_c_before_its_run_starts_cancels_its_run_not_the_one_going(secure):
    """Another writer's run is going in the session; chat's prompt waits behind it. Ctrl-C
    cancels chat's own run only: the other run ends ``done``. Before, chat knew no run of
    its own yet and sent the cancel of every run in the session."""
    a = secure.frontends[0]
    tok = token("ctrl-c-early")
    async with httpx.AsyncClient(headers={"Authorization": f"Bearer {tok}"}) as http:
        other = (await http.post(f"{a.http}/v1/jobs", json={"prompt": "theirs"})).json()
        session = other["session"]
        chat = await Chat.start("mine", "--session", session, "--token", tok, "--url", a.ws)
        try:
            async with asyncio.timeout(seconds(20)):  # its socket is open: its prompt is sent
                while True:
                    presence = await http.get(f"{a.http}/v1/sessions/{session}/presence")
                    if presence.json().get("sockets"):
                        break
                    await asyncio.sleep(0.05)
            chat.proc.send_signal(signal.SIGINT)
            code, err = await chat.finish()
        finally:
            chat.kill()
        assert code == Exit.INTERRUPTED, err
        assert "Traceback" not in err
        async with asyncio.timeout(seconds(20)):
            while (status := await job_status(http, a.http, other["job"])) == "running":
                await asyncio.sleep(0.1)
    assert status == "done", "another writer's run was cancelled"
    assert all(e["run"] != other["job"] for e in chat.events)


async def job_status(http, base, job):
    return (await http.get(f"{base}/v1/jobs/{job}")).json()["status"]


def ended_in(event: dict, run: str) -> bool:
    """Whether ``event`` shows ``run`` done: its ``done`` event, or a snapshot holding it done."""
    if event["type"] == "snapshot":
        return event["state"]["runs"].get(run, {}).get("status") == "done"
    return (event["type"], event.get("run")) == ("done", run)


async def test_chat_follows_a_session_with_a_viewer_token(secure):
    """The owner prompts; `chat --follow --session S` with a viewer token prints the run."""
    a, b = secure.frontends
    owner = await Chat.start("watched", "--token", token("owner"), "--url", a.ws)
    try:
        first = await owner.until(lambda e: "seq" in e)
        viewer_token = Authenticator(Settings(jwt_secret=SECRET)).viewer_token(
            "owner", first["session"]
        )[0]
        viewer = await Chat.start(
            "--follow", "--session", first["session"], "--token", viewer_token, "--url", b.ws
        )
        try:
            # The run ends as its done event, or (the viewer slow to start on a loaded
            # machine, after the run's 3 s) done in the snapshot it joins with.
            await viewer.until(lambda e: ended_in(e, first["run"]))
            viewer.proc.send_signal(signal.SIGINT)
            code, err = await viewer.finish()
        finally:
            viewer.kill()
        assert code == Exit.INTERRUPTED and "Traceback" not in err, err
        assert (await owner.finish())[0] == Exit.OK
    finally:
        owner.kill()


async def test_follow_starts_from_the_snapshot_or_with_from_start_from_the_first_event(secure):
    """After a run, `chat --follow` prints one snapshot line, not the log; `--from-start`
    prints every event from seq 1; a prompt in a continued session skips the snapshot."""
    a, b = secure.frontends
    tok = token("owner")
    owner = await Chat.start("first", "--token", tok, "--url", a.ws)
    try:
        done = await owner.until(lambda e: e["type"] == "done")
        assert (await owner.finish())[0] == Exit.OK
    finally:
        owner.kill()
    session = done["session"]
    for extra, check in (
        ([], lambda e: "seq" in e),
        (["--from-start"], lambda e: e["type"] == "done"),
    ):
        follower = await Chat.start(
            "--follow", "--session", session, "--token", tok, "--url", b.ws, *extra
        )
        try:
            await follower.until(check)
            follower.proc.send_signal(signal.SIGINT)
            code, err = await follower.finish()
        finally:
            follower.kill()
        assert code == Exit.INTERRUPTED and "Traceback" not in err, err
        if extra:
            assert [e["seq"] for e in follower.events] == list(range(1, done["seq"] + 1))
        else:
            assert [e["type"] for e in follower.events] == ["snapshot"]
            assert follower.events[0]["seq"] == done["seq"]
    again = await Chat.start("second", "--session", session, "--token", tok, "--url", a.ws)
    try:
        await again.until(lambda e: e["type"] == "done")
        assert (await again.finish())[0] == Exit.OK
    finally:
        again.kill()
    assert "snapshot" not in {e["type"] for e in again.events}
    assert len({e["run"] for e in again.events}) == 1


def test_from_start_goes_with_follow():
    assert_one_line(command("chat", "hi", "--from-start"), Exit.USAGE, "--follow")


# --- help, version, tokens, banners -----------------------------------------------


def test_help_lists_every_command_exit_code_and_setting():
    result = command("--help")
    assert result.returncode == 0
    for name in ("up", "api", "worker", "token", "chat"):
        assert f"    {name} " in result.stdout
    for code in Exit:
        assert f"{int(code):>3}  " in result.stdout
    variables = environment_variables()
    assert len(variables) == len(Settings.model_fields)
    for name, _default in variables:
        assert name in result.stdout
    assert "REDIS_URL" in result.stdout and "THOUGHTWIRE_LOG_MAXLEN (default: 10000)" in (
        result.stdout
    )
    for sub in ("up", "api", "token", "chat"):
        assert "(default: " in command(sub, "--help").stdout


def test_version_prints_the_installed_version():
    from importlib.metadata import version

    result = command("--version")
    assert result.stdout.strip() == f"thoughtwire {version('thoughtwire')}"


def test_token_mints_viewer_tokens_and_sets_aud_and_iss():
    env = {"JWT_SECRET": SECRET}
    viewer = command("token", "--sub", "alice", "--viewer", "--session", "S1", env=env)
    principal = Authenticator(Settings(jwt_secret=SECRET)).authenticate(viewer.stdout.strip())
    assert principal.viewer_of == "S1"
    assert_one_line(command("token", "--sub", "a", "--viewer", env=env), Exit.USAGE, "--session")
    answer = command(
        "token", "--sub", "al", "--viewer", "--session", "S1", "--scope", "answer", env=env
    )
    assert (
        Authenticator(Settings(jwt_secret=SECRET)).authenticate(answer.stdout.strip()).scope
        == "answer"
    )

    minted = command("token", "--sub", "bob", "--aud", "tw", "--iss", "https://i", env=env)
    settings = Settings(jwt_secret=SECRET, jwt_audience="tw", jwt_issuer="https://i")
    assert Authenticator(settings).authenticate(minted.stdout.strip()).user == "bob"


@pytest.mark.parametrize(
    "args",
    [("--scope", "answer"), ("--session", "S1"), ("--scope", "full", "--session", "S1")],
)
def test_a_viewer_option_without_viewer_is_one_line_and_exit_2(args):
    """``--scope`` or ``--session`` without ``--viewer`` minted the user's own full token,
    for every session and for writing, and exited 0: shared as an answer-only link."""
    result = command("token", "--sub", "alice", *args, env={"JWT_SECRET": SECRET})
    assert_one_line(result, Exit.USAGE, "--viewer")
    assert not result.stdout


@pytest.mark.parametrize("sub", ["", "  "])
def test_a_token_for_nobody_is_one_line_and_exit_2(sub):
    """A token with an empty ``sub`` was minted, and every frontend refused it."""
    result = command("token", "--sub", sub, env={"JWT_SECRET": SECRET})
    assert_one_line(result, Exit.USAGE, "--sub")
    assert not result.stdout


def test_banners_say_auth_redis_agent_and_concurrency(secure):
    frontend = secure.frontends[0].proc.output()
    worker = secure.workers[0].output()
    redis = f"Redis at {secure.redis.url}"
    assert "thoughtwire api: authentication by JWT_SECRET (HS256)" in frontend
    assert redis in frontend and redis in worker
    assert "thoughtwire worker: agent simulated, concurrency 32" in worker
    assert SECRET not in frontend + worker


def test_workers_log_each_run_and_their_shutdown(secure):
    """After the runs above: a start and an end line per run, and one line on stopping."""
    worker = secure.add_worker()
    try:
        with httpx.Client(headers={"Authorization": f"Bearer {token('logs')}"}) as http:
            job = http.post(f"{secure.frontends[0].http}/v1/jobs", json={"prompt": "log me"})
            run = job.json()["job"]
            status_url = f"{secure.frontends[0].http}/v1/jobs/{run}"
            wait_until(lambda: http.get(status_url).json()["status"] == "done", 20, "the run")
    finally:
        secure.workers.remove(worker)
        worker.stop()
    log = "".join(w.output() for w in [*secure.workers, worker])
    assert f"run started: session {job.json()['session']}, run {run}, attempt 1" in log
    assert f"run {run}, attempt 1, outcome done, " in log
    assert "stopped; runs: " in worker.output()


# --- protocol v2 in the terminal: reasoning, tool cards, approvals ---------------------


def v2_frames():
    """A recorded v2 run: streamed reasoning, a search that waits for approval, its result,
    a whole thinking line, the answer in deltas, usage on done."""
    frames = []

    def add(kind, content="", **fields):
        seq = len(frames) + 1
        frames.append(
            {"type": kind, "content": content, "run": "r1", "seq": seq, "epoch": "e1", **fields}
        )

    call = {"tool": "search", "call_id": "call_1"}
    for piece in ("The user wants ", "the weather. ", "I will search."):
        add("thinking", piece, block="b1", delta=True)
    add("block_end", block="b1")
    add("tool_input", '{"query": ', block="b2", delta=True, **call)
    add("tool_input", '"Paris"}', block="b2", delta=True, **call)
    add("action", "search", block="b2", delta=False, arguments={"query": "Paris"}, **call)
    add(
        "approval",
        block="b2",
        arguments={"query": "Paris"},
        timeout_ms=1000,
        default="deny",
        **call,
    )
    add("decision", block="b2", call_id="call_1", decision="allow", reason="fine", by="user")
    add("observation", "Paris: 18 °C", block="b3", delta=False, is_error=False, **call)
    add("thinking", "Now I can answer.", block="b4", delta=False)
    add("thinking", "Briefly.", block="b5", delta=False)
    for piece in ("It is ", "18 °C."):
        add("answer", piece, block="b6", delta=True)
    add("block_end", block="b6")
    usage = {"prompt_tokens": 40, "completion_tokens": 12, "total_tokens": 52, "estimated": True}
    add("done", usage=usage, finish_reason="stop")
    return frames


def test_the_transcript_prints_joined_reasoning_a_tool_card_and_usage():
    """Drawn from the reducer's state frame by frame, as `chat` does: each piece once."""
    import io

    from thoughtwire.shared.reducer import initial_state, reduce
    from thoughtwire.terminal import Approval, Transcript

    out = io.StringIO()
    transcript, state, asked = Transcript(out), initial_state(), []
    for frame in v2_frames():
        state = reduce(state, frame)
        asked += transcript.show(state["runs"]["r1"])
    assert asked == [Approval("r1", "call_1", "search", '{"query": "Paris"}')]
    assert out.getvalue() == (
        "💭 The user wants the weather. I will search.\n"
        "┌ 🔧 search\n"
        '│   {"query": "Paris"}\n'
        "│ ⏸  waiting for approval\n"
        "│ ✔  allowed by the session's owner: fine\n"
        "└ 👁️  Paris: 18 °C\n"
        "💭 Now I can answer.\n"
        "   Briefly.\n"
        "✅ It is 18 °C.\n"
        "   ~52 tokens (~40 prompt, ~12 completion, estimated)\n"
    )


def test_the_transcript_dims_reasoning_on_a_terminal_and_marks_errors():
    import io

    from thoughtwire.shared.reducer import fold
    from thoughtwire.terminal import DIM, RESET, Transcript

    frames = v2_frames()[:3]
    frames.append(
        {
            "type": "error",
            "content": "over budget",
            "code": "budget",
            "run": "r1",
            "seq": 4,
            "epoch": "e1",
        }
    )
    out = io.StringIO()
    Transcript(out, color=True).show(fold(frames)["runs"]["r1"])
    assert out.getvalue() == (
        f"💭 {DIM}The user wants the weather. I will search.{RESET}\n❌ over budget (budget)\n"
    )


@pytest.fixture(scope="module")
def asking(redis_server, logdir):
    """Two frontends with authentication on, whose simulated agent asks before its search."""
    c = start_cluster(
        redis_server,
        logdir,
        JWT_SECRET=SECRET,
        THOUGHTWIRE_APPROVAL_TOOLS="search",
        THOUGHTWIRE_SIM_ANSWER_TOKENS="8",
    )
    yield c
    c.stop()


class TextChat:
    """``thoughtwire chat`` printing for a person, its stdin a pipe that the test types into."""

    def __init__(self, proc):
        self.proc = proc
        self.stderr = ""

    @classmethod
    async def start(cls, *args, stdin=asyncio.subprocess.PIPE):
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "thoughtwire",
            "chat",
            *args,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            stdin=stdin,
            env={**os.environ, "PYTHONUNBUFFERED": "1", "NO_COLOR": "1"},
        )
        return cls(proc)

    async def asked(self, words, timeout=20):
        """Read stderr until it says ``words``."""
        async with asyncio.timeout(seconds(timeout)):
            while words not in self.stderr:
                chunk = await self.proc.stderr.read(1024)
                assert chunk, self.stderr
                self.stderr += chunk.decode()

    async def type(self, line):
        self.proc.stdin.write(line.encode() + b"\n")
        await self.proc.stdin.drain()

    async def finish(self, timeout=20):
        async with asyncio.timeout(seconds(timeout)):
            out, err = await self.proc.communicate()
        return self.proc.returncode, out.decode(), self.stderr + err.decode()

    def kill(self):
        if self.proc.returncode is None:
            self.proc.kill()


async def test_chat_asks_before_a_tool_runs_and_sends_the_answer(asking):
    """y on stdin allows the search; the output has the joined reasoning and a tool card."""
    a = asking.frontends[0]
    chat = await TextChat.start("What is thoughtwire?", "--token", token("yes"), "--url", a.ws)
    try:
        await chat.asked('allow search {"query": "What is thoughtwire?"}? [y/n')
        await chat.type("y")
        code, out, err = await chat.finish()
    finally:
        chat.kill()
    assert code == Exit.OK, err
    print(out)
    assert out.startswith(
        "💭 Analyzing the question...\n"
        "   I need to search for information\n"
        "┌ 🔧 search\n"
        '│   {"query": "What is thoughtwire?"}\n'
        "│ ⏸  waiting for approval\n"
        "│ ✔  allowed by the session's owner\n"
        "└ 👁️  Found: relevant results about What is thoughtwire?\n"
        "💭 Processing the results...\n"
        "✅ "
    ), out
    assert "Traceback" not in err


async def test_chat_denies_with_a_reason(asking):
    a = asking.frontends[1]
    chat = await TextChat.start("Search, please", "--token", token("no"), "--url", a.ws)
    try:
        await chat.asked("allow search")
        await chat.type("n not this time")
        code, out, err = await chat.finish()
    finally:
        chat.kill()
    assert code == Exit.OK, err
    assert "│ ✖  denied by the session's owner: not this time\n└ ❌ error: " in out, out


async def test_follow_shows_an_approval_without_asking_and_the_decision_from_elsewhere(asking):
    """The owner's chat has nothing on stdin, so it says where else to answer; a follower
    shows the call waiting and asks nothing; an HTTP approval lets both finish."""
    a, b = asking.frontends
    tok = token("elsewhere")
    owner = await TextChat.start(
        "Ask elsewhere", "--token", tok, "--url", a.ws, "--json", stdin=asyncio.subprocess.DEVNULL
    )
    follower = None
    try:
        await owner.asked("nothing to read an answer from")
        assert "POST /v1/runs/" in owner.stderr
        approval = None
        async with asyncio.timeout(seconds(20)):
            while approval is None:
                line = await owner.proc.stdout.readline()
                assert line
                event = json.loads(line)
                approval = event if event["type"] == "approval" else None
        follower = await TextChat.start(
            # A loaded machine may take seconds to start it: give it longer than --timeout's 10 s.
            "--follow",
            "--session",
            approval["session"],
            "--token",
            tok,
            "--url",
            b.ws,
            "--timeout",
            "60",
        )
        async with asyncio.timeout(seconds(20)):
            seen = b""
            while b"waiting for approval" not in seen:
                chunk = await follower.proc.stdout.read(1024)
                assert chunk, (seen, await follower.proc.stderr.read())
                seen += chunk
        async with httpx.AsyncClient(headers={"Authorization": f"Bearer {tok}"}) as http:
            reply = await http.post(
                f"{b.http}/v1/runs/{approval['run']}/approvals/{approval['call_id']}",
                json={"decision": "allow", "reason": "from the API"},
            )
        assert reply.status_code < 300, reply.text
        async with asyncio.timeout(seconds(20)):
            while b"tokens (" not in seen:  # the usage line under the answer
                chunk = await follower.proc.stdout.read(1024)
                assert chunk
                seen += chunk
        follower.proc.send_signal(signal.SIGINT)
        code, out, err = await follower.finish()
        shown = seen.decode() + out
        assert "│ ✔  allowed by the session's owner: from the API\n" in shown, shown
        assert "allow search" not in err, "a follower never asks"
        assert code == Exit.INTERRUPTED
        assert (await owner.finish())[0] == Exit.OK
    finally:
        owner.kill()
        if follower is not None:
            follower.kill()
