"""Debian's chromium, headless, driven by Playwright; Playwright never downloads a browser here."""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path

from playwright.async_api import BrowserContext, Page, Route, async_playwright

CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


def chromium_path() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        raise RuntimeError("chromium is not installed; `make test` installs it")
    return path


@contextlib.asynccontextmanager
async def browser_context() -> AsyncIterator[BrowserContext]:
    """A fresh headless chromium with a fresh profile directory."""
    with tempfile.TemporaryDirectory(prefix="thoughtwire-chromium-") as profile:
        async with async_playwright() as pw:
            context = await pw.chromium.launch_persistent_context(
                profile, executable_path=chromium_path(), headless=True, args=CHROMIUM_ARGS
            )
            try:
                yield context
            finally:
                await context.close()


CLIENT = Path(__file__).resolve().parent.parent / "clients" / "js" / "thoughtwire.js"
# An origin no server has: the test answers its requests itself.
TEST_ORIGIN = "http://client.thoughtwire.test"
BLANK_PAGE = "<!doctype html><title>client</title>"


@contextlib.asynccontextmanager
async def client_module_page() -> AsyncIterator[Page]:
    """A page with the JavaScript client's module as ``window.tw``, and no frontend."""

    async def serve(route: Route) -> None:
        if route.request.url.endswith("/thoughtwire.js"):
            await route.fulfill(body=CLIENT.read_text(), content_type="text/javascript")
        else:
            await route.fulfill(body=BLANK_PAGE, content_type="text/html")

    async with browser_context() as context:
        page = await context.new_page()
        await page.route(f"{TEST_ORIGIN}/**", serve)
        await page.goto(f"{TEST_ORIGIN}/")
        await page.evaluate("async () => { window.tw = await import('/thoughtwire.js'); }")
        yield page
