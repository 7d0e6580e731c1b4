"""Debian's chromium, headless, driven by Playwright; Playwright never downloads a browser here."""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from collections.abc import AsyncIterator

from playwright.async_api import BrowserContext, async_playwright

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
