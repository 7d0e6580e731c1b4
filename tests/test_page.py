"""The page at `/`, in real headless chromium, against real frontends with authentication on.

A user opens `/#token=T`, prompts, stops a run, shares a read-only link that a second
browser opens on the other frontend; answers are Markdown that runs nothing; a tool call
that needs approval shows Allow and Deny to the owner and not on a viewer link, and Allow
lets the run go on; axe finds no serious or critical violation in light or dark mode;
screenshots go to the log folder (and to docs/img with ``SCREENSHOTS_DIR``,
as ``make screenshots`` sets it).

Some tests play a recorded protocol v2 session to the page through a stand-in socket,
with the page's files served from the checkout: what they show does not depend on an
agent's timing.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import shutil
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
from playwright.async_api import BrowserContext, Page, Route

from tests.browser import browser_context
from tests.conftest import Cluster, openai_env, start_cluster
from tests.fake_openai import FakeOpenAI, Reply
from tests.procs import RedisServer, seconds
from thoughtwire.api.app import PAGE_POLICY
from thoughtwire.worker.agents.simulated import answer_tokens

pytestmark = pytest.mark.browser

SECRET = "page-test-secret-0123456789abcdef0123456789"
ANSWER_TOKENS = 40
ROOT = Path(__file__).resolve().parent.parent
AXE = ROOT / ".cache/npm/node_modules/axe-core/axe.min.js"
WAIT_MS = seconds(15) * 1000


def token_for(user: str) -> str:
    now = int(time.time())
    return jwt.encode({"sub": user, "iat": now, "exp": now + 3600}, SECRET, algorithm="HS256")


def expected_answer() -> str:
    """What the simulated agent answers in ANSWER_TOKENS tokens, as one line of words."""
    return " ".join("".join(answer_tokens(ANSWER_TOKENS)).split())


@pytest.fixture(scope="module")
def cluster(redis_server: RedisServer, logdir: Path) -> Iterator[Cluster]:
    """Two frontends with authentication on; runs take about two seconds, long enough to stop."""
    c = start_cluster(
        redis_server,
        logdir,
        frontends=2,
        JWT_SECRET=SECRET,
        THOUGHTWIRE_SIM_STEP_DELAY="0.05",
        THOUGHTWIRE_SIM_TOKENS_PER_SECOND="20",
        THOUGHTWIRE_SIM_ANSWER_TOKENS=str(ANSWER_TOKENS),
    )
    yield c
    c.stop()


@pytest.fixture(scope="module")
def approvals(redis_server: RedisServer, logdir: Path) -> Iterator[Cluster]:
    """Two frontends with authentication on, whose simulated agent asks before its "search"."""
    c = start_cluster(
        redis_server,
        logdir,
        frontends=2,
        JWT_SECRET=SECRET,
        THOUGHTWIRE_APPROVAL_TOOLS="search",
        THOUGHTWIRE_SIM_STEP_DELAY="0.02",
        THOUGHTWIRE_SIM_TOKENS_PER_SECOND="50",
        THOUGHTWIRE_SIM_ANSWER_TOKENS=str(ANSWER_TOKENS),
    )
    yield c
    c.stop()


@pytest.fixture(scope="module")
def model(redis_server: RedisServer, logdir: Path) -> Iterator[tuple[Cluster, FakeOpenAI]]:
    """One frontend with authentication on, whose worker's openai agent talks to a scripted
    model and asks before it uses the calculator."""
    llm = FakeOpenAI().start()
    c = start_cluster(
        redis_server,
        logdir,
        frontends=1,
        JWT_SECRET=SECRET,
        THOUGHTWIRE_APPROVAL_TOOLS="calculator",
        **openai_env(llm),
    )
    yield c, llm
    c.stop()
    llm.stop()


@pytest.fixture(scope="session")
def axe_source() -> str:
    """axe-core from the npm registry, pinned by scripts/npm-test-deps and kept out of the tree."""
    if not AXE.exists():
        subprocess.run([str(ROOT / "scripts/npm-test-deps")], check=True, timeout=seconds(120))
    return AXE.read_text()


@dataclass
class Tab:
    """A page and what it said: dialogs opened, and errors in its console or uncaught."""

    page: Page
    dialogs: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    dismissals: list[asyncio.Future[None]] = field(default_factory=list)


async def open_tab(context: BrowserContext, url: str, *, init_script: str | None = None) -> Tab:
    page = await context.new_page()
    tab = Tab(page)

    def dialog(d: Any) -> None:
        tab.dialogs.append(d.message)
        tab.dismissals.append(asyncio.ensure_future(d.dismiss()))

    page.on("dialog", dialog)
    page.on("console", lambda m: m.type == "error" and tab.errors.append(m.text))
    page.on("pageerror", lambda e: tab.errors.append(str(e)))
    if init_script is not None:
        await page.add_init_script(script=init_script)
    await page.goto(url)
    await page.wait_for_function("() => document.body.dataset.session", timeout=WAIT_MS)
    return tab


async def prompt(page: Page, text: str) -> int:
    """Send a prompt from the page; the number of run cards there will be once its run shows."""
    before = await page.locator(".run").count()
    await page.fill("#prompt", text)
    await page.click("#send")
    await page.wait_for_function(
        "n => document.querySelectorAll('.run').length > n", arg=before, timeout=WAIT_MS
    )
    return before + 1


async def ended(page: Page, count: int, status: str = "done") -> None:
    await page.wait_for_function(
        "([n, s]) => document.querySelectorAll(`.run[data-status=${s}]`).length >= n",
        arg=[count, status],
        timeout=WAIT_MS,
    )


async def job_status(frontend_http: str, run: str, token: str) -> str:
    async with httpx.AsyncClient() as http:
        reply = await http.get(
            f"{frontend_http}/v1/jobs/{run}", headers={"Authorization": f"Bearer {token}"}
        )
    reply.raise_for_status()
    return str(reply.json()["status"])


@pytest.fixture
async def context() -> AsyncIterator[BrowserContext]:
    async with browser_context() as c:
        yield c


async def test_a_user_opens_a_token_link_prompts_and_sees_the_run_complete(cluster, context):
    a = cluster.frontends[0]
    tab = await open_tab(context, f"{a.http}/#token={token_for('alice')}")
    page = tab.page
    assert "token" not in await page.evaluate("location.href"), "the token stays in the bar"
    assert await page.text_content("#connection-text") == "Connected"
    assert await page.get_attribute("#runs", "role") == "log"
    assert await page.get_attribute("#runs", "aria-live") == "polite"

    await prompt(page, "What is machine learning?")
    await ended(page, 1)
    card = page.locator(".run").first
    assert await card.locator(".prompt-text").text_content() == "What is machine learning?"
    assert await card.locator(".badge").text_content() == "Done"
    assert " ".join((await card.locator(".answer").inner_text()).split()) == expected_answer()
    # The simulated agent's two thinking lines, its search (a tool card with its arguments
    # and result inside), one more thinking line, the answer.
    assert await shown_blocks(card) == ["reasoning", "tool", "reasoning", "answer"]
    thinking = await card.locator(".reasoning-text").first.text_content()
    assert thinking == "Analyzing the question...\nI need to search for information"
    tool = card.locator(".tool")
    assert await tool.locator(".tool-name").text_content() == "search"
    assert json.loads(await tool.locator(".tool-args").text_content() or "") == {
        "query": "What is machine learning?"
    }
    assert await tool.locator(".tool-output").text_content() == (
        "Found: relevant results about What is machine learning?"
    )
    assert await tool.get_attribute("data-status") == "done"
    reasoning = card.locator("details.reasoning").first
    assert not await reasoning.evaluate("d => d.open"), "an ended run folds its reasoning away"
    await reasoning.locator("summary").click()
    assert await reasoning.evaluate("d => d.open")
    assert tab.errors == [] and tab.dialogs == []


async def test_a_prompt_labels_its_own_run_not_another_writers_queued_before_it(cluster, context):
    """The session has a run going and one queued behind it, both from the HTTP API; the
    page's prompt is the third. The queued run's first event comes first, and its card
    says it came from elsewhere: the page's prompt labels the run its frontend named.
    Before, the page gave its prompt to the first new run it saw."""
    a = cluster.frontends[0]
    tok = token_for("alice")
    tab = await open_tab(context, f"{a.http}/#token={tok}")
    page = tab.page
    session = await page.evaluate("document.body.dataset.session")
    async with httpx.AsyncClient(headers={"Authorization": f"Bearer {tok}"}) as http:
        first = await http.post(f"{a.http}/v1/jobs", json={"prompt": "one", "session": session})
        await page.wait_for_selector(f'.run[data-run="{first.json()["job"]}"]', timeout=WAIT_MS)
        second = await http.post(f"{a.http}/v1/jobs", json={"prompt": "two", "session": session})
    await page.fill("#prompt", "mine")
    await page.click("#send")
    await ended(page, 3)
    labels = await page.evaluate(
        """() => Object.fromEntries([...document.querySelectorAll('.run')].map(
             (card) => [card.dataset.run, card.querySelector('.prompt-text').textContent]))"""
    )
    print(labels)
    others = {first.json()["job"], second.json()["job"]}
    assert {run for run, label in labels.items() if label == "mine"}.isdisjoint(others)
    assert list(labels.values()).count("mine") == 1
    assert labels[second.json()["job"]] == "(sent from another tab or client)"
    assert tab.errors == []


async def test_a_refused_prompt_goes_back_in_the_box_with_the_reason(cluster, context, logdir):
    """A prompt the frontend refuses (here: longer than THOUGHTWIRE_MAX_PROMPT_CHARS) is
    said in the log with the reason, and its text is back in the box to edit and send
    again. Before, the box stayed empty and the text was gone."""
    a = cluster.frontends[0]
    tab = await open_tab(context, f"{a.http}/#token={token_for('alice')}")
    page = tab.page
    long = "word " * 6401  # 32,005 characters
    await page.fill("#prompt", long)
    await page.click("#send")
    error = page.locator("#runs .notice.error")
    await error.wait_for(timeout=WAIT_MS)
    said = await error.text_content() or ""
    assert said == "Not sent: prompt is longer than 32000 characters. It is back in the box."
    assert await page.input_value("#prompt") == long.strip()
    assert await page.locator(".run").count() == 0
    await page.screenshot(path=str(logdir / "page-refused-prompt.png"))


SHOWN_BLOCKS = """card => [...card.querySelector('.run-body').children].map(el =>
    el.classList.contains('reasoning') ? 'reasoning' : el.classList.contains('tool') ? 'tool'
      : el.classList.contains('answer') ? 'answer' : el.className)"""


async def shown_blocks(card: Any) -> list[str]:
    """What a run card shows, in order: reasoning, tool (a call and its result), answer."""
    shown: list[str] = await card.evaluate(SHOWN_BLOCKS)
    return shown


async def test_sign_in_field_takes_a_token(cluster, context):
    page = await context.new_page()
    await page.goto(cluster.frontends[1].http + "/")
    await page.wait_for_selector("#signin", state="visible", timeout=WAIT_MS)
    assert await page.get_attribute("body", "data-state") == "offline"
    assert await page.locator("#composer").is_hidden()
    await page.fill("#token", token_for("bob"))
    await page.click("#signin button[type=submit]")
    await page.wait_for_function("() => document.body.dataset.session", timeout=WAIT_MS)
    assert await page.locator("#composer").is_visible()
    await prompt(page, "hello")
    await ended(page, 1)


async def test_stop_ends_the_run_cancelled_within_a_second(cluster, context):
    """Stop to `cancelled` on the page: measured 9 ms here; the bound is 1 s (no Stop before)."""
    a = cluster.frontends[0]
    token = token_for("carol")
    page = (await open_tab(context, f"{a.http}/#token={token}")).page
    await prompt(page, "a long question")
    await page.wait_for_function(
        "() => document.querySelector('.run .answer')?.textContent.length > 0", timeout=WAIT_MS
    )
    await page.evaluate(
        """() => {
          const card = document.querySelector('.run');
          card.querySelector('.stop').addEventListener('click', () => {
            window.stopClicked = performance.now();
          }, { capture: true });
          new MutationObserver(() => {
            if (card.dataset.status === 'cancelled' && !window.stopEnded) {
              window.stopEnded = performance.now();
            }
          }).observe(card, { attributes: true });
        }"""
    )
    await page.click(".run .stop")
    await ended(page, 1, "cancelled")
    elapsed = await page.evaluate("window.stopEnded - window.stopClicked")
    print(f"Stop to cancelled: {elapsed:.0f} ms")
    assert elapsed < 1000, f"the run took {elapsed:.0f} ms to end after Stop"
    run = await page.get_attribute(".run", "data-run")
    assert await job_status(a.http, str(run), token) == "cancelled"
    assert await page.locator(".run .badge").text_content() == "Stopped"
    assert await page.locator(".run .stop").count() == 0


async def test_a_viewer_link_on_the_other_frontend_follows_live_and_cannot_prompt(cluster, logdir):
    a, b = cluster.frontends
    async with browser_context() as owner_context, browser_context() as viewer_context:
        owner = (await open_tab(owner_context, f"{a.http}/#token={token_for('dave')}")).page
        await prompt(owner, "first question")
        await ended(owner, 1)

        await owner.click("#share")
        await owner.wait_for_function(
            "() => document.querySelector('#share-link').value", timeout=WAIT_MS
        )
        link = await owner.input_value("#share-link")
        session = await owner.evaluate("document.body.dataset.session")
        assert link.startswith(f"{a.http}/#session={session}&token=")
        await owner.click("#share-dialog button[type=submit]")

        viewer_tab = await open_tab(viewer_context, link.replace(a.http, b.http))
        viewer = viewer_tab.page
        assert await viewer.evaluate("document.body.dataset.session") == session
        assert "token" not in await viewer.evaluate("location.href")
        await ended(viewer, 1)  # the run so far, from the session's log
        assert "Viewing read-only" in (await viewer.text_content("#readonly") or "")
        assert await viewer.locator("#composer").is_hidden()
        assert await viewer.locator("#prompt").is_hidden()
        assert await viewer.locator(".stop").count() == 0

        # Live: the owner's next run shows up on the viewer while it runs.
        await prompt(owner, "second question")
        await viewer.wait_for_selector(".run:nth-of-type(2)[data-status=running]", timeout=WAIT_MS)
        assert await viewer.locator(".stop").count() == 0
        await ended(owner, 2)
        await ended(viewer, 2)
        theirs = await owner.locator(".run .answer").all_inner_texts()
        mine = await viewer.locator(".run .answer").all_inner_texts()
        assert mine == theirs and len(mine) == 2
        (logdir / "screenshots").mkdir(exist_ok=True)
        await viewer.screenshot(path=str(logdir / "screenshots" / "viewer.png"))
        assert viewer_tab.errors == [] and viewer_tab.dialogs == []


async def test_a_viewer_link_to_a_session_gone_says_so_and_offers_no_reconnect(cluster, context):
    """A viewer link whose session is gone (expired, so it has no owner any more): the
    frontend refuses it for good (4003); the banner says the link no longer grants
    access, and no Reconnect is offered, which would only be refused again."""
    from thoughtwire.api.auth import Authenticator
    from thoughtwire.shared.settings import Settings

    link_token = Authenticator(Settings(jwt_secret=SECRET)).viewer_token("ann", "s-gone")[0]
    page = await context.new_page()
    await page.goto(f"{cluster.frontends[0].http}/#session=s-gone&token={link_token}")
    await page.wait_for_function("() => document.body.dataset.state === 'offline'", timeout=WAIT_MS)
    assert "no longer grants access" in (await page.text_content("#readonly-text") or "")
    assert await page.locator("#retry").is_hidden()


# Counts the page's loads in the tab, to tell one reload from a loop of them.
COUNT_LOADS = (
    "sessionStorage.setItem('loads', String(Number(sessionStorage.getItem('loads') ?? 0) + 1));"
)


async def test_a_link_opened_in_a_tab_on_the_page_is_taken_as_if_opened_fresh(
    cluster, context, logdir
):
    """The owner's tab shows the page; a viewer link to another session is opened in the
    same tab, which changes only the fragment. The page takes it as a fresh open of the
    link would: the token leaves the address bar, replaces the tab's own, and the page
    follows the link's session read-only, after one reload. The owner's token link,
    opened the same way, makes the tab the owner's again, on a new session. Before, the
    page ignored the change: the token stayed in the address bar and the page on the
    old session."""
    a = cluster.frontends[0]
    bob = (await open_tab(context, f"{a.http}/#token={token_for('bob')}")).page
    await prompt(bob, "bob's question")
    await ended(bob, 1)
    theirs = await bob.evaluate("document.body.dataset.session")
    their_run = await bob.get_attribute(".run", "data-run")
    link_token = await mint_viewer_token(a.http, theirs, token_for("bob"))
    await bob.close()

    owner_token = token_for("alice")
    tab = await open_tab(context, f"{a.http}/#token={owner_token}", init_script=COUNT_LOADS)
    page = tab.page
    mine = await page.evaluate("document.body.dataset.session")
    await prompt(page, "alice's question")
    await ended(page, 1)

    link = f"{a.http}/#session={theirs}&token={link_token}"
    await page.evaluate("link => { location.href = link; }", link)  # only the fragment changes
    await page.wait_for_function(
        "s => document.body.dataset.session === s", arg=theirs, timeout=WAIT_MS
    )
    assert await page.evaluate("location.hash") == f"#session={theirs}"
    await ended(page, 1)
    assert await page.locator(".run").count() == 1
    assert await page.get_attribute(".run", "data-run") == their_run
    assert await page.locator("#readonly").is_visible()
    assert await page.locator("#composer").is_hidden()
    # As a fresh open of the link in this tab: its token is the tab's token now.
    assert await page.evaluate("sessionStorage.getItem('thoughtwire.token')") == link_token
    assert await page.evaluate("sessionStorage.getItem('loads')") == "2"
    (logdir / "screenshots").mkdir(exist_ok=True)
    await page.screenshot(path=str(logdir / "screenshots" / "page-link-in-same-tab.png"))

    await page.evaluate("link => { location.href = link; }", f"{a.http}/#token={owner_token}")
    await page.wait_for_function(
        "s => document.body.dataset.session && document.body.dataset.session !== s",
        arg=theirs,
        timeout=WAIT_MS,
    )
    assert "token" not in await page.evaluate("location.href")
    assert await page.evaluate("document.body.dataset.session") != mine  # as /#token=T does
    assert await page.locator("#readonly").is_hidden()
    assert await page.locator("#composer").is_visible()
    assert await page.evaluate("sessionStorage.getItem('thoughtwire.token')") == owner_token
    assert await page.evaluate("sessionStorage.getItem('loads')") == "3"
    assert tab.errors == [] and tab.dialogs == []


async def test_the_indicator_shows_a_frontend_restart_and_the_run_completes_once(
    redis_server, logdir, context
):
    """The page's frontend restarts mid-run: it says Reconnecting, then Resumed, and the
    answer arrives whole, nothing twice."""
    c = start_cluster(
        redis_server,
        logdir,
        frontends=1,
        JWT_SECRET=SECRET,
        THOUGHTWIRE_SIM_STEP_DELAY="0.05",
        THOUGHTWIRE_SIM_TOKENS_PER_SECOND="10",
        THOUGHTWIRE_SIM_ANSWER_TOKENS=str(ANSWER_TOKENS),
    )
    try:
        a = c.frontends[0]
        page = (await open_tab(context, f"{a.http}/#token={token_for('judy')}")).page
        await page.evaluate(
            """() => {
              window.states = [];
              new MutationObserver(() => window.states.push(document.body.dataset.state))
                .observe(document.body, { attributes: true, attributeFilter: ['data-state'] });
            }"""
        )
        await prompt(page, "survive a restart")
        await page.wait_for_function(
            "() => document.querySelector('.run .answer')?.textContent.length > 0",
            timeout=WAIT_MS,
        )
        await asyncio.to_thread(a.proc.stop)  # SIGTERM: the frontend drains, then exits
        await page.wait_for_function(
            "() => document.body.dataset.state === 'reconnecting'", timeout=WAIT_MS
        )
        assert await page.text_content("#connection-text") == "Reconnecting…"
        await asyncio.to_thread(a.start)  # the same port again
        await ended(page, 1)
        await page.wait_for_function(
            "() => document.body.dataset.state === 'resumed'", timeout=seconds(30) * 1000
        )
        assert await page.text_content("#connection-text") == "Resumed"
        answer = await page.locator(".run .answer").inner_text()
        assert " ".join(answer.split()) == expected_answer()
        card = page.locator(".run")
        assert await shown_blocks(card) == ["reasoning", "tool", "reasoning", "answer"]
        assert await page.locator(".tool-output").count() == 1
        print("states:", await page.evaluate("window.states"))
    finally:
        c.stop()


AT_BOTTOM = "() => innerHeight + scrollY >= document.documentElement.scrollHeight - 2"


async def test_autoscroll_stops_when_the_reader_scrolls_up_and_resumes_at_the_bottom(
    cluster, context
):
    page = (await open_tab(context, f"{cluster.frontends[0].http}/#token={token_for('ivan')}")).page
    await page.set_viewport_size({"width": 390, "height": 500})
    for runs in range(1, 5):  # enough runs that the page scrolls by more than a window
        await prompt(page, "fill the window")
        await ended(page, runs)
        if await page.evaluate("document.documentElement.scrollHeight > 2 * innerHeight"):
            break
    else:
        raise AssertionError("four runs do not fill two windows")

    await prompt(page, "scroll away from me")
    await page.wait_for_selector(f".run:nth-of-type({runs + 1}) .reasoning", timeout=WAIT_MS)
    assert await page.evaluate(AT_BOTTOM)
    await page.evaluate("window.scrollTo(0, 0)")  # the reader goes up to read
    await ended(page, runs + 1)
    assert await page.evaluate("scrollY") == 0, "the page kept the reader where they were"
    assert await page.locator("#jump").is_visible()
    await page.click("#jump")
    assert await page.evaluate(AT_BOTTOM)
    assert await page.locator("#jump").is_hidden()

    await prompt(page, "and back down")
    await page.wait_for_selector(f".run:nth-of-type({runs + 2}) .reasoning", timeout=WAIT_MS)
    await page.evaluate("window.scrollTo(0, 0)")
    await page.evaluate("window.scrollTo(0, document.documentElement.scrollHeight)")
    height = await page.evaluate("document.documentElement.scrollHeight")
    await ended(page, runs + 2)
    assert await page.evaluate("document.documentElement.scrollHeight") > height
    assert await page.evaluate(AT_BOTTOM), "back at the bottom, the page follows again"


HOSTILE = (
    '<img src=x onerror="window.pwned = 1"><script>window.pwned = 2</script>'
    '<svg onload="window.pwned = 3"></svg><iframe src="javascript:window.pwned = 4"></iframe>'
    "[click me](javascript:window.pwned=5)"
)


async def test_a_markdown_answer_with_script_payloads_renders_and_runs_nothing(model, context):
    cluster, llm = model
    markdown = "Here is **bold**, `code` and a list:\n\n- one\n- two\n\n"
    llm.replies.append(Reply.text(markdown[:9], markdown[9:], HOSTILE[:30], HOSTILE[30:]))
    tab = await open_tab(context, f"{cluster.frontends[0].http}/#token={token_for('eve')}")
    page = tab.page
    await prompt(page, "say something nasty")
    await ended(page, 1)
    answer = page.locator(".run .answer")
    assert await answer.locator("strong").text_content() == "bold"
    assert await answer.locator("li").count() == 2
    assert await page.locator("#runs script, #runs iframe, #runs svg").count() == 0
    handlers = await page.evaluate(
        """() => [...document.querySelectorAll('#runs *')].flatMap(el =>
             [...el.attributes].filter(a => a.name.startsWith('on') ||
               /^\\s*javascript:/i.test(a.value)).map(a => el.tagName + ' ' + a.name))"""
    )
    assert handlers == []
    if await answer.locator("a").count():
        await answer.locator("a").first.click()
    assert await page.evaluate("window.pwned") is None
    assert tab.dialogs == []


# --- approvals, against real frontends and a worker -----------------------------------


async def waiting_for_approval(page: Page) -> None:
    await page.wait_for_selector(".tool[data-status=waiting]", timeout=WAIT_MS)


async def test_the_owner_allows_a_tool_call_and_a_viewer_link_shows_no_buttons(approvals):
    """The run asks before its search: the owner's page shows Allow and Deny on the tool
    card, a viewer link on the other frontend shows the card waiting with no buttons;
    Allow on the owner's page lets the run go on to its answer on both."""
    a, b = approvals.frontends
    async with browser_context() as owner_context, browser_context() as viewer_context:
        owner_tab = await open_tab(owner_context, f"{a.http}/#token={token_for('oscar')}")
        owner = owner_tab.page
        await prompt(owner, "Is it safe to search?")
        await waiting_for_approval(owner)
        card = owner.locator(".run")
        assert await card.get_attribute("data-status") == "waiting"
        assert await card.locator(".badge").text_content() == "Waiting for approval"
        tool = card.locator(".tool")
        assert await tool.locator(".tool-name").text_content() == "search"
        assert json.loads(await tool.locator(".tool-args").text_content() or "") == {
            "query": "Is it safe to search?"
        }
        assert await tool.locator("button.allow").is_visible()
        assert await tool.locator("button.deny").is_visible()
        assert await tool.locator(".tool-output").is_hidden(), "no result before the decision"

        session = await owner.evaluate("document.body.dataset.session")
        viewer_token = await mint_viewer_token(a.http, session, token_for("oscar"))
        viewer_tab = await open_tab(
            viewer_context, f"{b.http}/#session={session}&token={viewer_token}"
        )
        viewer = viewer_tab.page
        await waiting_for_approval(viewer)
        assert await viewer.locator(".tool button").count() == 0, "a viewer cannot approve"
        assert "Waiting for the session's owner" in (
            await viewer.locator(".tool .approval").text_content() or ""
        )

        await tool.locator("button.allow").click()
        await ended(owner, 1)
        await ended(viewer, 1)
        for page in (owner, viewer):
            shown = page.locator(".run .tool")
            assert await shown.get_attribute("data-status") == "done"
            assert (await shown.locator(".approval").text_content() or "").startswith(
                "Allowed by the session's owner"
            )
            assert await shown.locator(".tool-output").text_content() == (
                "Found: relevant results about Is it safe to search?"
            )
            answer = await page.locator(".run .answer").inner_text()
            assert " ".join(answer.split()) == expected_answer()
        assert owner_tab.errors == [] and viewer_tab.errors == []


async def test_deny_on_the_page_marks_the_call_denied_and_the_run_goes_on(approvals, context):
    tab = await open_tab(context, f"{approvals.frontends[0].http}/#token={token_for('peggy')}")
    page = tab.page
    await prompt(page, "search nothing")
    await waiting_for_approval(page)
    await page.fill(".tool .approval input", "not today")
    await page.press(".tool .approval input", "Tab")  # keyboard only: Tab to Allow, then Deny
    await page.keyboard.press("Tab")
    assert await page.evaluate("document.activeElement.textContent") == "Deny"
    await page.keyboard.press("Enter")
    await ended(page, 1)
    tool = page.locator(".run .tool")
    assert await tool.get_attribute("data-status") == "denied"
    assert await tool.locator(".approval").text_content() == (
        "Denied by the session's owner: not today"
    )
    assert await tool.locator(".tool-output").is_visible()
    assert await tool.locator(".label", has_text="Error").count() == 1
    assert tab.errors == []


# Every frame a page's sockets receive, as {type, seq}, in window.__frames.
COUNT_FRAMES = """(() => {
  const Socket = window.WebSocket;
  window.__frames = [];
  window.WebSocket = class extends Socket {
    constructor(url, protocols) {
      super(url, protocols);
      this.addEventListener("message", (m) => {
        const frame = JSON.parse(m.data);
        window.__frames.push({ type: frame.type, seq: frame.seq });
      });
    }
  };
})();"""
PRESENCE_SHOT = "page-presence.png"
ANSWER_ONLY_SHOT = "page-answer-only.png"


async def share_link(page: Page, scope: str) -> str:
    """The viewer link the Share dialog makes for ``scope`` (full or answer)."""
    await page.click("#share")
    await page.check(f"#share-scope input[value={scope}]")
    await page.wait_for_function(
        """scope => {
          const link = document.querySelector('#share-link').value;
          if (!link || document.querySelector('#share-ready').hidden) return false;
          const token = new URLSearchParams(link.split('#')[1]).get('token');
          const claims = JSON.parse(atob(token.split('.')[1].replace(/-/g, '+').replace(/_/g, '/')));
          return (claims.view ?? 'full') === scope;
        }""",
        arg=scope,
        timeout=WAIT_MS,
    )
    link = await page.input_value("#share-link")
    await page.click("#share-dialog button[type=submit]")
    return link


async def watching(page: Page, n: int) -> None:
    await page.wait_for_function(
        "n => document.querySelector('#presence-text').textContent === `${n} watching`",
        arg=n,
        timeout=WAIT_MS,
    )


async def test_an_answer_only_link_joins_by_snapshot_and_both_pages_show_two_watching(
    approvals, logdir
):
    """The owner allows a search, then shares an answer-only link; opened on the other
    frontend after the run, it gets one snapshot (not the log), shows the answer and the
    tool's name only (no reasoning, arguments, result or buttons), and both pages say
    "2 watching"; the viewer's next run streams live."""
    a, b = approvals.frontends
    async with browser_context() as owner_context, browser_context() as viewer_context:
        owner_tab = await open_tab(owner_context, f"{a.http}/#token={token_for('rita')}")
        owner = owner_tab.page
        assert await owner.get_attribute("#presence", "aria-live") == "polite"
        await watching(owner, 1)
        await prompt(owner, "What should I search?")
        await waiting_for_approval(owner)
        await owner.locator(".tool button.allow").click()
        await ended(owner, 1)

        link = await share_link(owner, "answer")
        assert "answers live" in (await owner.text_content("#share-what") or "")
        viewer_tab = await open_tab(
            viewer_context, link.replace(a.http, b.http), init_script=COUNT_FRAMES
        )
        viewer = viewer_tab.page
        await ended(viewer, 1)
        frames = await viewer.evaluate("window.__frames")
        snapshots = [f for f in frames if f["type"] == "snapshot"]
        assert len(snapshots) == 1, frames
        log_length = snapshots[0]["seq"]
        assert len(frames) < log_length, "a late joiner gets the snapshot, not the log"
        assert not [f for f in frames if f.get("seq") is not None and f["type"] != "snapshot"]

        await watching(owner, 2)
        await watching(viewer, 2)
        assert "answers only" in (await viewer.text_content("#readonly-text") or "")
        # A finished run's snapshot keeps its answer (docs/protocol.md, "Snapshots").
        first = viewer.locator(".run").first
        assert await first.locator(".reasoning").count() == 0
        theirs = await owner.locator(".run .answer").inner_text()
        assert " ".join((await first.locator(".answer").inner_text()).split()) == " ".join(
            theirs.split()
        )

        # Live on the answer-only link: the tool's name, no reasoning, arguments or result.
        await prompt(owner, "And now?")
        await waiting_for_approval(viewer)
        card = viewer.locator(".run:nth-of-type(2)")
        tool = card.locator(".tool")
        assert await tool.locator(".tool-name").text_content() == "search"
        assert await tool.locator("button").count() == 0
        await owner.locator(".run:nth-of-type(2) .tool button.allow").click()
        await ended(viewer, 2)
        await ended(owner, 2)
        assert await viewer.locator(".reasoning").count() == 0
        assert await tool.get_attribute("data-status") == "done"
        assert await tool.locator(".tool-args").is_hidden()
        assert await tool.locator(".tool-output").is_hidden()
        assert await tool.locator(".approval").text_content() == "Allowed by the session's owner."
        answers = await owner.locator(".run .answer").all_inner_texts()
        assert [
            " ".join(t.split()) for t in await viewer.locator(".run .answer").all_inner_texts()
        ] == [" ".join(t.split()) for t in answers]

        out = logdir / "screenshots"
        out.mkdir(exist_ok=True)
        keep = os.environ.get("SCREENSHOTS_DIR")
        for page, name in ((owner, PRESENCE_SHOT), (viewer, ANSWER_ONLY_SHOT)):
            await page.set_viewport_size({"width": 1280, "height": 800})
            await page.evaluate(
                "document.querySelector('.run:nth-of-type(2)').scrollIntoView({ block: 'start' })"
            )
            await page.screenshot(path=str(out / name))
            if keep:
                shutil.copyfile(out / name, Path(keep) / name)
        await owner.set_viewport_size({"width": 390, "height": 844})  # the bar wraps: look
        await owner.screenshot(path=str(out / "page-presence-mobile.png"))
        await viewer.close()
        await watching(owner, 1)
        assert owner_tab.errors == [] and viewer_tab.errors == []


async def mint_viewer_token(http: str, session: str, token: str) -> str:
    async with httpx.AsyncClient() as client:
        reply = await client.post(
            f"{http}/v1/sessions/{session}/viewer-token",
            headers={"Authorization": f"Bearer {token}"},
        )
    reply.raise_for_status()
    return str(reply.json()["token"])


# --- a recorded v2 session, played through a stand-in socket -------------------------

PAGE_ORIGIN = "http://thoughtwire.test"
PAGE_FILES = {"/": "api/static/index.html", "/thoughtwire.js": "clients/js/thoughtwire.js"}
TYPES = {".html": "text/html", ".css": "text/css", ".js": "text/javascript"}

# A WebSocket that plays window.__script: steps of {frames} (sent at once), {pause: ms},
# or {waitFor: type} (held until the page sends a frame of that type). What the page
# sends is kept in window.__sent.
FAKE_SOCKET = """(() => {
  window.__sent = [];
  class RecordedSocket {
    constructor(url) {
      this.url = url;
      this.readyState = 0;
      this.step = 0;
      window.__socket = this;
      setTimeout(() => {
        this.readyState = 1;
        this.deliver({ type: "session", session: "s-recorded" });
        this.play(null);
      }, 0);
    }
    deliver(frame) { this.onmessage?.({ data: JSON.stringify(frame) }); }
    play(sent) {
      const script = window.__script || [];
      while (this.step < script.length) {
        const step = script[this.step];
        if (step.waitFor) {
          if (sent?.type !== step.waitFor) return;
          sent = null;
        } else if (step.pause !== undefined) {
          this.step += 1;
          setTimeout(() => this.play(null), step.pause);
          return;
        } else {
          for (const frame of step.frames) this.deliver(frame);
        }
        this.step += 1;
      }
    }
    send(data) {
      const frame = JSON.parse(data);
      window.__sent.push(frame);
      setTimeout(() => this.play(frame), 0);
    }
    close() { this.readyState = 3; }
  }
  window.WebSocket = RecordedSocket;
})();"""


async def serve_checkout(route: Route) -> None:
    """The page's files from the checkout, with the frontend's Content-Security-Policy."""
    path = "/" + route.request.url.removeprefix(PAGE_ORIGIN).lstrip("/").split("#")[0]
    file = PAGE_FILES.get(path) or ("api" + path if path.startswith("/static/") else None)
    if file is None or not (ROOT / file).is_file():
        await route.fulfill(status=404)
        return
    await route.fulfill(
        body=(ROOT / file).read_bytes(),
        content_type=TYPES.get(Path(file).suffix, "text/plain"),
        headers={"Content-Security-Policy": PAGE_POLICY},
    )


class Log:
    """A session's log as a worker writes it in protocol v2: seqs, an epoch, timestamps."""

    def __init__(self, run: str = "r-recorded") -> None:
        self.run = run
        self.frames: list[dict[str, Any]] = []

    def add(self, kind: str, content: Any = "", **fields: Any) -> None:
        seq = len(self.frames) + 1
        self.frames.append(
            {
                "type": kind,
                "content": content,
                "run": self.run,
                "session": "s-recorded",
                "seq": seq,
                "epoch": "e-recorded",
                "ts": 1_700_000_000_000 + 150 * seq,
                **fields,
            }
        )


def weather_run() -> Log:
    """Streamed reasoning, a search whose arguments come in pieces and that needs approval,
    its result, more reasoning, a Markdown answer in deltas, and usage on done."""
    log = Log()
    call = {"tool": "search", "call_id": "call_1"}
    for piece in ("The user asks about ", "the weather in Paris. ", "I should search ", "for it."):
        log.add("thinking", piece, block="b1", delta=True)
    log.add("block_end", block="b1")
    for piece in ('{"query": ', '"weather in ', 'Paris today"}'):
        log.add("tool_input", piece, block="b2", delta=True, **call)
    arguments = {"query": "weather in Paris today"}
    log.add("action", "search", block="b2", delta=False, arguments=arguments, **call)
    log.add(
        "approval", "", block="b2", arguments=arguments, timeout_ms=300000, default="deny", **call
    )
    log.add("decision", "", block="b2", call_id="call_1", decision="allow", reason=None, by="user")
    log.add(
        "observation",
        "Paris: 18 °C, light rain until 16:00, wind 12 km/h.",
        block="b3",
        delta=False,
        is_error=False,
        **call,
    )
    log.add("thinking", "It rains until four: an umbrella is worth it.", block="b4", delta=False)
    answer = (
        "**Paris is 18 °C today**, with light rain until 16:00.\n\n",
        "- Take an umbrella for the morning\n",
        "- A light jacket is enough\n\n",
        "The wind stays under `15 km/h`.",
    )
    for piece in answer:
        log.add("answer", piece, block="b5", delta=True)
    log.add("block_end", block="b5")
    usage = {"prompt_tokens": 412, "completion_tokens": 96, "total_tokens": 508, "estimated": True}
    log.add("done", "", usage=usage, finish_reason="stop")
    return log


def until_approval(log: Log) -> list[dict[str, Any]]:
    """The log played up to its approval, then held until the page sends `approve`."""
    frames = log.frames
    cut = next(i for i, f in enumerate(frames) if f["type"] == "approval") + 1
    return [{"frames": frames[:cut]}, {"waitFor": "approve"}, {"frames": frames[cut:]}]


async def recorded_page(
    context: BrowserContext,
    script: list[dict[str, Any]],
    fragment: str = "",
    scheme: str = "light",
    init_script: str | None = None,
) -> Tab:
    page = await context.new_page()
    tab = Tab(page)
    page.on("console", lambda m: m.type == "error" and tab.errors.append(m.text))
    page.on("pageerror", lambda e: tab.errors.append(str(e)))
    await page.emulate_media(color_scheme=scheme)
    await page.route(f"{PAGE_ORIGIN}/**", serve_checkout)
    await page.add_init_script(script=FAKE_SOCKET)
    await page.add_init_script(script=f"window.__script = {json.dumps(script)};")
    if init_script is not None:
        await page.add_init_script(script=init_script)
    await page.goto(f"{PAGE_ORIGIN}/{fragment}")
    await page.wait_for_function("() => document.body.dataset.session", timeout=WAIT_MS)
    return tab


def viewer_fragment() -> str:
    """A viewer link's fragment: the page reads the token's claims to know it is one."""
    claims = {"sub": "ann", "scope": "view", "sid": "s-recorded", "exp": int(time.time()) + 600}
    return "#session=s-recorded&token=" + jwt.encode(claims, SECRET, algorithm="HS256")


async def test_a_recorded_v2_run_renders_reasoning_a_tool_card_approval_and_usage(context):
    tab = await recorded_page(context, until_approval(weather_run()))
    page = tab.page
    await waiting_for_approval(page)
    card = page.locator(".run")
    reasoning = card.locator(".reasoning-text").first
    assert await reasoning.text_content() == (
        "The user asks about the weather in Paris. I should search for it."
    ), "reasoning deltas join into one text"
    assert await card.locator(".reasoning").first.evaluate("d => d.open")
    tool = card.locator(".tool")
    assert await tool.locator(".tool-args").text_content() == (
        '{\n  "query": "weather in Paris today"\n}'
    ), "arguments as pretty JSON"
    assert await tool.locator(".tool-status").text_content() == "Waiting for approval"

    await tool.locator("button.allow").click()
    await ended(page, 1)
    assert await page.evaluate("window.__sent") == [
        {"type": "approve", "run": "r-recorded", "call_id": "call_1", "decision": "allow"}
    ]
    assert await shown_blocks(card) == ["reasoning", "tool", "reasoning", "answer"]
    assert await tool.locator(".approval").text_content() == "Allowed by the session's owner."
    assert await tool.locator(".tool-output").text_content() == (
        "Paris: 18 °C, light rain until 16:00, wind 12 km/h."
    )
    answer = card.locator(".answer")
    assert await answer.locator("strong").text_content() == "Paris is 18 °C today"
    assert await answer.locator("li").count() == 2
    assert await answer.locator("code").text_content() == "15 km/h"
    assert await card.locator(".run-foot").text_content() == (
        "Done in 2.7 s. ~508 tokens (~412 prompt, ~96 completion; estimated)."
    )
    assert not await card.locator(".reasoning").first.evaluate("d => d.open")
    assert tab.errors == []


async def test_a_recorded_tool_call_streams_its_input_then_shows_arguments(context):
    log = weather_run()
    first_piece = next(i for i, f in enumerate(log.frames) if f["type"] == "tool_input")
    script = [{"frames": log.frames[: first_piece + 2]}, {"waitFor": "never"}]
    page = (await recorded_page(context, script)).page
    await page.wait_for_selector(".tool", timeout=WAIT_MS)
    tool = page.locator(".tool")
    await page.wait_for_function(
        "text => document.querySelector('.tool-args').textContent === text",
        arg='{"query": "weather in ',
        timeout=WAIT_MS,
    )
    assert await tool.get_attribute("data-status") == "preparing"


async def test_a_viewer_link_shows_a_pending_approval_without_buttons(context):
    tab = await recorded_page(context, until_approval(weather_run()), viewer_fragment())
    page = tab.page
    await waiting_for_approval(page)
    assert await page.locator("#readonly").is_visible()
    assert await page.locator(".tool button, .tool input").count() == 0
    assert await page.locator(".tool .approval").text_content() == (
        "Waiting for the session's owner to allow or deny this call."
    )
    assert await page.evaluate("window.__sent") == []


async def test_a_timeout_decision_and_an_error_result_are_marked(context):
    log = Log()
    call = {"tool": "delete_files", "call_id": "call_9"}
    log.add("action", "delete_files", block="b1", delta=False, arguments='{"path": "/"}', **call)
    log.add(
        "approval", "", block="b1", arguments={"path": "/"}, timeout_ms=1000, default="deny", **call
    )
    log.add(
        "decision", "", block="b1", call_id="call_9", decision="deny", reason=None, by="timeout"
    )
    log.add(
        "observation", "denied: nobody allowed it", block="b2", delta=False, is_error=True, **call
    )
    log.add("error", "the model gave up", code="budget")
    page = (await recorded_page(context, [{"frames": log.frames}])).page
    await ended(page, 1, "failed")
    tool = page.locator(".tool")
    assert await tool.get_attribute("data-status") == "denied"
    assert await tool.locator(".approval").text_content() == (
        "Denied automatically: nobody answered in time."
    )
    assert await tool.locator(".label", has_text="Error").count() == 1
    assert await page.locator(".run .badge").text_content() == "Failed"
    assert await page.locator(".run-foot").text_content() == (
        "Failed in 0.6 s: the model gave up (budget)"
    )


def stopped_while_waiting() -> list[dict[str, Any]]:
    """The weather run up to its approval, then held until the page sends `cancel`, and
    cancelled: the call is never decided."""
    log = weather_run()
    cut = next(i for i, f in enumerate(log.frames) if f["type"] == "approval") + 1
    del log.frames[cut:]
    log.add("cancelled", "")
    return [{"frames": log.frames[:-1]}, {"waitFor": "cancel"}, {"frames": log.frames[-1:]}]


async def test_a_run_stopped_while_a_call_waits_says_the_call_was_not_decided(context, logdir):
    """Stop while a tool call waits for approval: the run ends with the call undecided, and
    its status says so. Before, the card said Stopped and "The run ended before anyone
    decided.", but the call's status still read "Waiting for approval"."""
    tab = await recorded_page(context, stopped_while_waiting())
    page = tab.page
    await waiting_for_approval(page)
    await page.click(".run .stop")
    await ended(page, 1, "cancelled")
    tool = page.locator(".run .tool")
    assert await tool.locator(".tool-status").text_content() == "Not decided"
    assert await tool.get_attribute("data-status") == "undecided"
    assert await tool.locator(".approval").text_content() == "The run ended before anyone decided."
    assert await tool.locator(".approval").get_attribute("data-status") == "undecided"
    assert await tool.locator("button, input").count() == 0
    assert await page.locator(".run .badge").text_content() == "Stopped"
    (logdir / "screenshots").mkdir(exist_ok=True)
    await page.screenshot(path=str(logdir / "screenshots" / "page-stopped-undecided.png"))
    assert tab.errors == []


async def test_a_refused_decision_offers_the_buttons_again(context):
    frames = until_approval(weather_run())[0]["frames"]
    refusal = {"type": "error", "code": "not_waiting", "message": "that call waits for nothing"}
    script = [{"frames": frames}, {"waitFor": "approve"}, {"frames": [refusal]}]
    page = (await recorded_page(context, script)).page
    await waiting_for_approval(page)
    await page.click(".tool button.deny")
    await page.wait_for_selector(".notice.error", timeout=WAIT_MS)
    assert await page.locator(".tool button.deny").is_enabled()
    assert await page.locator(".tool button.deny").text_content() == "Deny"


async def test_a_refused_stop_offers_stop_again(context):
    """A cancel the frontend refuses (an ``error`` reply: Redis briefly unreachable, or
    over the rate) leaves the run going: Stop is offered again, not held at
    "Stopping…" for good."""
    frames = [f for f in weather_run().frames if f["type"] == "thinking"]
    refusal = {
        "type": "error",
        "code": "unavailable",
        "message": "the service is briefly unavailable; send it again",
    }
    script = [{"frames": frames}, {"waitFor": "cancel"}, {"frames": [refusal]}]
    page = (await recorded_page(context, script)).page
    await page.wait_for_selector(".run .stop", timeout=WAIT_MS)
    await page.click(".run .stop")
    await page.wait_for_selector(".notice.error", timeout=WAIT_MS)
    assert await page.evaluate("window.__sent") == [{"type": "cancel", "run": "r-recorded"}]
    assert await page.locator(".run .stop").is_enabled()
    assert await page.locator(".run .stop").text_content() == "Stop"


async def test_a_prompt_the_client_cannot_take_stays_in_the_box(context):
    """The client takes no more prompts while 64 wait for their runs (or once it is
    closed for good): it says so, and the text stays in the box to send later. Before,
    the box was emptied all the same and the text was gone."""
    page = (await recorded_page(context, [])).page
    await page.evaluate(
        """() => {
          for (let i = 0; i < 64; i++) {
            document.getElementById("prompt").value = `question ${i}`;
            document.getElementById("send").click();
          }
        }"""
    )
    await page.fill("#prompt", "one too many")
    await page.click("#send")
    error = page.locator(".notice.error")
    await error.wait_for(timeout=WAIT_MS)
    assert "too many prompts" in (await error.text_content() or "")
    assert await page.input_value("#prompt") == "one too many"
    assert len(await page.evaluate("window.__sent")) == 64


async def test_a_v1_log_without_blocks_still_reads(context):
    """A log written before blocks: whole thinking lines, an action and an observation
    with no tool fields, answer pieces that join into one text."""
    log = Log()
    log.add("thinking", "Analyzing the question...")
    log.add("thinking", "I need to search for information")
    log.add("action", "Searching: tides")
    log.add("observation", "Found: relevant results about tides")
    for piece in ("Tides are ", "*long* waves."):
        log.add("answer", piece)
    log.add("done", "")
    page = (await recorded_page(context, [{"frames": log.frames}])).page
    await ended(page, 1)
    card = page.locator(".run")
    assert await shown_blocks(card) == ["reasoning", "tool", "answer"]
    assert await card.locator(".reasoning-text").text_content() == (
        "Analyzing the question...\nI need to search for information"
    )
    assert await card.locator(".tool-args").all_text_contents() == ["Searching: tides"]
    assert await card.locator(".tool-output").all_text_contents() == [
        "Found: relevant results about tides"
    ]
    assert await card.locator(".answer em").text_content() == "long"


PARAGRAPHS = 120


async def test_a_long_answer_renders_each_closed_paragraph_once(context):
    """A long answer streams as many deltas: a paragraph a blank line has closed is drawn
    once and kept (the same element to the end of the stream); only the open tail is drawn
    again. The complete answer is drawn whole once more at its end."""
    log = Log()
    script: list[dict[str, Any]] = []
    for n in range(PARAGRAPHS):
        words = [f"Paragraph {n} ", "says something ", "worth reading", ".\n\n"]
        for word in words:
            log.add("answer", word, block="b1", delta=True)
        script += [{"frames": log.frames[-4:]}, {"pause": 5}]
    log.add("done", "")
    script += [{"waitFor": "end"}, {"frames": log.frames[-1:]}]
    page = (await recorded_page(context, script)).page
    await page.evaluate(
        """() => {
          window.added = 0;
          new MutationObserver(records => {
            for (const r of records) window.added += r.addedNodes.length;
          }).observe(document.getElementById('runs'), { childList: true, subtree: true });
        }"""
    )
    await page.wait_for_function(
        "() => document.querySelector('.answer')?.children.length >= 3", timeout=WAIT_MS
    )
    await page.evaluate("window.first = document.querySelector('.answer p')")
    await page.wait_for_function(
        "n => document.querySelectorAll('.answer p').length >= n", arg=PARAGRAPHS, timeout=WAIT_MS
    )
    assert await page.evaluate("window.first.isConnected"), "a closed paragraph was drawn again"
    added = await page.evaluate("window.added")
    print(f"{PARAGRAPHS} paragraphs in {len(log.frames) - 1} deltas: {added} nodes added")
    assert added < 6 * PARAGRAPHS, added  # a redraw of the whole answer per frame: ~N²/2
    first_paragraph = await page.locator(".answer p").first.text_content()
    await page.evaluate("window.__socket.play({ type: 'end' })")
    await ended(page, 1)
    assert await page.locator(".answer p").count() == PARAGRAPHS
    assert await page.locator(".answer p").first.text_content() == first_paragraph


async def axe_violations(page: Page) -> list[dict[str, Any]]:
    """axe-core's serious and critical violations on the page as it is now."""
    found: list[dict[str, Any]] = await page.evaluate(
        """async () => (await axe.run(document, { resultTypes: ['violations'] })).violations
             .map(v => ({ id: v.id, impact: v.impact,
                          nodes: v.nodes.map(n => n.target.join(' ')) }))"""
    )
    print("axe:", [(v["id"], v["impact"], len(v["nodes"])) for v in found] or "no violations")
    return [v for v in found if v["impact"] in ("serious", "critical")]


@pytest.mark.parametrize("scheme", ["light", "dark"])
async def test_axe_finds_no_serious_or_critical_violations(cluster, context, axe_source, scheme):
    """The page with a running, a finished and a stopped run, its share dialog, the
    read-only view and the sign-in form.

    Measured: no violation of any impact in either scheme. The page before had one
    serious (colour contrast) and five moderate ones (no main landmark, content outside
    landmarks), and no dark mode.
    """
    a = cluster.frontends[0]
    page = await context.new_page()
    await page.emulate_media(color_scheme=scheme)
    await page.add_init_script(script=axe_source)
    await page.goto(f"{a.http}/#token={token_for('frank')}")
    await page.wait_for_function("() => document.body.dataset.session", timeout=WAIT_MS)
    await prompt(page, "What is **machine** learning?")
    await ended(page, 1)
    await prompt(page, "and then?")
    await page.wait_for_selector(".run:nth-of-type(2) .stop", timeout=WAIT_MS)
    assert await axe_violations(page) == []  # one run still running, with its Stop
    await page.click(".run:nth-of-type(2) .stop")
    await ended(page, 1, "cancelled")
    assert await axe_violations(page) == []
    await page.click("#share")
    await page.wait_for_function(
        "() => document.querySelector('#share-link').value", timeout=WAIT_MS
    )
    assert await axe_violations(page) == []

    viewer = await context.new_page()  # a new tab, with its own sessionStorage
    await viewer.emulate_media(color_scheme=scheme)
    await viewer.add_init_script(script=axe_source)
    await viewer.goto(await page.input_value("#share-link"))
    await ended(viewer, 1, "cancelled")
    assert await viewer.locator("#readonly").is_visible()
    assert await axe_violations(viewer) == []

    signin = await context.new_page()
    await signin.emulate_media(color_scheme=scheme)
    await signin.add_init_script(script=axe_source)
    await signin.goto(f"{a.http}/")
    await signin.wait_for_selector("#signin", state="visible", timeout=WAIT_MS)
    assert await axe_violations(signin) == []


@pytest.mark.parametrize("scheme", ["light", "dark"])
async def test_axe_finds_nothing_serious_on_tool_cards_and_approvals(context, axe_source, scheme):
    """A recorded v2 run: waiting for approval (Allow, Deny, a reason field), then finished
    (the decision, the result, usage), and the viewer's card with no buttons.

    Measured: no violation of any impact in either scheme.
    """
    script = until_approval(weather_run())
    page = (await recorded_page(context, script, scheme=scheme, init_script=axe_source)).page
    await waiting_for_approval(page)
    assert await axe_violations(page) == []
    await page.click(".tool button.allow")
    await ended(page, 1)
    assert await axe_violations(page) == []
    viewer = await recorded_page(
        context, script, viewer_fragment(), scheme=scheme, init_script=axe_source
    )
    await waiting_for_approval(viewer.page)
    assert await axe_violations(viewer.page) == []


TIMES = "\u00d7"  # the multiplication sign, as a model writes it
SHOTS = [
    ("page-light.png", {"width": 1280, "height": 800}, "light"),
    ("page-dark.png", {"width": 1280, "height": 800}, "dark"),
    ("page-mobile-light.png", {"width": 390, "height": 844}, "light"),
    ("page-mobile-dark.png", {"width": 390, "height": 844}, "dark"),
]
APPROVAL_SHOT = "page-approval.png"


async def test_screenshots(model, context, logdir):
    """A finished run (reasoning, a tool call the reader allowed, its result, a Markdown
    answer) and one still answering."""
    cluster, llm = model
    llm.replies.extend(
        [
            dataclasses.replace(
                Reply.tool_calls(
                    ("call_1", "calculator", ['{"expression": ', '"17 * 23"}']),
                    reasoning=(
                        "The user wants ",
                        "a product. ",
                        "I will use the calculator ",
                        "for it.",
                    ),
                ),
                delay=0.05,
            ),
            Reply(
                deltas=[
                    {"reasoning_content": "The calculator says 391; "},
                    {"reasoning_content": "I will show the working."},
                    *(
                        {"content": piece}
                        for piece in (
                            f"**17 {TIMES} 23 = 391.**\n\nWorking it out:\n\n",
                            f"1. `17 {TIMES} 20 = 340`\n",
                            f"2. `17 {TIMES} 3 = 51`\n",
                            "3. `340 + 51 = 391`\n",
                        )
                    ),
                ],
                delay=0.05,
            ),
            Reply(
                deltas=[
                    {"reasoning_content": "A haiku has three lines: "},
                    {"reasoning_content": "five, seven and five syllables. "},
                    {"content": "Tokens drift like snow"},
                ]
                + [{"content": "."}] * 4,
                delay=0.05,
                hang_after=6,  # the model stops after three dots and the run stays running
            ),
        ]
    )
    page = await context.new_page()
    await page.set_viewport_size(SHOTS[0][1])
    await page.goto(f"{cluster.frontends[0].http}/#token={token_for('grace')}")
    await page.wait_for_function("() => document.body.dataset.session", timeout=WAIT_MS)
    await prompt(page, f"What is 17 {TIMES} 23? Show the working.")
    await waiting_for_approval(page)
    out = logdir / "screenshots"
    out.mkdir(exist_ok=True)
    keep = os.environ.get("SCREENSHOTS_DIR")
    await page.fill(".tool .approval input", "arithmetic is harmless")
    await page.screenshot(path=str(out / APPROVAL_SHOT))  # Allow and Deny on the tool card
    if keep:
        shutil.copyfile(out / APPROVAL_SHOT, Path(keep) / APPROVAL_SHOT)
    await page.click(".tool button.allow")
    await ended(page, 1)
    tool = page.locator(".run .tool")
    assert await tool.locator(".tool-output").text_content() == "391"
    assert "Allowed by the session's owner" in (
        await tool.locator(".approval").text_content() or ""
    )
    await prompt(page, "Write a haiku about streaming.")
    await page.wait_for_function(
        "() => document.querySelector('.run:nth-of-type(2) .answer')?.textContent.includes('snow...')",
        timeout=WAIT_MS,
    )
    await page.click(".run:nth-of-type(1) .reasoning summary")  # the reader opens the reasoning
    for name, size, scheme in SHOTS:
        await page.set_viewport_size(size)
        await page.emulate_media(color_scheme=scheme)
        # The finished run from its prompt down, below the bar.
        await page.evaluate("document.querySelector('.run').scrollIntoView({ block: 'start' })")
        await page.screenshot(path=str(out / name))
        if keep:
            shutil.copyfile(out / name, Path(keep) / name)
    print(f"screenshots in {out}")
    await page.click(".run:nth-of-type(2) .stop")  # the model hangs: end the run
    await ended(page, 1, "cancelled")
