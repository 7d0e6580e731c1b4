"""Seed exercise 3: a real browser and a Python client receive the same stream.

These run with authentication off, as `thoughtwire up` serves the page; tests/test_page.py
drives the page with authentication on.
"""

import asyncio
import json

import pytest

from tests.browser import browser_context
from tests.procs import seconds
from tests.wsclient import connect, greeting, run_events

pytestmark = pytest.mark.browser

WAIT_MS = seconds(10) * 1000


def reasoning_of(events: list[dict]) -> list[str]:
    """The reasoning the page shows for a run's events: consecutive thinking joined, a line each."""
    shown: list[list[str]] = []
    previous = None
    for event in events:
        if event["type"] == "thinking":
            if previous != "thinking":
                shown.append([])
            shown[-1].append(event["content"])
        if event["type"] not in ("block_end",):
            previous = event["type"]
    return ["\n".join(lines) for lines in shown]


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
        reasoning = await card.locator(".reasoning-text").all_text_contents()
        assert reasoning == reasoning_of(events)
        assert await card.locator(".tool .tool-name").all_text_contents() == ["search"]
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
        arguments = json.loads(await page.text_content(".run .tool-args") or "")
        assert arguments == {"query": hostile}
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
