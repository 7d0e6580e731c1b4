"""Token coalescing: merge ``answer`` and ``thinking`` deltas that arrive close together.

An LLM can emit a delta every few milliseconds; one event each costs a Redis call and
a frame per socket. Deltas of one kind that arrive within ``window`` seconds of the
last event sent are merged into one. A delta that arrives after a quiet ``window``
goes out at once, so the first token is never delayed, and a slow stream is relayed
as it comes. ``window`` = 0 turns coalescing off.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator

from shared.protocol import Thought

MERGEABLE = ("answer", "thinking")
_END = object()


class _Failed:
    def __init__(self, exc: Exception) -> None:
        self.exc = exc


async def coalesce(source: AsyncIterator[Thought], window: float) -> AsyncIterator[Thought]:
    """Merge answer and thinking deltas that come within ``window`` seconds of each other."""
    if window <= 0:
        async for thought in source:
            yield thought
        return
    # The source runs in its own task, so waiting out the window never cancels it.
    queue: asyncio.Queue[object] = asyncio.Queue(maxsize=1024)
    producer = asyncio.create_task(_produce(source, queue), name="coalesce-source")
    held = _Held(window)
    try:
        while True:
            item = await _next(queue, held.due_in())
            if item is None:  # the window passed with nothing new: send what is held
                for thought in held.flush():
                    yield thought
                continue
            if item is _END:
                break
            if isinstance(item, _Failed):
                raise item.exc
            assert isinstance(item, Thought)
            for thought in held.take(item):
                yield thought
        for thought in held.flush():
            yield thought
    finally:
        producer.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await producer


async def _produce(source: AsyncIterator[Thought], queue: asyncio.Queue[object]) -> None:
    """Queue the source's thoughts, then its end or its failure."""
    try:
        async for thought in source:
            await queue.put(thought)
    except Exception as exc:
        await queue.put(_Failed(exc))
        return
    await queue.put(_END)


async def _next(queue: asyncio.Queue[object], within: float | None) -> object | None:
    """The next item of ``queue``, or None once ``within`` seconds pass without one."""
    if within is None:
        return await queue.get()
    try:
        async with asyncio.timeout(within):
            return await queue.get()
    except TimeoutError:
        return None


class _Held:
    """The deltas held back to be merged, and when the last event went out."""

    def __init__(self, window: float) -> None:
        self.window = window
        self.pending: list[Thought] = []
        self.last_sent = -window

    def due_in(self) -> float | None:
        """Seconds until what is held must go out; None when nothing is held."""
        if not self.pending:
            return None
        return max(0.0, self.last_sent + self.window - time.monotonic())

    def flush(self) -> list[Thought]:
        """What is held, merged into one event (none if nothing is held)."""
        if not self.pending:
            return []
        merged, self.pending = _merge(self.pending), []
        self.last_sent = time.monotonic()
        return [merged]

    def take(self, item: Thought) -> list[Thought]:
        """The events that go out now that ``item`` came, in order."""
        if item.type not in MERGEABLE or item.extra:
            out = [*self.flush(), item]
            self.last_sent = time.monotonic()
            return out
        if self.pending and self.pending[0].type == item.type:
            self.pending.append(item)
            return []
        out = self.flush()
        if time.monotonic() - self.last_sent >= self.window:
            self.last_sent = time.monotonic()
            return [*out, item]
        self.pending = [item]
        return out


def _merge(thoughts: list[Thought]) -> Thought:
    if len(thoughts) == 1:
        return thoughts[0]
    return Thought(thoughts[0].type, "".join(str(t.content) for t in thoughts))
