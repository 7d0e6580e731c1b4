"""Tools an agent may call: the built-ins, and the user's, loaded by import path.

A tool is a plain function, sync or async. Its JSON schema is pydantic's schema of the
function's arguments (``TypeAdapter``), so ``list[str]`` has ``items``, a ``Literal`` is
an ``enum``, a pydantic model is an object schema, defaults are kept and a parameter
that may be ``None`` is not required. The docstring's first paragraph describes the
tool; its ``name: text`` lines under ``Args:`` describe the parameters. The same
adapter validates (and coerces) a call's arguments before the tool runs: a call that
does not fit raises ``InvalidArguments``, whose text says which field is wrong and how,
so the model can call again. ``THOUGHTWIRE_TOOLS=pkg.module:function,...`` adds tools.
"""

from __future__ import annotations

import ast
import asyncio
import copy
import dataclasses
import datetime as dt
import importlib
import inspect
import math
import operator
import re
import types
import typing
import zoneinfo
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from typing import Any, TypeVar

import pydantic
from pydantic.json_schema import GenerateJsonSchema

MAX_ERRORS_SHOWN = 5
MAX_INPUT_SHOWN = 40
# A model that writes 14 where a string is wanted means "14": take it rather than make
# it call again.
_ARGUMENTS_CONFIG = pydantic.ConfigDict(coerce_numbers_to_str=True)
_ARG_SECTIONS = ("Args:", "Arguments:", "Parameters:")
_ARG_LINE = re.compile(r"(\w+)\s*(?:\([^)]*\))?\s*:\s*(.*)")
_REF_PREFIX = "#/$defs/"
# Pydantic words a call's errors in Python's terms ("keyword only argument"); the model
# reads them as it reads a nested object's.
_PLAIN_MESSAGES = {
    "missing_argument": "Field required",
    "missing_keyword_only_argument": "Field required",
    "unexpected_keyword_argument": "Not a parameter of this tool",
}


F = TypeVar("F", bound=Callable[..., Any])


class ToolError(Exception):
    """A tool cannot be loaded or described."""


class ToolRefused(ValueError):
    """A tool declines a call; its text is written for the model, and shown as it is.

    Any other exception a tool raises is shown only by its type name (its text may hold
    what neither the model nor the session's viewers should read, such as a URL with a
    key); the worker logs it whole.
    """


class InvalidArguments(ToolRefused):
    """A call's arguments do not fit the tool's parameters; the text says what is wrong."""


@dataclass(frozen=True)
class Tool:
    """A function a model may call: its name, description and JSON-schema parameters."""

    name: str
    description: str
    parameters: dict[str, Any]
    function: Callable[..., Any]
    # A person allows or denies each call before it runs (docs/protocol.md, "Approvals").
    needs_approval: bool = False

    @property
    def schema(self) -> dict[str, Any]:
        """The tool as the Chat Completions API takes it."""
        return {
            "type": "function",
            "function": {
                "name": self.name,
                "description": self.description,
                "parameters": self.parameters,
            },
        }

    @cached_property
    def _arguments(self) -> pydantic.TypeAdapter[Any]:
        return _arguments_adapter(self.function)

    def validate(self, arguments: dict[str, Any]) -> dict[str, Any]:
        """The arguments, validated and coerced, defaults filled in; else ``InvalidArguments``."""
        try:
            _, kwargs = self._arguments.validate_python(arguments)
        except pydantic.ValidationError as exc:
            raise InvalidArguments(_describe(self.name, exc)) from None
        return dict(kwargs)

    async def call(self, arguments: dict[str, Any], seconds: float) -> str:
        """Validate the arguments, then run the tool for at most ``seconds``.

        Sync tools run in a thread, off the loop. Arguments that do not fit raise
        ``InvalidArguments`` and the tool is not called.
        """
        kwargs = self.validate(arguments)
        async with asyncio.timeout(seconds):
            if inspect.iscoroutinefunction(self.function):
                result = await self.function(**kwargs)
            else:
                result = await asyncio.to_thread(self.function, **kwargs)
        return result if isinstance(result, str) else str(result)


def tool(function: Callable[..., Any], *, needs_approval: bool | None = None) -> Tool:
    """Describe a function as a tool, from its signature, type hints and docstring.

    ``needs_approval`` (default: the function's own ``needs_approval`` attribute, which
    :func:`requires_approval` sets) makes each call wait for a person to allow it.
    """
    description, arg_docs = _parse_doc(inspect.getdoc(function) or "")
    parameters = _parameters(_arguments_adapter(function), arg_docs)
    if needs_approval is None:
        needs_approval = getattr(function, "needs_approval", False) is True
    return Tool(
        function.__name__, description or function.__name__, parameters, function, needs_approval
    )


def requires_approval(function: F) -> F:
    """Declare that every call of the tool ``function`` waits for a person to allow it."""
    function.needs_approval = True  # type: ignore[attr-defined]
    return function


# --- arguments: schema and validation ---------------------------------------


def _arguments_adapter(function: Callable[..., Any]) -> pydantic.TypeAdapter[Any]:
    """Pydantic's validator of a call of the function, from its signature and hints."""
    try:
        # TypeAdapter takes a function and validates a call of it (a case its code makes
        # for functions, as validate_call does); its type hint names only types.
        return pydantic.TypeAdapter(_arguments_of(function), config=_ARGUMENTS_CONFIG)  # type: ignore[arg-type]
    except (pydantic.PydanticUserError, pydantic.PydanticSchemaGenerationError) as exc:
        raise ToolError(f"cannot describe tool {function.__name__!r}: {exc}") from None


def _arguments_of(function: Callable[..., Any]) -> Callable[..., Any]:
    """A function with the tool's parameters that returns the arguments it was given.

    Pydantic validates a call of it as it would a call of the tool, and nothing runs:
    the tool itself is called later, with a time limit, in a thread if it is sync. A
    parameter that may be ``None`` and has no default gets ``None`` as its default (a
    model leaves out what it has no value for); ``*args`` and ``**kwargs`` are not
    offered to the model; a parameter without a hint is a string.
    """
    try:
        hints = typing.get_type_hints(function, include_extras=True)
    except Exception as exc:  # unresolvable forward references, mostly: NameError
        raise ToolError(f"cannot read the type hints of {function.__name__!r}: {exc}") from None
    parameters = []
    for param in inspect.signature(function).parameters.values():
        if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            continue
        if param.kind is param.POSITIONAL_ONLY:
            raise ToolError(f"tool {function.__name__!r}: arguments are passed by name")
        hint = hints.get(param.name, str)
        default = param.default
        if default is param.empty and _may_be_none(hint):
            default = None
        # Keyword-only: the tool is called by name, and a parameter given a default
        # here may come before one without.
        parameters.append(param.replace(kind=param.KEYWORD_ONLY, annotation=hint, default=default))

    def arguments(*args: Any, **kwargs: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
        return args, kwargs

    arguments.__signature__ = inspect.Signature(parameters)  # type: ignore[attr-defined]
    arguments.__annotations__ = {p.name: p.annotation for p in parameters}
    arguments.__name__ = arguments.__qualname__ = function.__name__
    arguments.__module__ = function.__module__
    return arguments


def _may_be_none(hint: Any) -> bool:
    if typing.get_origin(hint) is typing.Annotated:
        return _may_be_none(typing.get_args(hint)[0])
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return type(None) in typing.get_args(hint)
    return hint is None or hint is type(None)


class _NoFieldTitles(GenerateJsonSchema):
    """Pydantic's schema without a ``title`` on every property: tokens the model needn't read."""

    def field_title_should_be_set(self, schema: Any) -> bool:
        """Never: a property's name says it."""
        return False


def _parameters(adapter: pydantic.TypeAdapter[Any], arg_docs: dict[str, str]) -> dict[str, Any]:
    """The ``parameters`` object of a Chat Completions tool: an object schema, refs inlined."""
    schema = adapter.json_schema(schema_generator=_NoFieldTitles)
    properties = schema.get("properties", {})
    for name, text in arg_docs.items():
        if name in properties:
            properties[name].setdefault("description", text)
    schema = _inline_refs(schema)
    rest = {k: v for k, v in schema.items() if k not in ("type", "properties", "required")}
    return {
        "type": "object",
        "properties": schema.get("properties", {}),
        "required": schema.get("required", []),
        **rest,  # additionalProperties: false, as the validation holds; $defs if recursive
    }


class _Recursive(Exception):
    """A model refers to itself: its schema cannot be written out inline."""


def _inline_refs(schema: dict[str, Any]) -> dict[str, Any]:
    """The schema with each ``$ref`` replaced by its definition.

    Servers that speak the Chat Completions API but not all of JSON Schema (vLLM's and
    llama.cpp's grammars) read plain nested objects best. A recursive model cannot be
    inlined: its schema keeps ``$defs``, which the OpenAI API accepts.
    """
    definitions = schema.get("$defs")
    if not definitions:
        return schema
    body = {k: v for k, v in schema.items() if k != "$defs"}
    try:
        resolved: dict[str, Any] = _resolve(body, definitions, ())
    except _Recursive:
        return schema
    return resolved


def _resolve(node: Any, definitions: dict[str, Any], seen: tuple[str, ...]) -> Any:
    if isinstance(node, list):
        return [_resolve(item, definitions, seen) for item in node]
    if not isinstance(node, dict):
        return node
    ref = node.get("$ref")
    if not (isinstance(ref, str) and ref.startswith(_REF_PREFIX)):
        return {key: _resolve(value, definitions, seen) for key, value in node.items()}
    name = ref.removeprefix(_REF_PREFIX)
    if name in seen:
        raise _Recursive(name)
    target = _resolve(copy.deepcopy(definitions[name]), definitions, (*seen, name))
    siblings = {k: _resolve(v, definitions, seen) for k, v in node.items() if k != "$ref"}
    return {**target, **siblings}  # the parameter's own description wins over the model's


def _describe(name: str, exc: pydantic.ValidationError) -> str:
    """What is wrong with a call, one line per field, for the model to read and fix."""
    errors = exc.errors(include_url=False, include_context=False)
    lines = [f"invalid arguments for {name}:"]
    for error in errors[:MAX_ERRORS_SHOWN]:
        field = ".".join(str(part) for part in error["loc"]) or "arguments"
        message = _PLAIN_MESSAGES.get(error["type"], error["msg"])
        lines.append(f"- {field}: {message}{_shown_input(error)}")
    if len(errors) > MAX_ERRORS_SHOWN:
        lines.append(f"- and {len(errors) - MAX_ERRORS_SHOWN} more")
    return "\n".join(lines)


def _shown_input(error: Any) -> str:
    """``(got ...)`` for a wrong scalar (a missing field's input is the whole object)."""
    value = error.get("input")
    if not isinstance(value, str | int | float | bool):
        return ""
    text = repr(value)
    if len(text) > MAX_INPUT_SHOWN:
        text = text[: MAX_INPUT_SHOWN - 3] + "..."
    return f" (got {text})"


# --- docstrings ---------------------------------------------------------------


def _parse_doc(doc: str) -> tuple[str, dict[str, str]]:
    """The first paragraph, on one line, and each argument's description (Google style)."""
    lines = doc.splitlines()
    summary = []
    for line in lines:
        if not line.strip() or line.strip() in _ARG_SECTIONS:
            break
        summary.append(line)
    return " ".join(" ".join(summary).split()), _arg_docs(lines)


def _arg_docs(lines: list[str]) -> dict[str, str]:
    """``name: text`` lines under ``Args:``; deeper-indented lines continue the text."""
    docs: dict[str, str] = {}
    in_args, indent, name = False, 0, ""
    for line in lines:
        text = line.strip()
        depth = len(line) - len(line.lstrip())
        if not text:
            continue
        if depth == 0:  # a section heading, or prose: inspect.getdoc dedented the rest
            in_args, indent, name = text in _ARG_SECTIONS, 0, ""
            continue
        indent = indent or depth
        match = _ARG_LINE.fullmatch(text) if in_args and depth <= indent else None
        if match:
            name = match[1]
            docs[name] = match[2]
        elif in_args and name:
            docs[name] = f"{docs[name]} {text}".strip()
    return docs


def load(spec: str) -> list[Tool]:
    """Tools named ``pkg.module:function,...``."""
    tools = []
    for item in filter(None, (part.strip() for part in spec.split(","))):
        module_name, _, attribute = item.partition(":")
        try:
            function = getattr(importlib.import_module(module_name), attribute)
        except (ImportError, AttributeError, ValueError) as exc:
            raise ToolError(f"cannot load tool {item!r}: {exc}") from None
        tools.append(tool(function))
    return tools


# --- built-ins --------------------------------------------------------------

_OPERATORS: dict[type, Callable[..., Any]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: operator.pow,
    ast.USub: operator.neg,
    ast.UAdd: operator.pos,
}
MAX_EXPRESSION = 200
MAX_EXPONENT = 100
# Every intermediate result is bounded before it is computed: a big-integer power or
# product runs in C without releasing the GIL, so no timeout could stop it, and
# "(((9**99)**99)**99)**99" alone is some 90 million digits. Below Python's own limit on
# turning an int into text (4,300 digits), so every result can be shown.
MAX_DIGITS = 4000
_MAX_BITS = math.ceil(MAX_DIGITS * math.log2(10))


def calculator(expression: str) -> str:
    """Evaluate an arithmetic expression: numbers, + - * / // % ** and parentheses.

    Args:
        expression: the expression, for example "2 * (3 + 4)"
    """
    if len(expression) > MAX_EXPRESSION:
        raise ToolRefused(f"expression is longer than {MAX_EXPRESSION} characters")
    try:
        tree = ast.parse(expression, mode="eval")
    except SyntaxError:
        raise ToolRefused(f"not an arithmetic expression: {expression!r}") from None
    try:
        value = _evaluate(tree.body)
    except ZeroDivisionError:
        raise ToolRefused("division by zero") from None
    except OverflowError:
        raise ToolRefused("a result is too large for a floating-point number") from None
    return str(int(value) if isinstance(value, float) and value.is_integer() else value)


def _evaluate(node: ast.AST) -> float | int:
    """Walk the parsed expression; only numbers and arithmetic are allowed: never eval."""
    if (
        isinstance(node, ast.Constant)
        and isinstance(node.value, int | float)
        and not isinstance(node.value, bool)
    ):
        return node.value
    if isinstance(node, ast.BinOp) and type(node.op) in _OPERATORS:
        left, right = _evaluate(node.left), _evaluate(node.right)
        _check_size(node.op, left, right)
        return _OPERATORS[type(node.op)](left, right)
    if isinstance(node, ast.UnaryOp) and type(node.op) in _OPERATORS:
        return _OPERATORS[type(node.op)](_evaluate(node.operand))
    raise ToolRefused("only numbers and + - * / // % ** ( ) are allowed")


def _check_size(op: ast.operator, left: float | int, right: float | int) -> None:
    """Refuse an operation whose result would exceed :data:`MAX_DIGITS`, before it runs.

    Only ``**`` and ``*`` of integers grow a result past its operands; the other
    operators, and floats (which overflow with an ``OverflowError``), stay bounded.
    """
    if isinstance(op, ast.Pow):
        if abs(right) > MAX_EXPONENT:
            raise ToolRefused(f"exponents are limited to {MAX_EXPONENT}")
        bits = abs(left).bit_length() * right if isinstance(left, int) and right > 0 else 0
    elif isinstance(op, ast.Mult) and isinstance(left, int) and isinstance(right, int):
        bits = abs(left).bit_length() + abs(right).bit_length()
    else:
        return
    # bit_length overstates log2 by less than a bit a factor: the bound is a little early.
    if bits > _MAX_BITS:
        raise ToolRefused(f"the result would have more than {MAX_DIGITS} digits")


def current_time(timezone: str | None = None) -> str:
    """The current date and time, in ISO 8601.

    Args:
        timezone: an IANA time zone such as "Europe/Paris"; UTC when omitted
    """
    try:
        zone = zoneinfo.ZoneInfo(timezone or "UTC")
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        raise ToolRefused(f"unknown time zone: {timezone!r}") from None
    return dt.datetime.now(zone).isoformat(timespec="seconds")


BUILTINS = (tool(calculator), tool(current_time))


def toolbox(spec: str | None, approval_tools: str = "") -> dict[str, Tool]:
    """The built-ins plus the user's tools, by name; those named in ``approval_tools``
    (``name,...``) need approval, besides those that declare it."""
    tools = [*BUILTINS, *load(spec or "")]
    named = approval_names(approval_tools)
    return {
        t.name: dataclasses.replace(t, needs_approval=True) if t.name in named else t for t in tools
    }


def approval_names(approval_tools: str) -> frozenset[str]:
    """The tool names of ``THOUGHTWIRE_APPROVAL_TOOLS`` (``name,...``)."""
    return frozenset(filter(None, (name.strip() for name in approval_tools.split(","))))
