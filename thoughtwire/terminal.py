"""How ``thoughtwire chat`` draws runs in a terminal: from the reducer's state, only what is new.

A terminal only appends, so :class:`Transcript` remembers how much of each block it has
printed and, each time a run's state changes, prints the rest in block order:

- reasoning as joined text after ``💭`` (dim on a terminal that takes colour);
- a tool call as a small card: ``┌ 🔧 name`` with its arguments, then its approval and
  the decision, then ``└`` its result (``❌`` when it is an error);
- the answer streamed after ``✅``, as it comes;
- the end: usage on ``done`` (``~`` marks estimated counts), the error, or the cancel.

The state is the one ``thoughtwire.shared.reducer`` folds (docs/protocol.md, "The
reducer"); nothing here reads events.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, TextIO

DIM, RESET = "\x1b[2m", "\x1b[0m"
ARGUMENTS_SHOWN = 400  # characters of a tool call's arguments on its card
RESULT_SHOWN = 2000  # characters of a tool's result


@dataclass(frozen=True, slots=True)
class Approval:
    """A tool call waiting for a person: what the chat may ask about."""

    run: str
    call_id: str
    tool: str
    arguments: str


@dataclass
class _Progress:
    """What of one run has been printed."""

    attempt: int = 1
    chars: dict[str, int] = field(default_factory=dict)  # block id -> text printed
    stages: dict[str, str] = field(default_factory=dict)  # tool block id -> what its card shows
    ended: bool = False


def arguments_text(block: dict[str, Any]) -> str:
    """A tool call's arguments on one line: the parsed object as JSON, else the text streamed."""
    args = block.get("arguments")
    if args is None:
        text = str(block.get("input") or "")
    elif isinstance(args, str):
        text = args
    else:
        text = json.dumps(args, ensure_ascii=False)
    return text if len(text) <= ARGUMENTS_SHOWN else text[: ARGUMENTS_SHOWN - 1] + "…"


def decision_text(approval: dict[str, Any]) -> str:
    """``allowed by the session's owner: reason``, ``denied automatically (timeout)``, ..."""
    verb = "allowed" if approval.get("status") == "allow" else "denied"
    who = {
        "timeout": " automatically: nobody answered in time",
        "lost": " automatically: the wait for an answer was lost",
    }.get(str(approval.get("by")), " by the session's owner")
    reason = approval.get("reason")
    return f"{verb}{who}" + (f": {reason}" if reason else "")


def usage_text(usage: dict[str, Any] | None) -> str:
    """``123 tokens (100 prompt, 23 completion)``, each count with ``~`` when estimated."""
    if not usage or usage.get("total_tokens") is None:
        return ""
    mark = "~" if usage.get("estimated") else ""
    parts = f"{mark}{usage.get('prompt_tokens', 0)} prompt, {mark}{usage.get('completion_tokens', 0)} completion"
    return f"{mark}{usage['total_tokens']} tokens ({parts}{', estimated' if mark else ''})"


class Transcript:
    """Prints runs' states as they grow: only the new part of each, in block order."""

    def __init__(self, out: TextIO, *, color: bool = False, headers: bool = False) -> None:
        self.out = out
        self.color = color
        self.headers = headers  # say which run a line belongs to when runs take turns
        self.runs: dict[str, _Progress] = {}
        self.open: tuple[str, str] | None = None  # (run, block) whose line is still open
        self.last_run: str | None = None
        self.fresh_line = True  # nothing written yet on the current line

    def show(self, run: dict[str, Any]) -> list[Approval]:
        """Print what is new in ``run``; the approvals it waits for that were not shown before."""
        progress = self.runs.setdefault(run["run"], _Progress())
        if self.headers and self.last_run != run["run"]:
            self.close()
            self.write(f"── run {run['run']}\n")
        self.last_run = run["run"]
        if run["attempt"] != progress.attempt:
            self.close()
            self.write(f"↻ attempt {run['attempt']}: starting over\n")
            self.runs[run["run"]] = progress = _Progress(attempt=run["attempt"])
        asked: list[Approval] = []
        previous: dict[str, Any] | None = None
        for block in run["blocks"]:
            asked += self._block(run["run"], block, previous, progress)
            previous = block
        if run["status"] in ("done", "failed", "cancelled") and not progress.ended:
            progress.ended = True
            self._end(run)
        self.out.flush()
        return asked

    def close(self) -> None:
        """End the open line (reasoning or answer), if there is one."""
        if self.open is not None:
            if not self.fresh_line:
                self.write("\n")
            self.open = None

    def write(self, text: str, dim: bool = False) -> None:
        """Write ``text``, dim if asked and the terminal takes colour."""
        if text:
            self.out.write(f"{DIM}{text}{RESET}" if dim and self.color else text)
            self.fresh_line = text.endswith("\n")

    # --- blocks ------------------------------------------------------------------

    def _block(
        self,
        run: str,
        block: dict[str, Any],
        previous: dict[str, Any] | None,
        progress: _Progress,
    ) -> list[Approval]:
        kind = block["kind"]
        if kind == "reasoning":
            joined = previous is not None and previous["kind"] == "reasoning"
            self._stream(run, block, progress, "💭 ", dim=True, joined=joined)
        elif kind == "text":
            self._stream(run, block, progress, "✅ ", dim=False, joined=False)
        elif kind == "tool_call":
            return self._call(run, block, progress)
        elif kind == "tool_result" and block["id"] not in progress.stages:
            progress.stages[block["id"]] = "shown"
            self._result(block)
        return []

    def _stream(
        self,
        run: str,
        block: dict[str, Any],
        progress: _Progress,
        prefix: str,
        *,
        dim: bool,
        joined: bool,
    ) -> None:
        """Print the text of a block that has grown; a new block starts its own line."""
        text: str = block["text"]
        printed = progress.chars.get(block["id"])
        if printed is not None and printed == len(text):
            return
        if self.open != (run, block["id"]):
            self.close()
            if printed is None:
                # Reasoning that follows reasoning goes on under it, as one text.
                self.write("   " if joined else prefix)
            self.open = (run, block["id"])
        self.write(text[printed or 0 :], dim=dim)
        progress.chars[block["id"]] = len(text)

    def _call(self, run: str, block: dict[str, Any], progress: _Progress) -> list[Approval]:
        """A tool call's card, from the moment its arguments are complete or it asks approval."""
        approval = block.get("approval")
        stage = progress.stages.get(block["id"])
        if stage is None and (block["done"] or approval):
            self.close()
            name = block.get("tool") or block.get("text") or "tool"
            self.write(f"┌ 🔧 {name}\n")
            if block.get("tool"):
                self.write(f"│   {arguments_text(block)}\n")
            stage = progress.stages[block["id"]] = "call"
        if not approval or stage is None:
            return []
        status = approval.get("status")
        if status == "pending" and stage == "call":
            progress.stages[block["id"]] = "pending"
            self.write("│ ⏸  waiting for approval\n")
            call = Approval(
                run, str(block.get("call_id")), str(block.get("tool")), arguments_text(block)
            )
            return [call]
        if status in ("allow", "deny") and stage in ("call", "pending"):
            progress.stages[block["id"]] = "decided"
            self.write(f"│ {'✔' if status == 'allow' else '✖'}  {decision_text(approval)}\n")
        return []

    def _result(self, block: dict[str, Any]) -> None:
        self.close()
        text = str(block.get("text") or "")
        if len(text) > RESULT_SHOWN:
            text = text[: RESULT_SHOWN - 1] + "…"
        text = text.replace("\n", "\n    ")
        self.write(f"└ ❌ error: {text}\n" if block.get("is_error") else f"└ 👁️  {text}\n")

    def _end(self, run: dict[str, Any]) -> None:
        self.close()
        if run["status"] == "done":
            usage = usage_text(run.get("usage"))
            if usage:
                self.write(f"   {usage}\n", dim=True)
        elif run["status"] == "failed":
            error = run.get("error") or {}
            code = f" ({error['code']})" if error.get("code") else ""
            self.write(f"❌ {error.get('message') or 'the run failed'}{code}\n")
        else:
            self.write("❌ cancelled\n")
