"""Seed exercise 3: a real browser and a Python client receive the same stream.

These run with authentication off, as `thoughtwire up` serves the page; tests/test_page.py
drives the page with authentication on.
"""

import asyncio

import pytest

from tests.browser import browser_context
from tests.procs import seconds
from tests.wsclient import connect, greeting, run_events

pytestmark = pytest.mark.browser

KINDS = {"thinking": "Thinking", "action": "Action", "observation": "Observation"}
WAIT_MS = seconds(10) * 1000


def steps_of(events: list[dict]) -> list[str]:
    """The timeline the page shows for a run's events: consecutive thinking makes one step."""
    steps: list[str] = []
    previous = None
    for event in events:
        kind = event["type"]
        if kind in KINDS and not (kind == "thinking" and previous == "thinking"):
            steps.append(KINDS[kind])
        previous = kind
    return steps


async def test_a_browser_and_a_python_client_see_the_same_stream(cluster):
    a, b = cluster.frontends
    async with browser_context() as context:
        page = await context.new_page()
        await page.goto(a.http + "/")
        await page.wait_for_function("() => document.body.dataset.session", timeout=WAIT_MS)
        session = await page.evaluate("document.body.dataset.session")
        assert await page.locator("#signin").is_hidden()  # no token needed

        async with connect(f"{b.ws}/ws/agent-thoughts?session={session}") as ws:
            await greeting(ws)
            await page.fill("#prompt", "What is machine learning?")
            await page.click("#send")
            events = await run_events(ws)
            await page.wait_for_selector(".run[data-status=done]", timeout=WAIT_MS)

        card = page.locator(".run")
        assert await card.get_attribute("data-run") == events[0]["run"]
        assert await card.locator(".prompt-text").text_content() == "What is machine learning?"
        assert await card.locator(".step .kind").all_text_contents() == steps_of(events)
        answer = "".join(e["content"] for e in events if e["type"] == "answer")
        assert (await card.locator(".answer").inner_text()).split() == answer.split()


async def test_the_page_shows_prompts_and_steps_as_text(cluster):
    async with browser_context() as context:
        page = await context.new_page()
        dialogs = []
        page.on("dialog", lambda d: dialogs.append(d.message) or asyncio.ensure_future(d.dismiss()))
        await page.goto(cluster.frontends[0].http + "/")
        await page.wait_for_function("() => document.body.dataset.session", timeout=WAIT_MS)
        hostile = '<img src=x onerror="alert(1)">'
        await page.fill("#prompt", hostile)
        await page.click("#send")
        await page.wait_for_selector(".run[data-status=done]", timeout=WAIT_MS)
        assert await page.locator("#runs img").count() == 0
        assert await page.text_content(".run .prompt-text") == hostile
        assert hostile in (await page.text_content(".run .step-action .text") or "")
    assert dialogs == []


async def test_share_explains_that_authentication_is_off(cluster):
    async with browser_context() as context:
        page = await context.new_page()
        await page.goto(cluster.frontends[0].http + "/")
        await page.wait_for_function("() => document.body.dataset.session", timeout=WAIT_MS)
        await page.click("#share")
        message = page.locator("#share-message")
        await message.wait_for(state="visible", timeout=WAIT_MS)
        assert "Authentication is off" in (await message.text_content() or "")
        assert await page.locator("#share-ready").is_hidden()
