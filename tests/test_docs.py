"""The docs stay true: docs/protocol.md names everything the code sends and accepts, and
its complete JavaScript example runs, in chromium, against real frontends."""

from __future__ import annotations

import re
import secrets
import time
from collections.abc import Iterator
from pathlib import Path
from typing import get_args

import jwt
import pytest

from tests.browser import browser_context
from tests.conftest import Cluster, start_cluster
from tests.procs import RedisServer, seconds
from thoughtwire.api.http import router
from thoughtwire.api.recovery import GapReason
from thoughtwire.api.sockets import routes as socket_routes
from thoughtwire.shared.closecodes import Close, ErrorCode
from thoughtwire.shared.protocol import (
    EVENT_TYPES,
    ClientMessage,
    ProtocolError,
    parse_client_message,
)

ROOT = Path(__file__).parent.parent
PROTOCOL = (ROOT / "docs" / "protocol.md").read_text()
SOURCES = [*(ROOT / "api").glob("*.py"), *(ROOT / "shared").glob("*.py")]


def code_text() -> str:
    return "\n".join(path.read_text() for path in SOURCES)


def client_message_types() -> list[str]:
    """The ``type`` of each client message class (their names are their wire names)."""
    return [cls.__name__.lower() for cls in get_args(ClientMessage)]


def test_every_client_message_type_is_real_and_documented():
    types = client_message_types()
    assert len(types) == 8
    for kind in types:
        try:
            parse_client_message(f'{{"type": "{kind}"}}', max_prompt_chars=100)
        except ProtocolError as exc:
            assert exc.code != "unknown_type", kind  # missing fields, but a known type
        assert f'{{"type":"{kind}"' in PROTOCOL, f"docs/protocol.md has no {kind} message"


def test_every_event_type_is_documented():
    for kind in EVENT_TYPES:
        assert f"| `{kind}` |" in PROTOCOL, f"docs/protocol.md does not describe {kind} events"


def test_every_reply_the_code_sends_is_documented():
    """Each ``reply("X", ...)`` and ``"type": "X"`` frame the frontend makes has a row."""
    text = code_text()
    sent = set(re.findall(r'\breply\(\s*"(\w+)"', text))
    sent |= set(re.findall(r'"type":\s*"(\w+)"', text)) - {"http", "function", "object"}
    sent.add("error")  # error_reply
    assert {"session", "ping", "gap", "reconnect", "personal", "broadcast"} <= sent
    for kind in sent:
        assert f'`{{"type":"{kind}"' in PROTOCOL, f"docs/protocol.md has no {kind} reply"


def test_every_error_code_is_documented():
    """Each code an ``error`` reply can carry: every ``ErrorCode``, and any code still
    spelled as a string."""
    text = code_text()
    codes = set(re.findall(r'\berror_reply\(\s*[\'"](\w+)[\'"]', text))
    codes |= set(re.findall(r'\bProtocolError\(\s*"(\w+)"', text))
    codes |= {code.value for code in ErrorCode}
    assert {"bad_json", "rate_limited", "unavailable", "token_expired"} <= codes
    for code in codes:
        assert f"`{code}`" in PROTOCOL, f"docs/protocol.md does not explain error code {code}"


def test_every_gap_reason_and_close_code_is_documented():
    for reason in GapReason:
        assert f"| `{reason.value}` |" in PROTOCOL, reason
    for code in Close:
        assert f"| {code.value} |" in PROTOCOL, code


def test_every_endpoint_is_documented():
    for path in socket_routes.paths:
        assert f"`{path}`" in PROTOCOL, path
    for route in router.routes:
        for method in route.methods:
            assert f"`{method} {route.path}" in PROTOCOL, f"{method} {route.path}"


# --- the complete JavaScript example, run -----------------------------------------

SECRET = secrets.token_urlsafe(32)


def example_page() -> str:
    """The html block under "A complete page" in docs/protocol.md."""
    section = PROTOCOL[PROTOCOL.index("### A complete page") :]
    found = re.search(r"```html\n(.*?)```", section, re.S)
    assert found is not None
    return found[1]


def token(user: str) -> str:
    now = int(time.time())
    return jwt.encode({"sub": user, "iat": now, "exp": now + 3600}, SECRET, algorithm="HS256")


@pytest.fixture(scope="module")
def secure(redis_server: RedisServer, logdir: Path) -> Iterator[Cluster]:
    """Two frontends with authentication, one worker, runs paced to take about 1.5 s."""
    c = start_cluster(
        redis_server,
        logdir,
        JWT_SECRET=SECRET,
        THOUGHTWIRE_SIM_TOKENS_PER_SECOND="20",
        THOUGHTWIRE_SIM_ANSWER_TOKENS="30",
    )
    yield c
    c.stop()


async def open_example(context, frontend, fragment: str):
    """The example page, at the frontend's origin, as a page of one's own served there.

    Written into a page the frontend served (not fulfilled by the browser's test hooks:
    chromium counts such a page as a public one and blocks its sockets to 127.0.0.1).
    """
    page = await context.new_page()
    await page.goto(f"{frontend.http}/healthz#{fragment}")
    await page.set_content(example_page())
    await page.wait_for_function("document.body.dataset.session", timeout=seconds(10) * 1000)
    return page


@pytest.mark.browser
async def test_the_complete_javascript_example_runs(secure):
    """Signs in from the fragment, prompts, stops a run, shares; the link reads on B, read-only."""
    a, b = secure.frontends
    wait = seconds(20) * 1000
    async with browser_context() as context:
        page = await open_example(context, a, f"token={token('ada')}")
        assert await page.text_content("#state") == "connected"
        await page.fill("#prompt", "What is machine learning?")
        await page.click("button:has-text('Send')")
        await page.wait_for_selector("[data-status=done]", timeout=wait)
        assert "thinking: " in await page.text_content("#log ol")
        answer = await page.text_content("#log article p")
        assert answer and answer.strip()

        await page.fill("#prompt", "and now a long one")
        await page.click("button:has-text('Send')")
        await page.wait_for_function(
            "document.querySelectorAll('#log article')[1]?.querySelector('p').textContent",
            timeout=wait,
        )
        await page.click("#stop")
        await page.wait_for_selector("[data-status=cancelled]", timeout=wait)

        await page.click("#share")
        await page.wait_for_function("document.getElementById('link').textContent", timeout=wait)
        link = await page.text_content("#link")
        assert link is not None and link.startswith(f"{a.http}/#session=")

        viewer = await open_example(context, b, link.split("#", 1)[1])
        await viewer.wait_for_selector("[data-status=cancelled]", timeout=wait)
        assert await viewer.text_content("#log article p") == answer  # the same run, on B
        await viewer.fill("#prompt", "may I?")
        await viewer.click("button:has-text('Send')")
        await viewer.wait_for_function(
            "document.getElementById('notice').textContent.includes('prompt refused')",
            timeout=wait,
        )
        assert await viewer.locator("#log article").count() == 2  # nothing ran


# --- links ------------------------------------------------------------------------

LINKED_PAGES = ["protocol.md", "troubleshooting.md", "deploy.md"]


def anchors(markdown: str) -> set[str]:
    """The anchors GitHub gives a page's headings."""
    found = set()
    for heading in re.findall(r"^#+ (.+)$", markdown, re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        found.add(slug)
    return found


@pytest.mark.parametrize("name", LINKED_PAGES)
def test_every_link_of_the_page_leads_somewhere(name):
    page = ROOT / "docs" / name
    for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
        if re.match(r"[a-z]+:", target):
            continue  # another site
        path, _, anchor = target.partition("#")
        linked = (page.parent / path).resolve() if path else page
        assert linked.exists(), f"{name} links to {target}: no such file"
        if anchor:
            assert anchor in anchors(linked.read_text()), f"{name} links to {target}: no heading"


# --- where to add -----------------------------------------------------------------

ARCHITECTURE = (ROOT / "docs" / "architecture.md").read_text()
EXTENSIONS = ("an agent", "a transport", "a Redis topology", "a metric", "an event type")


def where_to_add() -> dict[str, tuple[str, str]]:
    """docs/architecture.md's "Where to add" table: extension -> (file to add, registry)."""
    section = ARCHITECTURE.split("## Where to add", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 3 and cells[0] not in ("To add", "---"):
            rows[cells[0]] = (cells[1], cells[2])
    return rows


def defines(path: Path, name: str) -> bool:
    """Whether the module at ``path`` defines ``name`` (a class, function or assignment)."""
    pattern = rf"^\s*(?:(?:async )?def |class ){name}\b|^\s*(?:self\.)?{name}\b[^=\n]*=[^=]"
    return re.search(pattern, path.read_text(), re.M) is not None


def test_where_to_add_names_each_extension_and_only_what_exists():
    rows = where_to_add()
    for extension in EXTENSIONS:
        assert any(row.startswith(extension) for row in rows), f"no row for {extension}"
    checked = 0
    for extension, cells in rows.items():
        text = " ".join(cells)
        for path in re.findall(r"`([\w./-]+\.(?:py|md|js))`", text):
            assert (ROOT / path).exists(), f"{extension}: {path} does not exist"
            checked += 1
        for name, path in re.findall(r"`(\w+)` in `([\w./-]+\.py)`", text):
            assert defines(ROOT / path, name), f"{extension}: {path} defines no {name}"
            checked += 1
    assert checked >= 10, checked


def test_where_to_add_says_so_while_no_metrics_registry_exists():
    """The map says metrics have no registry yet; once a metrics module appears, the
    map must name it instead."""
    metric = next(cells for extension, cells in where_to_add().items() if "metric" in extension)
    modules = ("shared/metrics.py", "api/metrics.py", "worker/metrics.py")
    if "none yet" in metric[1]:
        assert not any((ROOT / p).exists() for p in modules), "name the metrics registry"
