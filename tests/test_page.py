"""The page at `/`, in real headless chromium, against real frontends with authentication on.

A user opens `/#token=T`, prompts, stops a run, shares a read-only link that a second
browser opens on the other frontend; answers are Markdown that runs nothing; axe finds
no serious or critical violation in light or dark mode; screenshots go to the log folder
(and to docs/img with ``THOUGHTWIRE_SCREENSHOTS_DIR``, as ``make screenshots`` sets it).
"""

from __future__ import annotations

import asyncio
import dataclasses
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
from playwright.async_api import BrowserContext, Page

from tests.browser import browser_context
from tests.conftest import Cluster, openai_env, start_cluster
from tests.fake_openai import FakeOpenAI, Reply
from tests.procs import RedisServer, seconds
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
def model(redis_server: RedisServer, logdir: Path) -> Iterator[tuple[Cluster, FakeOpenAI]]:
    """One frontend with authentication on, whose worker's openai agent talks to a scripted model."""
    llm = FakeOpenAI().start()
    c = start_cluster(redis_server, logdir, frontends=1, JWT_SECRET=SECRET, **openai_env(llm))
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
    kinds = await card.locator(".step .kind").all_text_contents()
    # Five steps of the simulated agent; its first two thinking lines join into one step.
    assert kinds == ["Thinking", "Action", "Observation", "Thinking"]
    thinking = await card.locator(".step-thinking .text").first.text_content()
    assert thinking == "Analyzing the question...\nI need to search for information"
    timeline = card.locator("details.timeline")
    assert not await timeline.evaluate("d => d.open"), "an ended run folds its steps away"
    await timeline.locator("summary").click()
    assert await timeline.evaluate("d => d.open")
    assert tab.errors == [] and tab.dialogs == []


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
        assert await page.locator(".step .kind").all_text_contents() == [
            "Thinking",
            "Action",
            "Observation",
            "Thinking",
        ]
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
    await page.wait_for_selector(f".run:nth-of-type({runs + 1}) .step", timeout=WAIT_MS)
    assert await page.evaluate(AT_BOTTOM)
    await page.evaluate("window.scrollTo(0, 0)")  # the reader goes up to read
    await ended(page, runs + 1)
    assert await page.evaluate("scrollY") == 0, "the page kept the reader where they were"
    assert await page.locator("#jump").is_visible()
    await page.click("#jump")
    assert await page.evaluate(AT_BOTTOM)
    assert await page.locator("#jump").is_hidden()

    await prompt(page, "and back down")
    await page.wait_for_selector(f".run:nth-of-type({runs + 2}) .step", timeout=WAIT_MS)
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


TIMES = "\u00d7"  # the multiplication sign, as a model writes it
SHOTS = [
    ("page-light.png", {"width": 1280, "height": 800}, "light"),
    ("page-dark.png", {"width": 1280, "height": 800}, "dark"),
    ("page-mobile-light.png", {"width": 390, "height": 844}, "light"),
    ("page-mobile-dark.png", {"width": 390, "height": 844}, "dark"),
]


async def test_screenshots(model, context, logdir):
    """A finished run (reasoning, a tool call, a Markdown answer) and one still thinking."""
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
    await ended(page, 1)
    await prompt(page, "Write a haiku about streaming.")
    await page.wait_for_function(
        "() => document.querySelector('.run:nth-of-type(2) .answer')?.textContent.includes('snow...')",
        timeout=WAIT_MS,
    )
    await page.click(".run:nth-of-type(1) summary")  # the reader opens the first run's steps
    out = logdir / "screenshots"
    out.mkdir(exist_ok=True)
    keep = os.environ.get("THOUGHTWIRE_SCREENSHOTS_DIR")
    for name, size, scheme in SHOTS:
        await page.set_viewport_size(size)
        await page.emulate_media(color_scheme=scheme)
        await page.evaluate("window.scrollTo(0, document.documentElement.scrollHeight)")
        await page.screenshot(path=str(out / name))
        if keep:
            shutil.copyfile(out / name, Path(keep) / name)
    print(f"screenshots in {out}")
    await page.click(".run:nth-of-type(2) .stop")  # the model hangs: end the run
    await ended(page, 1, "cancelled")
