"""A run's token usage, and the reservations that hold it to the user's token budget.

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
:class:`BudgetCharge` holds a reservation in the user's counters, and a thought is
queued for writing only once the reservation covers it. The prompt (with its history)
is covered before the agent starts. When the reservation falls short, the run reserves
again, :data:`CHARGE_TOKENS` tokens at a time (or what the thought lacks, if more), with
one atomic script (``RESERVE``) that grants what remains under every window's limit if
that is less, and nothing once nothing remains: the run then ends with
:class:`BudgetSpent` before the thought is written (a run queued before the budget was
spent does not start).

The rule for a thought larger than what is granted: it is written only if the grant
that took the last of the budget covers it. The script then charges the whole thought,
past the limit; after it nothing remains, and every other run's next reservation gets
nothing. So a window's count stays below its limit plus one step, the largest single
thing a reservation covers (one thought, or a prompt with its history), in total, at
any moment, whatever the number of runs in flight.

As the run ends, the unused reservation goes back (``GIVE_BACK``), so the counters hold
what the run wrote; when the model server reported a total above that, the difference
is charged then, unconditionally, as the only charge not bounded above. A reservation
belongs to the windows it was granted in: when one of them is over, what is left of it
goes back and the run reserves in the new windows. Without a budget nothing is reserved
and Redis is not asked.

A run that waits for an approval keeps :meth:`RunUsage.state` in its waiting state; the
attempt that goes on from the wait restores it, so ``done`` counts the whole run and the
prompt is not reserved again. A draining worker that hands a run over gives back its
reservation (:meth:`RunUsage.hand_back`). What remains: an attempt whose worker dies
never gives back what it held (at most a chunk, or the prompt with its history), so that
much stays counted until its window ends; and a run that restarts from the beginning
(a ``retry``, not a wait) counts, in ``done``, only its last attempt, while the budget
holds everything every attempt wrote.

Reserving fails open: while Redis cannot be reached, the run goes on and what it writes
is owed, asked for again with the next reservation (at most every
:data:`RETRY_SECONDS`) and charged at the run's end in any case; the bound does not hold
for what is written meanwhile (the run's events cannot be written either, and the writer
decides what that means).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable
from typing import Any

from thoughtwire.shared.backoff import UNAVAILABLE
from thoughtwire.shared.grants import ANONYMOUS, Budget, Grants, budget_windows
from thoughtwire.shared.protocol import Thought
from thoughtwire.shared.redis import RedisError

logger = logging.getLogger("thoughtwire.worker")

CHARS_PER_TOKEN = 4
CHARGE_TOKENS = 64  # tokens a reservation asks for at a time: a Redis call per so many
RETRY_SECONDS = 1.0  # while Redis is away, how often a reservation is asked for again

COMPLETION_TYPES = frozenset({"thinking", "answer", "tool_input"})


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

    def _chars(self, thought: Thought) -> tuple[int, int]:
        """The prompt and completion characters ``thought`` adds."""
        kind, extra = thought.type, thought.extra or {}
        if kind in COMPLETION_TYPES or (
            kind == "action" and str(extra.get("call_id")) not in self._streamed_calls
        ):
            return 0, len(str(thought.content))
        if kind == "observation":
            return len(str(thought.content)), 0
        return 0, 0

    def cost(self, thought: Thought) -> int:
        """How many tokens counting ``thought`` would add to the total (counts nothing)."""
        return self._added(*self._chars(thought))

    def _added(self, prompt: int, completion: int) -> int:
        """How many tokens ``prompt`` and ``completion`` more characters add to the total."""
        after = math.ceil((self._prompt_chars + prompt) / CHARS_PER_TOKEN) + math.ceil(
            (self._completion_chars + completion) / CHARS_PER_TOKEN
        )
        return after - self.total_tokens

    def count(self, thought: Thought) -> int:
        """Count ``thought``; returns how many tokens it adds to the total."""
        prompt, completion = self._chars(thought)
        tokens = self._added(prompt, completion)
        self._prompt_chars += prompt
        self._completion_chars += completion
        extra = thought.extra or {}
        if thought.type == "tool_input" and extra.get("call_id") is not None:
            self._streamed_calls.add(str(extra["call_id"]))
        return tokens

    def state(self) -> dict[str, Any]:
        """The counts so far, as plain JSON, to go on from with :meth:`restore`."""
        return {
            "prompt_chars": self._prompt_chars,
            "completion_chars": self._completion_chars,
            "streamed_calls": sorted(self._streamed_calls),
        }

    def restore(self, state: dict[str, Any]) -> None:
        """Go on counting from ``state`` (:meth:`state`), an earlier attempt's counts."""
        self._prompt_chars = int(state["prompt_chars"])
        self._completion_chars = int(state["completion_chars"])
        self._streamed_calls = {str(call) for call in state.get("streamed_calls", ())}

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
    """One attempt's reservation in its user's budget counters (see above)."""

    def __init__(
        self,
        grants: Grants,
        user: str | None,
        budget: Budget,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.grants = grants
        self.user = user or ANONYMOUS
        self.budget = budget
        self.charged = 0  # tokens the counters hold from this attempt
        self.held = 0  # of those, reserved and not written yet
        self.written = 0  # tokens covered and written (charged or owed)
        self.owed = 0  # written while Redis was away: not charged yet
        self._clock = clock  # Unix seconds: which windows a reservation is in
        self._granted_at = 0.0  # when the reservation held was granted
        self._retry_at = 0.0

    async def start(self, prompt_tokens: int) -> None:
        """Before the agent starts: reserve for the prompt; raise :class:`BudgetSpent` if
        nothing remains."""
        await self._reserve(prompt_tokens, self._clock())

    async def cover(self, tokens: int) -> None:
        """Hold ``tokens`` for a thought about to be written, reserving more if the
        reservation falls short. Raises :class:`BudgetSpent` when nothing remains."""
        now = self._clock()
        if self.held and budget_windows(now) != budget_windows(self._granted_at):
            await self._give_back()  # granted in windows that are over: ask the new ones
        if tokens <= self.held:
            self.held -= tokens
            self.written += tokens
            return
        await self._reserve(tokens, now)

    async def _reserve(self, tokens: int, now: float) -> None:
        if now < self._retry_at:
            self._owe(tokens)
            return
        need = max(0, tokens - self.held) + self.owed
        try:
            granted, over = await self.grants.reserve(
                self.user, self.budget, need, max(need, CHARGE_TOKENS), now
            )
        except (*UNAVAILABLE, RedisError) as exc:
            logger.warning("reserving %d budget tokens failed (%r); the run goes on", need, exc)
            self._retry_at = now + RETRY_SECONDS
            self._owe(tokens)
            return
        if not granted:
            raise BudgetSpent(SPENT)
        # ``over`` only with the last grant: the thought is written past the limit.
        self.charged += granted + over
        self.held += granted + over - tokens - self.owed
        self.owed = 0
        self.written += tokens
        self._granted_at = now

    def _owe(self, tokens: int) -> None:
        """Write ``tokens`` without a reservation: what is held covers what it can."""
        self.owed += max(0, tokens - self.held)
        self.held = max(0, self.held - tokens)
        self.written += tokens

    async def _give_back(self) -> None:
        """Give the unused reservation back to the windows it was granted in."""
        held, self.held = self.held, 0
        try:
            await self.grants.give_back(self.user, held, self._granted_at)
        except (*UNAVAILABLE, RedisError) as exc:
            logger.warning("giving back %d budget tokens failed (%r)", held, exc)
        else:
            self.charged -= held

    async def settle(self, reported_total: int | None = None) -> None:
        """As the run ends: give back the unused reservation, and charge what is owed and
        what the model server's total, when it gave one, adds to what was written (an
        estimate above it is not given back)."""
        if self.held:
            await self._give_back()
        extra = self.owed + max(0, (reported_total or 0) - self.written)
        if not extra:
            return
        try:
            await self.grants.charge(self.user, extra, self._clock())
        except (*UNAVAILABLE, RedisError) as exc:
            logger.warning("charging %d tokens to a budget failed (%r); lost", extra, exc)
            return
        self.charged += extra
        self.owed = 0


class RunUsage:
    """One attempt's usage: counted always, held to a budget only when one is set."""

    def __init__(self, meter: UsageMeter, charge: BudgetCharge | None = None) -> None:
        self.meter = meter
        self.charge = charge
        self.resumed = False  # going on from an earlier attempt's counts: prompt paid for

    def state(self) -> dict[str, Any]:
        """The counts so far, as plain JSON: kept with an approval's wait, so the attempt
        that goes on from the wait counts the run whole (worker/approvals.py)."""
        written = self.charge.written if self.charge is not None else 0
        return {"meter": self.meter.state(), "written": written}

    def restore(self, state: dict[str, Any]) -> None:
        """Go on from an earlier attempt's :meth:`state`: what it wrote is counted in
        ``done`` and, with a budget, charged already (its prompt is not reserved again)."""
        self.meter.restore(state["meter"])
        if self.charge is not None:
            self.charge.written = int(state.get("written", 0))
        self.resumed = True

    async def start(self) -> None:
        """Before the agent runs: reserve for the prompt, or refuse (:class:`BudgetSpent`)."""
        if self.charge is not None and not self.resumed:
            await self.charge.start(self.meter.prompt_tokens)

    async def hand_back(self) -> None:
        """The run goes to another worker (shutdown): give back what this attempt reserved
        and did not write, and charge what it owes; what it wrote stays charged."""
        if self.charge is not None:
            await self.charge.settle()

    async def cover(self, thought: Thought) -> None:
        """Before ``thought`` is queued for writing: count it, held in the budget first.

        Raises :class:`BudgetSpent` (the thought uncounted) when nothing remains."""
        if self.charge is None:  # nothing to hold: count it at once
            self.meter.count(thought)
            return
        tokens = self.meter.cost(thought)
        if tokens:
            await self.charge.cover(tokens)
        self.meter.count(thought)

    async def settle(self, terminal: Thought) -> Thought:
        """Settle the reservation; returns ``terminal``, a ``done`` with its ``usage``."""
        extra = terminal.extra or {}
        reported = extra.get("usage") if terminal.type == "done" else None
        usage = self.meter.usage(reported)
        if self.charge is not None:
            await self.charge.settle(None if usage["estimated"] else usage["total_tokens"])
        if terminal.type != "done":
            return terminal
        return Thought(terminal.type, terminal.content, {**extra, "usage": usage})
