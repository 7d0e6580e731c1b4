"""The event loop every thoughtwire process runs on: uvloop where it is installed.

uvicorn already picks uvloop for the frontends; workers (and the benchmark's own
processes) use the same loop, which roughly halves the cost of asyncio's own
scheduling, timers and socket writes per event.
"""

from __future__ import annotations

import asyncio
import gc
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


def settle() -> None:
    """Move everything allocated so far (modules, settings) out of the collector's way.

    The cyclic collector scans every tracked object of a generation each time it runs;
    a relay allocates fast, so it runs often. What exists at startup lives for the
    whole process, so it is frozen once instead of being scanned again and again.
    """
    gc.collect()
    gc.freeze()


def run(main: Coroutine[Any, Any, T]) -> T:
    """``asyncio.run(main)`` on uvloop, or on asyncio's own loop without it."""
    settle()
    try:
        import uvloop
    except ImportError:  # pragma: no cover - a dependency wherever uvloop runs
        return asyncio.run(main)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(main)
