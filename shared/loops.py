"""The event loop every thoughtwire process runs on: uvloop where it is installed.

uvicorn already picks uvloop for the frontends; workers (and the benchmark's own
processes) use the same loop, which roughly halves the cost of asyncio's own
scheduling, timers and socket writes per event.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


def run(main: Coroutine[Any, Any, T]) -> T:
    """``asyncio.run(main)`` on uvloop, or on asyncio's own loop without it."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop comes with uvicorn[standard]
        return asyncio.run(main)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(main)
