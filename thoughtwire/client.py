"""A Python client for thoughtwire frontends that reconnects and resumes by itself.

>>> async for event in ask("What is machine learning?", ["ws://a:8000", "ws://b:8000"]):
...     print(event["type"], event["content"])

:class:`Follower` keeps the client's position ``(epoch, seq)`` in a session. When a
connection drops it reconnects, to the next frontend in its list, with capped
exponential backoff and jitter, and asks for everything after that position. The
server answers with the missed events (each exactly once) or a ``gap`` saying what
can no longer be had.
"""

from __future__ import annotations

import asyncio
import json
import random
import sys
import uuid
from collections.abc import AsyncIterator, Sequence
from typing import Any, TextIO
from urllib.parse import urlencode, urlsplit

from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidURI

DEFAULT_URL = "ws://127.0.0.1:8000/ws/agent-thoughts"
TERMINAL = ("done", "error", "cancelled")
# Close codes after which reconnecting cannot help (see shared/closecodes.py).
FINAL_CLOSE_CODES = {1000, 1008, 1009, 4001, 4003}

ICONS = {"thinking": "💭", "action": "🔧", "observation": "👁️ ", "error": "❌"}


class Refused(Exception):
    """The server refused the request for good (a final close code or error reply)."""


class Follower:
    """Follows one session across reconnects; yields events and ``gap`` notices."""

    def __init__(
        self,
        urls: str | Sequence[str],
        session: str | None = None,
        *,
        after: int | None = None,
        epoch: str | None = None,
        max_reconnects: int = 50,
        open_timeout: float = 5.0,
        first: int = 0,
    ) -> None:
        # A list is kept as it is, so its owner can swap frontends in and out.
        self.urls = (
            [urls] if isinstance(urls, str) else urls if isinstance(urls, list) else list(urls)
        )
        self.first = first
        self.session = session
        self.seq = after
        self.epoch = epoch
        self.max_reconnects = max_reconnects
        self.open_timeout = open_timeout
        self.reconnects = 0
        self.url_in_use: str | None = None

    def url(self, attempt: int) -> str:
        base = self.urls[(self.first + attempt) % len(self.urls)]
        if not urlsplit(base).path.startswith("/ws"):
            base = base.rstrip("/") + "/ws/agent-thoughts"
        query: dict[str, Any] = {}
        if self.session is not None:
            query["session"] = self.session
            if self.seq is not None:
                query["after"] = self.seq
            if self.epoch is not None:
                query["epoch"] = self.epoch
        return base + ("?" + urlencode(query) if query else "")

    async def events(self, prompt: str | None = None) -> AsyncIterator[dict[str, Any]]:
        """Yield the session's events forever.

        ``prompt`` is sent with an idempotency key, and sent again on each reconnect
        until an event shows the run has started: the server runs it once.
        """
        delay = 0.05
        request = (
            None
            if prompt is None
            else json.dumps({"type": "prompt", "content": prompt, "key": uuid.uuid4().hex})
        )
        for attempt in range(self.max_reconnects + 1):
            try:
                url = self.url(attempt)
                async with connect(url, open_timeout=self.open_timeout, max_size=2**22) as ws:
                    self.url_in_use, delay = url, 0.05
                    async for frame in ws:
                        message = json.loads(frame)
                        if message.get("type") == "session":
                            if self.session is None and self.seq is None:
                                self.seq = 0  # a session of our own: all of it is ours to see
                            self.session = message["session"]
                            if request is not None:
                                await ws.send(request)
                            continue
                        if message.get("session", self.session) != self.session:
                            continue  # a frame of the session this socket just left
                        if self._advance(message):
                            if "seq" in message:
                                request = None
                            yield message
            except ConnectionClosed as exc:
                if exc.rcvd is not None and exc.rcvd.code in FINAL_CLOSE_CODES:
                    raise Refused(f"closed with {exc.rcvd.code}: {exc.rcvd.reason}") from None
            except (OSError, InvalidHandshake, InvalidURI, TimeoutError):
                pass
            self.reconnects += 1
            await asyncio.sleep(delay * random.uniform(0.5, 1.0))
            delay = min(delay * 2, 2.0)
        raise Refused(f"gave up after {self.max_reconnects} reconnects")

    def _advance(self, message: dict[str, Any]) -> bool:
        """Track the position; True for what the caller should see."""
        kind = message.get("type")
        if kind == "gap":
            self.epoch, self.seq = message.get("epoch"), message["next"] - 1
            return True
        if "seq" in message:
            self.epoch, self.seq = message["epoch"], message["seq"]
            return True
        if kind == "error":
            raise Refused(message.get("message", "the server refused the request"))
        return False  # pings, reconnect notices, connection-manager messages


async def ask(
    prompt: str, urls: str | Sequence[str] = DEFAULT_URL, **options: Any
) -> AsyncIterator[dict[str, Any]]:
    """Send one prompt; yield every event of its run (and gaps), ending with its terminal event."""
    follower = Follower(urls, **options)
    run = None
    async for message in follower.events(prompt):
        if message["type"] == "gap":
            yield message
            continue
        run = run or message["run"]
        if message["run"] != run:
            continue
        yield message
        if message["type"] in TERMINAL:
            return


async def chat(prompt: str, url: str = DEFAULT_URL, out: TextIO = sys.stdout) -> int:
    """Print each thought as it streams; answer tokens are printed inline."""
    answering = False
    status = 0
    async for event in ask(prompt, url):
        kind, content = event["type"], event.get("content", "")
        if kind == "answer":
            if not answering:
                out.write("✅ ")
                answering = True
            out.write(str(content))
            out.flush()
            continue
        if answering:
            out.write("\n")
            answering = False
        if kind == "retry":
            out.write(f"↻ attempt {event['attempt']}: starting over\n")
        elif kind == "gap":
            out.write(f"⚠️  some events could not be recovered ({event['reason']})\n")
        elif kind in ("error", "cancelled"):
            out.write(f"{ICONS['error']} {content}\n")
            status = 1
        elif kind != "done":
            out.write(f"{ICONS.get(kind, kind)} {content}\n")
        out.flush()
    return status
