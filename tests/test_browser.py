"""Seed exercise 3: a real browser and a Python client receive the same stream."""

import asyncio

import pytest

from tests.browser import browser_context
from tests.conftest import openai_env, start_cluster
from tests.fake_openai import FakeOpenAI, Reply
from tests.procs import seconds
from tests.wsclient import connect, greeting, run_events

pytestmark = pytest.mark.browser

ICONS = {"thinking": "💭 ", "action": "🔧 ", "observation": "👁️ "}


async def test_a_browser_and_a_python_client_see_the_same_stream(cluster):
    a, b = cluster.frontends
    async with browser_context() as context:
        page = await context.new_page()
        await page.goto(a.http + "/")
        await page.wait_for_function("document.body.dataset.session", timeout=seconds(10) * 1000)
        session = await page.evaluate("document.body.dataset.session")

        async with connect(f"{b.ws}/ws/agent-thoughts?session={session}") as ws:
            await greeting(ws)
            await page.fill("#input", "What is machine learning?")
            await page.click("button[type=submit]")
            events = await run_events(ws)
            await page.wait_for_selector(".answer.done", timeout=seconds(10) * 1000)

        shown = await page.eval_on_selector_all(
            "#chat > div", "els => els.map(e => [e.className, e.textContent])"
        )
    expected = [["user", "You: What is machine learning?"]]
    expected += [[e["type"], ICONS[e["type"]] + e["content"]] for e in events if e["type"] in ICONS]
    expected.append(["answer done", "".join(e["content"] for e in events if e["type"] == "answer")])
    assert shown == expected


async def test_the_page_shows_markup_as_text(cluster):
    async with browser_context() as context:
        page = await context.new_page()
        dialogs = []
        page.on("dialog", lambda d: dialogs.append(d.message) or asyncio.ensure_future(d.dismiss()))
        await page.goto(cluster.frontends[0].http + "/")
        await page.wait_for_function("document.body.dataset.session", timeout=seconds(10) * 1000)
        hostile = '<img src=x onerror="alert(1)">'
        await page.fill("#input", hostile)
        await page.click("button[type=submit]")
        await page.wait_for_selector(".answer.done", timeout=seconds(10) * 1000)
        assert await page.locator("#chat img").count() == 0
        assert await page.text_content(".user") == "You: " + hostile
        assert hostile in await page.text_content(".action")
    assert dialogs == []


@pytest.fixture(scope="module")
def hostile_model(redis_server, logdir):
    llm = FakeOpenAI().start()
    c = start_cluster(redis_server, logdir, frontends=1, **openai_env(llm))
    yield c, llm
    c.stop()
    llm.stop()


async def test_a_model_answer_with_markup_is_shown_as_text_and_runs_nothing(hostile_model):
    cluster, llm = hostile_model
    payload = '<img src=x onerror="window.__pwned = 1"><script>window.__pwned = 2</script>'
    llm.replies.append(Reply.text("Here: ", payload[:20], payload[20:]))
    async with browser_context() as context:
        page = await context.new_page()
        await page.goto(cluster.frontends[0].http + "/")
        await page.wait_for_function("document.body.dataset.session", timeout=seconds(10) * 1000)
        await page.fill("#input", "say something nasty")
        await page.click("button[type=submit]")
        await page.wait_for_selector(".answer.done", timeout=seconds(10) * 1000)
        assert await page.text_content(".answer") == "Here: " + payload
        assert await page.locator("#chat img, #chat script").count() == 0
        assert await page.evaluate("window.__pwned") is None
