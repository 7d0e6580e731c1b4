"""Logs: one JSON object per line from every process, naming the run, and holding no secret.

Real frontends and workers on a redis-server with a password, with
THOUGHTWIRE_LOG_FORMAT=json and a JWT secret: a run prompted over a socket whose token is
in its query string, a worker killed with -9 in the middle of it (another one takes it
over), and failing requests. Then every line every process wrote is read back.
"""

import json
import logging
import secrets
import subprocess
import sys
import threading

import httpx
import pytest
import redis

from tests.conftest import start_cluster
from tests.procs import RedisServer, seconds, wait_until
from tests.wsclient import connect, greeting, recv_json, run_events
from thoughtwire.api.auth import mint
from thoughtwire.shared import logs
from thoughtwire.shared.keys import Keys

JWT_SECRET = "jwt-secret-" + secrets.token_hex(16)
REDIS_PASSWORD = "redis-pass-" + secrets.token_hex(8)
USER = "alice@example.com"
TOKENS = 40


class PasswordRedis(RedisServer):
    """A redis-server that wants a password, in its URL as a deployment would give it."""

    def __init__(self, workdir, password):
        super().__init__(workdir, "--requirepass", password)
        self.password = password
        self.url = f"redis://:{password}@127.0.0.1:{self.port}/0"

    def ping(self):
        try:
            with redis.Redis(port=self.port, password=self.password, socket_timeout=1) as r:
                return bool(r.ping())
        except redis.ConnectionError:
            return False

    def client(self):
        return redis.Redis(port=self.port, password=self.password, socket_timeout=5)


@pytest.fixture(scope="module")
def json_cluster(logdir):
    workdir = logdir / "redis-logs"
    workdir.mkdir()
    server = PasswordRedis(workdir, REDIS_PASSWORD).start()
    cluster = None
    try:
        cluster = start_cluster(
            server,
            logdir,
            frontends=1,
            workers=2,
            JWT_SECRET=JWT_SECRET,
            THOUGHTWIRE_LOG_FORMAT="json",
            THOUGHTWIRE_LEASE_SECONDS="1",
            THOUGHTWIRE_SIM_STEP_DELAY="0.05",
            THOUGHTWIRE_SIM_ANSWER_TOKENS=str(TOKENS),
            THOUGHTWIRE_SIM_TOKENS_PER_SECOND="60",
        )
        yield cluster
    finally:
        if cluster is not None:
            cluster.stop()
        server.stop()


def run_owner_pid(cluster, session, run):
    with cluster.redis.client() as r:
        owner = r.hget(Keys(cluster.prefix).run(session, run), "owner")
    return int(owner.decode().split("-")[-2])


def entries(proc):
    """Every line ``proc`` wrote, each parsed as JSON (a line that is not fails the test)."""
    lines = [line for line in proc.output().splitlines() if line.strip()]
    parsed = []
    for line in lines:
        try:
            parsed.append(json.loads(line))
        except ValueError:
            pytest.fail(f"{proc.name} wrote a line that is not JSON: {line!r}")
    return parsed


async def drive(cluster, token):
    """A run over a socket with ``?token=``, its worker killed -9 midway; failing requests."""
    frontend = cluster.frontends[0]
    async with connect(f"{frontend.ws}/ws/agent-thoughts?token={token}") as ws:
        session = await greeting(ws)
        await ws.send("survive a crash")
        before = []
        while len(before) < 10:
            message = await recv_json(ws)
            if "seq" in message:
                before.append(message)
        run = before[0]["run"]
        victim = cluster.worker_with_pid(run_owner_pid(cluster, session, run))
        victim.kill()
        after = await run_events(ws, timeout=30)
    assert [e["type"] for e in after].count("retry") == 1 and after[-1]["type"] == "done"
    async with httpx.AsyncClient(base_url=frontend.http, timeout=seconds(10)) as http:
        forged = mint("not-the-secret-" + secrets.token_hex(16), USER, 60)
        assert (await http.get(f"/v1/jobs/x?token={forged}")).status_code == 401
        assert (await http.get(f"/v1/jobs/nope?token={token}")).status_code == 404
        headers = {"Authorization": f"Bearer {token}"}
        assert (
            await http.post("/v1/jobs", json={"prompt": ""}, headers=headers)
        ).status_code == 422
        queued = await http.post("/v1/jobs", json={"prompt": "by http"}, headers=headers)
        assert queued.status_code == 202
    return session, run, victim, forged, queued.json()["job"]


def ended(entries_, run):
    return [e for e in entries_ if e["message"].startswith("run ended") and e.get("run") == run]


async def test_every_line_is_json_names_its_run_and_holds_no_secret(json_cluster):
    token = mint(JWT_SECRET, USER, 600)
    session, run, victim, forged, http_run = await drive(json_cluster, token)
    survivor = next(w for w in json_cluster.workers if w is not victim)
    wait_until(lambda: ended(entries(survivor), http_run), 30, "the http run to end")
    json_cluster.stop()  # their last lines (shutdown, drain) are read too

    procs = [f.proc for f in json_cluster.frontends] + json_cluster.workers
    logged = {proc.name: entries(proc) for proc in procs}
    user = logs.user_digest(USER)
    for name, lines in logged.items():
        assert lines, f"{name} logged nothing"
        for entry in lines:
            assert {"time", "level", "logger", "message"} <= entry.keys(), entry
            text = json.dumps(entry)
            for secret in (JWT_SECRET, REDIS_PASSWORD, token, forged, USER):
                assert secret not in text, f"{name} logged a secret: {text}"

    # The worker that took the run over says when it started and how it ended, with the run.
    taken = [
        e
        for e in logged[survivor.name]
        if e["message"].startswith("run started") and e.get("run") == run
    ]
    assert taken and taken[0]["attempt"] == 2
    assert taken[0]["session"] == session and taken[0]["user"] == user
    (end,) = ended(logged[survivor.name], run)
    assert end["level"] == "INFO" and end["attempt"] == 2 and end["session"] == session
    assert "outcome done" in end["message"] and "tokens" in end["message"]
    # The killed one had logged its start.
    started = [e for e in logged[victim.name] if e["message"].startswith("run started")]
    assert [(e["run"], e["attempt"], e["user"]) for e in started] == [(run, 1, user)]

    # The frontend: the prompt queued over the socket and over HTTP, with session and user;
    # uvicorn's access lines, as JSON, with the query's token redacted.
    frontend = logged[json_cluster.frontends[0].proc.name]
    queued = {e["run"]: e for e in frontend if e["message"].startswith("run queued")}
    assert queued[run]["session"] == session and queued[run]["user"] == user
    assert queued[http_run]["user"] == user
    access = [e for e in frontend if e["logger"] == "uvicorn.access"]
    assert any(
        "/v1/jobs/x?token=[redacted]" in e["message"] and "401" in e["message"] for e in access
    )
    assert any(e["logger"] == "uvicorn.error" for e in frontend)


@pytest.fixture
def configured():
    """Whatever logs.configure changes in this process is put back afterwards."""
    root = logging.getLogger()
    level, hook, thread_hook = root.level, sys.excepthook, threading.excepthook
    yield
    for handler in [h for h in root.handlers if h.get_name() == "thoughtwire"]:
        root.removeHandler(handler)
    root.setLevel(level)
    sys.excepthook = hook
    threading.excepthook = thread_hook
    logging.captureWarnings(False)


def test_text_and_json_lines_redact_the_same_secrets(capsys, configured):
    url = "redis://:hunter2hunter2@db:6379/0"
    token = mint(JWT_SECRET, USER, 60)
    log = logging.getLogger("thoughtwire.test")
    for fmt in ("text", "json"):
        logs.configure(fmt, secrets=[JWT_SECRET, *logs.url_secrets(url)])
        with logs.bound(session="S", run="R", attempt=3, user=USER):
            log.info('127.0.0.1 - "GET /ws?session=S&token=%s HTTP/1.1" 101', token)
            try:
                raise RuntimeError(f"cannot reach {url} with {JWT_SECRET}")
            except RuntimeError:
                log.exception("failed")
        err = capsys.readouterr().err
        for secret in (token, JWT_SECRET, "hunter2hunter2", USER):
            assert secret not in err
        assert "token=[redacted]" in err and "redis://:***@db:6379/0" in err
        if fmt == "json":
            first, second = (json.loads(line) for line in err.splitlines())
            assert first["run"] == "R" and first["attempt"] == 3
            assert first["user"] == logs.user_digest(USER)
            assert (
                second["exception"].startswith("Traceback")
                and "RuntimeError" in second["exception"]
            )
        else:
            assert "[session=S run=R attempt=3 user=" in err


def test_every_password_of_a_redis_url_is_found_and_redacted():
    url = "redis+sentinel://u:p%40ss1@h:1,h:2/svc/1?sentinel_password=sp4ss&x=1"
    assert set(logs.url_secrets(url)) == {"p%40ss1", "p@ss1", "sp4ss"}
    assert logs.url_secrets("redis://h:6379/0") == logs.url_secrets(None) == []
    redact = logs.Redactor(logs.url_secrets(url))
    assert redact(f"cannot reach {url}") == (
        "cannot reach redis+sentinel://u:***@h:1,h:2/svc/1?sentinel_password=***&x=1"
    )
    assert redact("AUTH failed for p@ss1") == "AUTH failed for [redacted]"
    assert (
        redact("http://h:8080/a@b and redis://h:6379/0") == "http://h:8080/a@b and redis://h:6379/0"
    )


def test_credentials_in_any_query_spelling_basic_auth_and_slashed_passwords_are_redacted():
    redact = logs.Redactor(logs.url_secrets("redis://:pa/ss@h:1/0"))
    lines = {
        "GET /ws/agent-thoughts?tok%65n=abc.def.ghi&x=1 HTTP/1.1": "abc.def.ghi",
        "Authorization: Basic dXNlcjpwYXNzd29yZA==": "dXNlcjpwYXNzd29yZA==",
        "GET /x?api_key=sk-123&key=zzz9&monkey=1": "sk-123",
        "connecting to redis://:pa/ss@h:1/0": "pa/ss",
    }
    for line, secret in lines.items():
        assert secret not in redact(line), line
    assert "monkey=1" in redact("GET /x?monkey=1")


def test_a_token_glued_to_an_encoded_separator_is_redacted():
    """A token right after '%20', '%3D' or '_' has no word boundary before its 'eyJ'."""
    token = mint(JWT_SECRET, USER, 60)
    redact = logs.Redactor()
    for line in (
        f"GET /ws?authorization=Bearer%20{token} HTTP/1.1",
        f"GET /login?next=%2Fws%3Fsession%3DS%26token%3D{token} HTTP/1.1",
        f"GET /ws?subprotocol=bearer_{token} HTTP/1.1",
    ):
        assert token.split(".")[1] not in redact(line), line


def test_an_exception_a_thread_left_uncaught_is_one_redacted_log_entry():
    """Not Python's raw traceback on stderr: outside the JSON format, secrets and all."""
    script = (
        "import threading\n"
        "from thoughtwire.shared import logs\n"
        "logs.configure('json', secrets=['a-thread-secret'])\n"
        "def fail():\n"
        "    raise RuntimeError('cannot reach it with a-thread-secret')\n"
        "thread = threading.Thread(target=fail, name='port')\n"
        "thread.start()\n"
        "thread.join()\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=seconds(30)
    )
    lines = result.stderr.splitlines()
    assert "a-thread-secret" not in result.stderr
    (entry,) = [json.loads(line) for line in lines]
    assert entry["level"] == "CRITICAL" and "RuntimeError" in entry["exception"]


def test_the_password_of_an_openai_proxy_url_is_kept_out_too(capsys, configured):
    """A proxy's password on its own, as an error from the proxy may echo it."""
    from thoughtwire.shared.settings import Settings

    settings = Settings(openai_base_url="https://team:pr0xy-pa55@proxy.example/v1")
    logs.configure_from(settings)
    logging.getLogger("thoughtwire.test").warning("proxy said: bad password pr0xy-pa55")
    assert "pr0xy-pa55" not in capsys.readouterr().err
