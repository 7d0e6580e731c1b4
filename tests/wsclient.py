"""Socket helpers for tests: every wait is bounded."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

from websockets.asyncio.client import ClientConnection, connect

from tests.procs import seconds

__all__ = ["check_stream", "connect", "greeting", "recv_json", "recv_text", "run_events"]


async def recv_text(ws: ClientConnection, timeout: float = 10) -> str:
    async with asyncio.timeout(seconds(timeout)):
        frame = await ws.recv()
    assert isinstance(frame, str)
    return frame


async def recv_json(ws: ClientConnection, timeout: float = 10) -> dict[str, Any]:
    message: dict[str, Any] = json.loads(await recv_text(ws, timeout))
    return message


async def greeting(ws: ClientConnection) -> str:
    """The ``session`` reply a session socket sends first; returns the session id."""
    hello = await recv_json(ws)
    assert hello["type"] == "session", hello
    return str(hello["session"])


async def run_events(
    ws: ClientConnection, timeout: float = 20, stamp: bool = False
) -> list[dict[str, Any]]:
    """Events (frames with a ``seq``) until one ends a run. ``stamp`` adds the receive time."""
    events = []
    async with asyncio.timeout(seconds(timeout)):
        while True:
            message = json.loads(await ws.recv())
            if stamp:
                message["_received_ms"] = time.time() * 1000
            if "seq" not in message:
                continue
            events.append(message)
            if message["type"] in ("done", "error", "cancelled"):
                return events


def check_stream(messages, first=1):
    """Every event once and in order within its epoch; a new epoch only after a gap.

    Returns the number of gaps. A ``retry`` (a new attempt) is allowed; silent loss
    or duplication is not.
    """
    epoch, last, gaps = None, first - 1, 0
    for m in messages:
        if m["type"] == "gap":
            epoch, last, gaps = m["epoch"], m["next"] - 1, gaps + 1
            continue
        if epoch is None:
            epoch = m["epoch"]
        assert m["epoch"] == epoch, f"the epoch changed without a gap: {m}"
        assert m["seq"] == last + 1, f"expected seq {last + 1}, got {m}"
        last = m["seq"]
    return gaps
