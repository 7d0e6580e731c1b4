"""The openai agent: a tool-calling loop on the Chat Completions streaming API.

Works with OpenAI and compatible servers (vLLM, Ollama, LM Studio, llama.cpp, LiteLLM):
``OPENAI_BASE_URL`` picks the server. Each part of the stream becomes an event:

=====================================================  ===========================
model output                                           event
=====================================================  ===========================
reasoning deltas (``reasoning_content``/``reasoning``)  ``thinking`` (delta)
a tool call's arguments, piece by piece as they stream  ``tool_input`` (delta)
a tool call, once its streamed arguments are complete  ``action`` (whole, parsed)
the tool's result                                      ``observation`` (whole)
answer deltas                                          ``answer`` (delta)
=====================================================  ===========================

Deltas carry ``extra={"delta": True}`` (``tool_input`` also its ``call_id`` and
``tool``); the worker numbers the blocks (worker/blocks.py).

A call's ``call_id`` is the run's own, ``c<step>.<n>`` (its step and its place in the
step, from 1): every event of the call, its block and its approval go by it. The model
server's id is not used there: some compatible servers send none, or ``call_0`` at
every step, which would merge two calls into one block and let an answer meant for one
call decide another. The server's id goes back only to the model, with the call's
result, as the API wants (the run's id when the server sent none).

After tool calls it asks the model again, until the model answers or a limit is hit;
``done`` carries the finish reason, token usage, time to first token and total time.

Failures: before the first token of a call, 429, 5xx, connection errors and timeouts
are retried with backoff and jitter (honouring ``Retry-After``). After tokens have
streamed, the run ends with an ``error``. A wrong key fails at once. A stream that
goes silent for ``openai_idle_timeout`` is cut off. Messages shown to clients are
written here; exception text (which may hold URLs or keys) goes to the log only.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import openai

from thoughtwire.shared import tracing
from thoughtwire.shared.backoff import delays
from thoughtwire.shared.protocol import Thought
from thoughtwire.shared.settings import Settings
from thoughtwire.worker import metrics
from thoughtwire.worker.agents.base import AgentError, Turn, denied
from thoughtwire.worker.tools import InvalidArguments, Tool, ToolRefused, toolbox

logger = logging.getLogger("thoughtwire.agent")

RETRYABLE = (openai.RateLimitError, openai.InternalServerError, openai.APIConnectionError)
MAX_RETRY_AFTER = 30.0
MAX_OBSERVATION_CHARS = 16_000


@dataclass
class ModelLimits:
    """Bounds on one run of a model: steps, tokens, and time per tool call and per silence."""

    max_steps: int = 8
    max_tokens: int = 8192
    tool_timeout: float = 30.0
    idle_timeout: float = 30.0
    retries: int = 3


@dataclass
class _ToolCall:
    """A tool call as it streams in: its arguments arrive in pieces.

    ``call_id`` is the run's id for the call (:func:`_call_id`); ``id`` the model server's,
    if it sent one.
    """

    call_id: str = ""
    id: str = ""
    name: str = ""
    arguments: str = ""

    @property
    def model_id(self) -> str:
        """The id the model knows the call by: the server's, else the run's."""
        return self.id or self.call_id


@dataclass
class _Step:
    """What one streamed model call produced."""

    number: int = 0  # the step's number in the run, from 0
    content: list[str] = field(default_factory=list)
    calls: list[_ToolCall] = field(default_factory=list)
    finish_reason: str | None = None
    usage: dict[str, int] | None = None


@dataclass
class OpenAIAgent:
    """An agent that streams a chat model (OpenAI or compatible), with tool calls."""

    client: openai.AsyncOpenAI
    model: str
    tools: dict[str, Tool]
    limits: ModelLimits = field(default_factory=ModelLimits)

    @classmethod
    def from_settings(cls, settings: Settings) -> OpenAIAgent:
        """The agent the settings describe: client, model, tools and limits."""
        client = openai.AsyncOpenAI(
            api_key=settings.openai_api_key,
            base_url=settings.openai_base_url,
            timeout=settings.openai_timeout,
            max_retries=0,  # retried here, where it is known whether tokens were sent
        )
        limits = ModelLimits(
            max_steps=settings.max_steps,
            max_tokens=settings.max_tokens_per_run,
            tool_timeout=settings.tool_timeout,
            idle_timeout=settings.openai_idle_timeout,
            retries=settings.openai_retries,
        )
        tools = toolbox(settings.tools, settings.approval_tools)
        return cls(client=client, model=settings.openai_model, tools=tools, limits=limits)

    async def run(self, turn: Turn) -> AsyncIterator[Thought]:
        """Stream the model's reasoning, tool calls and answer, step by step."""
        started = time.monotonic()
        first_token: float | None = None
        usage, reported, first, asked = self._begin(turn)
        messages: list[dict[str, Any]] = [*turn.history, *turn.messages]
        finish = "max_steps"
        # A run that waited for an approval goes on with the calls of its step still to run.
        async for observation in self._call_tools(turn, asked, messages, (first - 1, usage)):
            yield observation
        for number in range(first, self.limits.max_steps):
            step = _Step(number)
            async for thought in self._stream(
                messages, step, max(1, self.limits.max_tokens - usage["completion_tokens"])
            ):
                if first_token is None:
                    first_token = time.monotonic()
                yield thought
            if step.usage:
                reported = True
                for key in usage:
                    usage[key] += step.usage.get(key, 0)
            assistant = _assistant(step)
            messages.append(assistant)
            turn.remember(assistant)
            if not step.calls:
                finish = step.finish_reason or "stop"
                break
            async for observation in self._call_tools(
                turn, step.calls, messages, (number, usage if reported else None)
            ):
                yield observation
            if usage["completion_tokens"] >= self.limits.max_tokens:
                finish = "max_tokens"
                break
        now = time.monotonic()
        yield Thought(
            "done",
            "",
            {
                "finish_reason": finish,
                "usage": usage if reported else None,
                "ttft_ms": None if first_token is None else round((first_token - started) * 1000),
                "total_ms": round((now - started) * 1000),
            },
        )

    @staticmethod
    def _begin(turn: Turn) -> tuple[dict[str, int], bool, int, list[_ToolCall]]:
        """Usage so far, whether reported, the next step, and the calls asked about."""
        zero = {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
        checkpoint = turn.resume
        if checkpoint is None:
            turn.remember({"role": "user", "content": turn.prompt})
            return zero, False, 0, []
        turn.messages[:] = checkpoint["messages"]
        usage = checkpoint["usage"]
        # A checkpoint from before calls had ids of their own kept the server's only.
        calls = [_ToolCall(**{"call_id": call["id"], **call}) for call in checkpoint["calls"]]
        return usage or zero, usage is not None, checkpoint["step"] + 1, calls

    async def _call_tools(
        self,
        turn: Turn,
        calls: list[_ToolCall],
        messages: list[dict[str, Any]],
        at: tuple[int, dict[str, int] | None],
    ) -> AsyncIterator[Thought]:
        """Run a step's tool calls in order; ask first about those that need approval.

        ``at`` is the step's number and the usage so far, for the checkpoint.
        """
        for index, call in enumerate(calls):
            tool = self.tools.get(call.name)
            if tool is not None and tool.needs_approval:
                checkpoint = {
                    "step": at[0],
                    "usage": at[1],
                    "messages": turn.messages,
                    "calls": [dataclasses.asdict(c) for c in calls[index:]],
                }
                observation, result = await self._approved_call(turn, call, checkpoint)
            else:
                observation, result = await self._call_tool(call)
            yield observation
            message = {"role": "tool", "tool_call_id": call.model_id, "content": result}
            messages.append(message)
            turn.remember(message)

    async def _approved_call(
        self, turn: Turn, call: _ToolCall, checkpoint: dict[str, Any]
    ) -> tuple[Thought, str]:
        """Ask a person about ``call``; run it if allowed, else say it was denied.

        Arguments that do not fit the tool are its error observation at once: nobody is
        asked about a call that cannot run.
        """
        arguments = _parse_arguments(call.arguments)
        if not _fits(self.tools.get(call.name), arguments):
            return await self._call_tool(call)
        decided = await turn.ask(call.call_id, call.name, arguments, checkpoint)
        if decided.allowed:
            return await self._call_tool(call)
        observation = denied(call.name, call.call_id, decided)
        return observation, str(observation.content)

    async def _stream(
        self, messages: list[dict[str, Any]], step: _Step, max_tokens: int
    ) -> AsyncIterator[Thought]:
        """One model call: yield its reasoning and answer deltas, collect its tool calls."""
        # Not made current: it ends across this generator's yields (shared/tracing.py).
        call = tracing.start(
            f"chat {self.model}",
            {
                "gen_ai.operation.name": "chat",
                "gen_ai.provider.name": "openai",
                "gen_ai.request.model": self.model,
                "gen_ai.request.max_tokens": max_tokens,
            },
        )
        failed = None
        try:
            async for thought in self._stream_call(messages, step, max_tokens):
                yield thought
        except Exception as exc:
            failed = type(exc).__name__
            raise
        finally:  # also when the run stops it midway
            tracing.end(call, _usage_attributes(step), error=failed)

    async def _stream_call(
        self, messages: list[dict[str, Any]], step: _Step, max_tokens: int
    ) -> AsyncIterator[Thought]:
        stream = await self._open(messages, max_tokens)
        try:
            while True:
                try:
                    async with asyncio.timeout(self.limits.idle_timeout):
                        chunk = await anext(stream)
                except StopAsyncIteration:
                    break
                except TimeoutError:
                    raise AgentError("the model provider stopped responding") from None
                except (openai.APIError, httpx.HTTPError) as exc:
                    logger.warning("the model stream failed: %r", exc)
                    raise AgentError("the model provider failed while answering") from None
                if chunk.usage is not None:
                    step.usage = chunk.usage.model_dump()
                for choice in chunk.choices:
                    for thought in self._read_delta(choice.delta, step):
                        yield thought
                    if choice.finish_reason:
                        step.finish_reason = choice.finish_reason
        finally:
            with contextlib.suppress(Exception):
                await stream.close()  # stops the generation on the server
        if step.calls:  # the last call's arguments are complete when the stream is
            yield self._action(step.calls[-1])

    def _read_delta(self, delta: Any, step: _Step) -> list[Thought]:
        out = []
        extra = delta.model_extra or {}
        reasoning = (
            getattr(delta, "reasoning_content", None)
            or extra.get("reasoning_content")
            or extra.get("reasoning")
        )
        if reasoning:
            out.append(Thought("thinking", reasoning, {"delta": True}))
        if delta.content:
            step.content.append(delta.content)
            out.append(Thought("answer", delta.content, {"delta": True}))
        for piece in delta.tool_calls or ():
            # Without an index, a piece goes on with the last call (or starts the first).
            index = piece.index if piece.index is not None else max(len(step.calls) - 1, 0)
            if index >= len(step.calls):
                # A new call starts: the one before it has all its arguments.
                if step.calls:
                    out.append(self._action(step.calls[-1]))
                step.calls.append(_ToolCall(_call_id(step.number, len(step.calls))))
            call = step.calls[index]
            call.id = piece.id or call.id
            if piece.function is not None:
                # The id and name usually come with a call's first piece only: kept here.
                call.name = piece.function.name or call.name
                call.arguments += piece.function.arguments or ""
                if piece.function.arguments:
                    extra = {"delta": True, "call_id": call.call_id, "tool": call.name}
                    out.append(Thought("tool_input", piece.function.arguments, extra))
        return out

    @staticmethod
    def _action(call: _ToolCall) -> Thought:
        arguments = _parse_arguments(call.arguments)
        shown = (
            json.dumps(arguments, ensure_ascii=False)
            if isinstance(arguments, dict)
            else call.arguments
        )
        return Thought(
            "action",
            f"{call.name}({shown})",
            {"tool": call.name, "arguments": arguments, "call_id": call.call_id},
        )

    async def _call_tool(self, call: _ToolCall) -> tuple[Thought, str]:
        attributes = {
            "gen_ai.operation.name": "execute_tool",
            "gen_ai.tool.name": call.name,
            "gen_ai.tool.call.id": call.call_id,
        }
        with tracing.span(f"execute_tool {call.name}", attributes) as span:
            observation, result = await self._run_tool(call)
            if span is not None:
                failed = bool((observation.extra or {}).get("is_error"))
                span.set_attribute("thoughtwire.tool.is_error", failed)
            return observation, result

    async def _run_tool(self, call: _ToolCall) -> tuple[Thought, str]:
        tool = self.tools.get(call.name)
        arguments = _parse_arguments(call.arguments)
        failed = True
        began = time.monotonic()
        if tool is None:
            result = f"error: there is no tool named {call.name!r}"
        elif not isinstance(arguments, dict):
            result = "error: the arguments are not a JSON object"
        else:
            try:
                result = await tool.call(arguments, self.limits.tool_timeout)
                failed = False
            except ToolRefused as exc:  # text for the model; InvalidArguments: it may call again
                result = f"error: {exc}"
            except TimeoutError:
                result = f"error: the tool took longer than {self.limits.tool_timeout:g} s"
            except Exception as exc:
                # Its text may hold a secret (a URL with a key): the model and every viewer
                # read the observation, so only the operator's log has the detail.
                logger.warning("tool %s failed on call %s", call.name, call.call_id, exc_info=True)
                result = f"error: the tool failed ({type(exc).__name__})"
        metrics.tool_called(None if tool is None else tool.name, time.monotonic() - began)
        result = result[:MAX_OBSERVATION_CHARS]
        extra = {"tool": call.name, "call_id": call.call_id, "is_error": failed}
        return Thought("observation", result, extra), result

    async def _open(self, messages: list[dict[str, Any]], max_tokens: int) -> Any:
        """Start a streamed call; retry what is worth retrying, before any token."""
        waits = delays(0.5, 8.0)
        request: dict[str, Any] = {
            "model": self.model,
            "messages": messages,
            "stream": True,
            "stream_options": {"include_usage": True},
            "max_completion_tokens": max_tokens,
        }
        if self.tools:
            request["tools"] = [t.schema for t in self.tools.values()]
        for attempt in range(self.limits.retries + 1):
            try:
                return await self.client.chat.completions.create(**request)
            except openai.AuthenticationError:
                raise AgentError(
                    "the model provider rejected the API key; check OPENAI_API_KEY"
                ) from None
            except (*RETRYABLE, openai.APITimeoutError) as exc:
                if attempt == self.limits.retries:
                    logger.warning("the model provider failed %d times: %r", attempt + 1, exc)
                    raise AgentError("the model provider is unavailable; try again later") from None
                await asyncio.sleep(_retry_after(exc) or next(waits))
            except openai.APIError as exc:
                logger.warning("the model provider refused the request: %r", exc)
                raise AgentError("the model provider failed") from None
        raise AssertionError("unreachable")


def _usage_attributes(step: _Step) -> dict[str, str | int]:
    """A model call's span attributes at its end: its tokens as the server counted them."""
    attributes: dict[str, str | int] = {}
    if step.usage:
        attributes["gen_ai.usage.input_tokens"] = int(step.usage.get("prompt_tokens") or 0)
        attributes["gen_ai.usage.output_tokens"] = int(step.usage.get("completion_tokens") or 0)
    if step.finish_reason:
        attributes["gen_ai.response.finish_reasons"] = step.finish_reason
    return attributes


def _assistant(step: _Step) -> dict[str, Any]:
    """The assistant message a step leaves: its text, and its tool calls if any."""
    assistant: dict[str, Any] = {"role": "assistant", "content": "".join(step.content) or None}
    if step.calls:
        assistant["tool_calls"] = [
            {
                "id": c.model_id,
                "type": "function",
                "function": {"name": c.name, "arguments": c.arguments},
            }
            for c in step.calls
        ]
    return assistant


def _call_id(step: int, index: int) -> str:
    """The run's id for the call at ``index`` of step ``step`` (both from 0): ``c1.1`` first.

    Unique within the run, and the same when a run goes on from an approval on another
    worker: the calls still to run come back from the checkpoint with their ids, and its
    steps are numbered on from the checkpoint's.
    """
    return f"c{step + 1}.{index + 1}"


def _fits(tool: Tool | None, arguments: Any) -> bool:
    """Whether ``tool`` can run with ``arguments``: a JSON object that fits its parameters."""
    if tool is None or not isinstance(arguments, dict):
        return False
    try:
        tool.validate(arguments)
    except InvalidArguments:
        return False
    return True


def _parse_arguments(text: str) -> Any:
    try:
        return json.loads(text or "{}")
    except json.JSONDecodeError:
        return text


def _retry_after(exc: Exception) -> float | None:
    """Seconds from ``retry-after-ms`` or ``Retry-After`` (seconds), if the server sent one."""
    response = getattr(exc, "response", None)
    if response is None:
        return None
    headers = response.headers
    try:
        if "retry-after-ms" in headers:
            return min(float(headers["retry-after-ms"]) / 1000, MAX_RETRY_AFTER)
        if "retry-after" in headers:
            return min(float(headers["retry-after"]), MAX_RETRY_AFTER)
    except ValueError:
        return None
    return None
