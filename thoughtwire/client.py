"""A small Python client for a thoughtwire frontend, and the ``thoughtwire chat`` printer."""

from __future__ import annotations

import json
import sys
from collections.abc import AsyncIterator
from typing import Any, TextIO

from websockets.asyncio.client import connect

DEFAULT_URL = "ws://127.0.0.1:8000/ws/agent-thoughts"

ICONS = {"thinking": "💭", "action": "🔧", "observation": "👁️ ", "error": "❌"}


async def ask(
    prompt: str, url: str = DEFAULT_URL, open_timeout: float = 10
) -> AsyncIterator[dict[str, Any]]:
    """Send one prompt; yield every event of its run, ending with ``done`` or ``error``."""
    async with connect(url, open_timeout=open_timeout, max_size=2**22) as ws:
        await ws.send(prompt)
        run = None
        async for frame in ws:
            message = json.loads(frame)
            if "seq" not in message:
                if message.get("type") == "error":
                    raise RuntimeError(message.get("message", "the server refused the prompt"))
                continue  # the session greeting, pings
            run = run or message["run"]
            if message["run"] != run:
                continue
            yield message
            if message["type"] in ("done", "error"):
                return


async def chat(prompt: str, url: str = DEFAULT_URL, out: TextIO = sys.stdout) -> int:
    """Print each thought as it streams; answer tokens are printed inline."""
    answering = False
    async for event in ask(prompt, url):
        kind, content = event["type"], event.get("content", "")
        if kind == "answer":
            if not answering:
                out.write("✅ ")
                answering = True
            out.write(str(content))
        elif kind == "done":
            out.write("\n")
        else:
            if answering:
                out.write("\n")
                answering = False
            out.write(f"{ICONS.get(kind, kind)} {content}\n")
        out.flush()
        if kind == "error":
            return 1
    return 0
