"""The seed tutorial's own clients, unchanged, against real thoughtwire processes.

``tests/seed/websockets-agent-streaming.txt`` is the tutorial the project started from,
byte for byte. Its HTML page and its Python client are taken out of it as they are; only
the port they hard-code (8000) is rewritten, to a free one. The page is opened from a
``file://`` URL, as a newcomer opens a page they saved: its socket's Origin is ``null``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from tests.browser import browser_context
from tests.conftest import Cluster, start_cluster
from tests.procs import Frontend, RedisServer, seconds, wait_until
from thoughtwire.api import auth
from thoughtwire.api.auth import (
    ORIGIN_REFUSAL,
    AuthError,
    check_origin,
    local_origin,
    origin_allowed,
)
from thoughtwire.shared.settings import Settings

SEED = Path(__file__).parent / "seed" / "websockets-agent-streaming.txt"
PROMPT = "What is machine learning?"

# A paced run, so the answer reaches the page in several pieces: 12 answer events.
UP_ENV = {
    "REDIS_URL": "",
    "OPENAI_API_KEY": "",
    "JWT_SECRET": "",
    "JWT_PUBLIC_KEY": "",
    "JWKS_URL": "",
    "THOUGHTWIRE_ALLOWED_ORIGINS": "",
    "THOUGHTWIRE_ALLOW_LOCAL_ORIGINS": "",
    "THOUGHTWIRE_SIM_STEP_DELAY": "0.05",
    "THOUGHTWIRE_SIM_TOKENS_PER_SECOND": "40",
    "THOUGHTWIRE_SIM_ANSWER_TOKENS": "12",
    "THOUGHTWIRE_COALESCE_MS": "0",
    "THOUGHTWIRE_DRAIN_WINDOW": "0.2",
}

# Watches the page without changing it: every frame its socket receives, how the socket
# closed, and each new text of the live answer (``#current``) as the page writes it.
OBSERVER = """
(() => {
  const seen = (window.__seen = { frames: [], closes: [], partials: [] });
  const Native = window.WebSocket;
  window.WebSocket = class extends Native {
    constructor(...args) {
      super(...args);
      this.addEventListener("message", (e) => seen.frames.push(e.data));
      this.addEventListener("close", (e) => seen.closes.push([e.code, e.reason]));
    }
  };
  document.addEventListener("DOMContentLoaded", () => {
    new MutationObserver(() => {
      const current = document.getElementById("current");
      const text = current ? current.textContent : "";
      if (text && text !== seen.partials[seen.partials.length - 1]) seen.partials.push(text);
    }).observe(document.body, { childList: true, subtree: true, characterData: true });
  });
})();
"""


def seed_part(start: str, end: str) -> str:
    """The tutorial's text from ``start`` to the end of ``end``, as it is."""
    text = SEED.read_text()
    first = text.index(start)
    return text[first : text.index(end, first) + len(end)] + "\n"


def seed_page() -> str:
    return seed_part("<!DOCTYPE html>", "</html>")


def seed_python_client() -> str:
    return seed_part(
        "# script_id: day_085_websockets_streaming/python_websocket_client",
        "asyncio.run(chat_with_agent())",
    )


def on_port(source: str, port: int) -> str:
    """The seed's client, pointed at ``port`` instead of 8000; nothing else changes."""
    assert source.count("ws://localhost:8000/") == 1
    return source.replace("ws://localhost:8000/", f"ws://localhost:{port}/")


@pytest.fixture(scope="module")
def up(logdir: Path) -> Iterator[Frontend]:
    """``thoughtwire up`` as a newcomer runs it: no authentication, embedded Redis."""
    node = Frontend("seed-up", UP_ENV, logdir)
    node.proc.args[3:4] = ["up"]  # `thoughtwire up --host ... --port ...` instead of `api`
    node.proc.args.remove("--insecure")
    node.start()
    yield node
    node.proc.stop()


@pytest.fixture(scope="module")
def api_frontend(redis_server: RedisServer, logdir: Path) -> Iterator[Cluster]:
    """``thoughtwire api`` (here ``--insecure``): local origins are not allowed by default."""
    c = start_cluster(redis_server, logdir, frontends=1, workers=0)
    yield c
    c.stop()


async def open_seed_page(context: Any, tmp_path: Path, port: int) -> tuple[Any, list[str]]:
    """The seed's page saved to a file and opened from it; returns it and its console."""
    saved = tmp_path / "agent-chat.html"
    saved.write_text(on_port(seed_page(), port))
    page = await context.new_page()
    console: list[str] = []
    page.on("console", lambda message: console.append(message.text))
    await page.add_init_script(OBSERVER)
    async with page.expect_console_message(
        lambda m: m.text in ("Connected!", "Disconnected"), timeout=seconds(10) * 1000
    ):
        await page.goto(saved.as_uri())
    return page, console


@pytest.mark.browser
async def test_the_seed_page_opened_from_a_file_streams_thoughts_and_the_answer(up, tmp_path):
    """The tutorial's page, from file://, against `thoughtwire up`: thinking lines, then the answer.

    Before local origins were allowed it printed "Connected!" then "Disconnected" (closed
    with 1008) and showed nothing. Measured: 3 thinking lines, and the answer shown in 12
    growing pieces before the final message.
    """
    async with browser_context() as context:
        page, console = await open_seed_page(context, tmp_path, up.port)
        assert console == ["Connected!"]
        await page.fill("#input", PROMPT)
        await page.click("button")
        await page.wait_for_selector("#chat .message", timeout=seconds(20) * 1000)
        shown = await page.evaluate(
            """() => ({
                user: document.querySelector("#chat .user").textContent,
                thinking: [...document.querySelectorAll("#chat .thinking")].map(e => e.textContent),
                message: document.querySelector("#chat .message").textContent,
                seen: window.__seen,
            })"""
        )
    events = [json.loads(frame) for frame in shown["seen"]["frames"]]
    events = [e for e in events if "seq" in e]
    answer = "".join(e["content"] for e in events if e["type"] == "answer")
    partials = shown["seen"]["partials"]
    print(f"thinking lines: {len(shown['thinking'])}; the answer shown in {len(partials)} pieces")
    assert shown["user"] == "You: " + PROMPT
    assert shown["thinking"] == ["💭 " + e["content"] for e in events if e["type"] == "thinking"]
    assert len(shown["thinking"]) >= 2
    assert events[-1]["type"] == "done"
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
    assert shown["message"] == answer and answer.strip()
    # It streamed in: the page showed the answer growing, piece by piece, before the end.
    assert len(partials) >= 3, partials
    assert all(answer.startswith(p) for p in partials)
    assert shown["seen"]["closes"] == []
    assert "Disconnected" not in console


def test_the_seed_python_client_prints_each_thought(up, tmp_path):
    """The tutorial's Python client, run as it is, against `thoughtwire up`."""
    script = tmp_path / "python_websocket_client.py"
    script.write_text(on_port(seed_python_client(), up.port))
    result = subprocess.run(
        [sys.executable, str(script)],
        capture_output=True,
        text=True,
        encoding="utf-8",
        env={"PYTHONIOENCODING": "utf-8", "PATH": "/usr/bin:/bin"},
        timeout=seconds(30),
        check=False,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.splitlines()
    kinds = [line.split(" ", 1)[0] for line in lines]
    assert kinds[:5] == ["💭", "💭", "🔧", "👁️", "💭"], lines
    assert set(kinds[5:]) == {"✅"} and len(kinds[5:]) >= 2, lines
    assert PROMPT in lines[2]


def test_the_banner_says_that_local_pages_may_connect(up):
    """One line of the banner says so, and names the setting that turns it off."""
    lines = [line for line in up.proc.output().splitlines() if "Origin null" in line]
    assert len(lines) == 1
    assert "THOUGHTWIRE_ALLOW_LOCAL_ORIGINS=0" in lines[0]


@pytest.mark.browser
async def test_a_refused_page_is_told_which_setting_allows_it(api_frontend, tmp_path):
    """`thoughtwire api` refuses the seed's page from file://, with a reason and a warning.

    The close reason names THOUGHTWIRE_ALLOWED_ORIGINS, and the frontend logs one warning
    naming it however often the same origin comes back.
    """
    frontend = api_frontend.frontends[0]
    async with browser_context() as context:
        page, console = await open_seed_page(context, tmp_path, frontend.port)
        await page.wait_for_function("window.__seen.closes.length > 0", timeout=seconds(10) * 1000)
        closes = await page.evaluate("window.__seen.closes")
        async with asyncio.timeout(seconds(5)):  # console messages reach us a little later
            while "Disconnected" not in console:
                await asyncio.sleep(0.05)
    assert console == ["Connected!", "Disconnected"]
    assert closes == [[1008, ORIGIN_REFUSAL]]
    for _ in range(2):  # and again, from a script that says it is a page from a file
        with pytest.raises(ConnectionClosed) as closed:
            async with asyncio.timeout(seconds(10)):
                async with connect(f"{frontend.ws}/ws/agent-thoughts", origin="null") as ws:
                    await ws.recv()
        assert closed.value.rcvd is not None
        assert (closed.value.rcvd.code, closed.value.rcvd.reason) == (1008, ORIGIN_REFUSAL)
    warning = "refused a browser page from origin 'null'"
    wait_until(lambda: warning in frontend.proc.output(), 10, "the warning in the log")
    logged = [line for line in frontend.proc.output().splitlines() if warning in line]
    assert len(logged) == 1, logged
    assert "WARNING" in logged[0] and "THOUGHTWIRE_ALLOWED_ORIGINS" in logged[0]
    assert "THOUGHTWIRE_ALLOW_LOCAL_ORIGINS=1" in logged[0]


# --- the rule, with plain data ----------------------------------------------------

LOCAL = Settings(allow_local_origins=True)
REMOTE = Settings(allow_local_origins=False)
LISTED = Settings(allowed_origins="https://app.example, null")


@pytest.mark.parametrize(
    ("origin", "settings", "allowed"),
    [
        (None, REMOTE, True),  # not a browser
        ("null", LOCAL, True),
        ("null", REMOTE, False),
        ("null", LISTED, True),
        ("http://localhost:3000", LOCAL, True),
        ("https://127.0.0.1:8443", LOCAL, True),
        ("http://[::1]:5173", LOCAL, True),
        ("http://localhost", LOCAL, True),
        ("http://localhost:3000", REMOTE, False),
        ("http://localhost.evil.example", LOCAL, False),
        ("http://127.0.0.1:80@evil.example", LOCAL, False),
        ("https://evil.example", LOCAL, False),
        ("https://app.example", LISTED, True),
        ("http://127.0.0.1:8000", REMOTE, True),  # the frontend's own page (same host)
    ],
)
def test_which_origins_pass(origin, settings, allowed):
    headers = {"host": "127.0.0.1:8000"} | ({} if origin is None else {"origin": origin})
    assert origin_allowed(headers, settings) is allowed


@pytest.mark.parametrize(
    ("origin", "local"),
    [
        ("null", True),
        ("http://localhost", True),
        ("http://LOCALHOST:1", True),
        ("http://[::1]", True),
        ("ws://localhost", False),
        ("file://", False),
        ("http://localhost:", False),
        ("http://localhost:80a", False),
        ("http://[::1]x", False),
        ("NULL", False),
    ],
)
def test_what_a_local_origin_is(origin, local):
    assert local_origin(origin) is local


def test_local_origins_are_on_for_up_without_auth_and_off_otherwise():
    assert Settings.from_env({}).local_origins is False  # `thoughtwire api`
    assert Settings.from_env({}).for_embedded().local_origins is True  # `thoughtwire up`
    assert Settings.from_env({"JWT_SECRET": "s" * 32}).for_embedded().local_origins is False
    off = {"THOUGHTWIRE_ALLOW_LOCAL_ORIGINS": "0"}
    assert Settings.from_env(off).for_embedded().local_origins is False
    on = {"THOUGHTWIRE_ALLOW_LOCAL_ORIGINS": "1", "JWT_SECRET": "s" * 32}
    assert Settings.from_env(on).local_origins is True


def test_refused_origins_are_warned_once_each_and_remembered_up_to_a_bound(monkeypatch, caplog):
    """200 origins, each refused twice: 64 warnings (one each, up to the bound), 400 refusals."""
    monkeypatch.setattr(auth, "_warned_origins", set())
    refusals = []
    with caplog.at_level(logging.WARNING, logger="thoughtwire.auth"):
        for round_ in range(2):
            for i in range(200):
                headers = {"host": "127.0.0.1:8000", "origin": f"https://site{i}.example"}
                with pytest.raises(AuthError) as refused:
                    check_origin(headers, REMOTE, 1008)
                refusals.append((round_, refused.value.code, refused.value.message))
    warnings = [r for r in caplog.records if r.name == "thoughtwire.auth"]
    print(f"{len(refusals)} refusals, {len(warnings)} warnings")
    assert len(refusals) == 400
    assert {(code, message) for _, code, message in refusals} == {(1008, ORIGIN_REFUSAL)}
    assert len(warnings) == auth.WARNED_ORIGINS == len(auth._warned_origins)
    assert all("THOUGHTWIRE_ALLOWED_ORIGINS" in r.getMessage() for r in warnings)
