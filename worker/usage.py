"""A run's token usage, and its charges to the user's token budget.

**Usage.** Every ``done`` carries ``usage``: ``prompt_tokens``, ``completion_tokens``,
``total_tokens`` and ``estimated``. When the agent's own ``done`` has the model server's
counts, they are used as they are (``estimated: false``). Otherwise :class:`UsageMeter`
counts, at about :data:`CHARS_PER_TOKEN` characters a token (English text with
OpenAI's tokenizers; code and other languages take more tokens):

* prompt: the prompt and the history sent with it (each message's text and tool-call
  arguments), and every tool result (``observation``), which goes back to the model;
* completion: what the agent wrote: ``thinking``, ``answer`` and ``tool_input`` text, and
  an ``action``'s text when no ``tool_input`` came for its call.

**Budgets.** With a budget set (:class:`~thoughtwire.shared.grants.Budget`),
:class:`BudgetCharge` charges the user's counters as the run writes, batched: when
:data:`CHARGE_TOKENS` tokens are pending, when :data:`CHARGE_SECONDS` have passed since
the last charge, and at a step's end (an ``action``, an ``observation``). Before the
agent starts, the counters are read: a run queued before the budget was spent does not
start (its prompt is charged with the first charge). A run whose charge reaches a limit
stops with :class:`BudgetSpent`. So each run in flight can overrun a budget by
one step: under ``CHARGE_TOKENS`` tokens plus its largest single thought, or what it
wrote in ``CHARGE_SECONDS``. Without a budget nothing is charged and Redis is not asked.

Charging fails open: while Redis cannot be reached the tokens stay pending and go with
the next charge; the run goes on (its events cannot be written either, and the writer
decides what that means).
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable, Iterable
from typing import Any

from thoughtwire.shared.backoff import UNAVAILABLE
from thoughtwire.shared.grants import ANONYMOUS, Budget, Grants
from thoughtwire.shared.protocol import Thought
from thoughtwire.shared.redis import RedisError

logger = logging.getLogger("thoughtwire.worker")

CHARS_PER_TOKEN = 4
CHARGE_TOKENS = 64  # pending tokens that make a charge due
CHARGE_SECONDS = 0.1  # the longest pending tokens wait while the run writes

COMPLETION_TYPES = frozenset({"thinking", "answer", "tool_input"})
STEP_ENDS = frozenset({"action", "observation"})  # a tool round: a charge is due


SPENT = "the token budget is spent; GET /v1/budget says when it refills"


class BudgetSpent(Exception):
    """The user's token budget is spent: the run ends with an ``error``, code ``budget``."""


def estimate_tokens(text: str) -> int:
    """About how many tokens ``text`` is: a token per :data:`CHARS_PER_TOKEN` characters."""
    return math.ceil(len(text) / CHARS_PER_TOKEN)


def message_text(messages: Iterable[dict[str, Any]]) -> int:
    """The characters of chat messages a model reads: contents and tool-call arguments."""
    chars = 0
    for message in messages:
        content = message.get("content")
        chars += len(content) if isinstance(content, str) else len(str(content or ""))
        for call in message.get("tool_calls") or ():
            chars += len(str(call.get("function", {}).get("arguments", "")))
    return chars


class UsageMeter:
    """Counts one attempt's tokens, estimated, from what it sends and writes.

    Characters are summed and turned into tokens as a whole, so the estimate does not
    depend on how finely the agent cut its text.
    """

    def __init__(self, prompt: str, history: Iterable[dict[str, Any]] = ()) -> None:
        self._prompt_chars = len(prompt) + message_text(history)
        self._completion_chars = 0
        self._streamed_calls: set[str] = set()  # call ids whose arguments came as tool_input

    @property
    def prompt_tokens(self) -> int:
        """Tokens sent to the model so far, estimated."""
        return math.ceil(self._prompt_chars / CHARS_PER_TOKEN)

    @property
    def completion_tokens(self) -> int:
        """Tokens the agent wrote so far, estimated."""
        return math.ceil(self._completion_chars / CHARS_PER_TOKEN)

    @property
    def total_tokens(self) -> int:
        """Prompt and completion tokens counted so far."""
        return self.prompt_tokens + self.completion_tokens

    def count(self, thought: Thought) -> int:
        """Count ``thought``; returns how many tokens it adds to the total."""
        kind, extra = thought.type, thought.extra or {}
        before = self.total_tokens
        if kind in COMPLETION_TYPES:
            if kind == "tool_input" and extra.get("call_id") is not None:
                self._streamed_calls.add(str(extra["call_id"]))
            self._completion_chars += len(str(thought.content))
        elif kind == "action" and str(extra.get("call_id")) not in self._streamed_calls:
            self._completion_chars += len(str(thought.content))
        elif kind == "observation":
            self._prompt_chars += len(str(thought.content))
        else:
            return 0
        return self.total_tokens - before

    def usage(self, reported: dict[str, Any] | None = None) -> dict[str, Any]:
        """The ``usage`` of ``done``: the model server's counts if ``reported``, else ours."""
        if reported:
            prompt = int(reported.get("prompt_tokens") or 0)
            completion = int(reported.get("completion_tokens") or 0)
            total = int(reported.get("total_tokens") or prompt + completion)
            estimated = False
        else:
            prompt, completion, total = (
                self.prompt_tokens,
                self.completion_tokens,
                self.total_tokens,
            )
            estimated = True
        return {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": total,
            "estimated": estimated,
        }


class BudgetCharge:
    """Charges one attempt's tokens to its user's budget counters, batched (see above)."""

    def __init__(
        self,
        grants: Grants,
        user: str | None,
        budget: Budget,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.grants = grants
        self.user = user or ANONYMOUS
        self.budget = budget
        self.charged = 0  # tokens the counters have taken from this attempt
        self.pending = 0  # tokens counted but not charged yet
        self._clock = clock
        self._last = clock()

    async def start(self, prompt_tokens: int) -> None:
        """Before the agent starts: raise :class:`BudgetSpent` if the budget is spent
        already; the prompt's tokens go with the first charge."""
        try:
            used = await self.grants.budget_used(self.user, time.time())
        except (*UNAVAILABLE, RedisError) as exc:
            logger.warning("reading a budget failed (%r); the run goes on", exc)
        else:
            if self.budget.spent(used):
                raise BudgetSpent(SPENT)
        self.pending += prompt_tokens

    async def add(self, tokens: int, *, step_end: bool = False) -> None:
        """Count ``tokens``; charge when due. Raises :class:`BudgetSpent` past a limit."""
        self.pending += tokens
        if self.pending and (
            step_end
            or self.pending >= CHARGE_TOKENS
            or self._clock() - self._last >= CHARGE_SECONDS
        ):
            await self.flush()

    async def flush(self) -> None:
        """Charge what is pending; raise :class:`BudgetSpent` if a limit is reached."""
        tokens, self._last = self.pending, self._clock()
        try:
            used = await self.grants.charge(self.user, tokens, time.time())
        except (*UNAVAILABLE, RedisError) as exc:
            logger.warning("charging %d tokens to a budget failed (%r); kept", tokens, exc)
            return
        self.pending -= tokens
        self.charged += tokens
        if self.budget.spent(used):
            raise BudgetSpent(SPENT)

    async def settle(self, reported_total: int | None = None) -> None:
        """Charge what is left as the run ends; the model server's total, when it gave
        one, replaces the estimate (an estimate above it is not given back)."""
        if reported_total is not None:
            self.pending = max(self.pending, reported_total - self.charged)
        if self.pending:
            with contextlib.suppress(BudgetSpent):  # the run has ended anyway
                await self.flush()


class RunUsage:
    """One attempt's usage: counted always, charged to a budget only when one is set."""

    def __init__(self, meter: UsageMeter, charge: BudgetCharge | None = None) -> None:
        self.meter = meter
        self.charge = charge

    async def start(self) -> None:
        """Before the agent runs: refuse (:class:`BudgetSpent`) if the budget is spent."""
        if self.charge is not None:
            await self.charge.start(self.meter.prompt_tokens)

    async def record(self, thought: Thought) -> None:
        """Count a thought the agent yielded; charge the budget when due."""
        tokens = self.meter.count(thought)
        if self.charge is not None:
            await self.charge.add(tokens, step_end=thought.type in STEP_ENDS)

    async def settle(self, terminal: Thought) -> Thought:
        """Charge what is left; returns ``terminal``, a ``done`` with its ``usage``."""
        extra = terminal.extra or {}
        reported = extra.get("usage") if terminal.type == "done" else None
        usage = self.meter.usage(reported)
        if self.charge is not None:
            await self.charge.settle(None if usage["estimated"] else usage["total_tokens"])
        if terminal.type != "done":
            return terminal
        return Thought(terminal.type, terminal.content, {**extra, "usage": usage})
