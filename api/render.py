"""How the plain-text endpoints show JSON frames: pure functions, one per endpoint.

The JSON endpoints relay frames unchanged; these turn each frame into the text the
seed's plain-text clients expect, or ``None`` to show nothing.
"""

from __future__ import annotations

from collections.abc import Callable

import orjson


def plain_text(done_marker: str | None) -> Callable[[str], str | None]:
    """Show answer tokens as they are, errors as ``[ERROR] ...``, ``done`` as the marker."""

    def render(frame: str) -> str | None:
        obj = orjson.loads(frame)
        kind = obj.get("type")
        if kind == "answer":
            return str(obj["content"])
        if kind == "done":
            return done_marker
        if kind == "error":
            return "[ERROR] " + str(obj.get("message") or obj.get("content") or "error")
        return None

    return render


agent_text = plain_text("[DONE]")  # /ws/agent
chat_text = plain_text("\n[DONE]")  # /ws/chat
echo_text = plain_text(None)  # /ws
