"""Tools an agent may call: the built-ins, and the user's, loaded by import path.

A tool is a plain function, sync or async. Its JSON schema comes from its type hints
and its docstring (the first paragraph describes the tool; ``name: text`` lines
under ``Args:`` describe parameters). ``THOUGHTWIRE_TOOLS=pkg.module:function,...``
adds tools.
"""

from __future__ import annotations

import ast
import asyncio
import datetime as dt
import importlib
import inspect
import operator
import types
import typing
import zoneinfo
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

_JSON_TYPES: dict[Any, str] = {
    str: "string",
    int: "integer",
    float: "number",
    bool: "boolean",
    list: "array",
    dict: "object",
}


class ToolError(Exception):
    """A tool cannot be loaded or described."""


@dataclass(frozen=True)
class Tool:
    """A function a model may call: its name, description and JSON-schema parameters."""

    name: str
    description: str
    parameters: dict[str, Any]
    function: Callable[..., Any]

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

    async def call(self, arguments: dict[str, Any], seconds: float) -> str:
        """Run the tool for at most ``seconds``; sync tools run in a thread, off the loop."""
        async with asyncio.timeout(seconds):
            if inspect.iscoroutinefunction(self.function):
                result = await self.function(**arguments)
            else:
                result = await asyncio.to_thread(self.function, **arguments)
        return result if isinstance(result, str) else str(result)


def tool(function: Callable[..., Any]) -> Tool:
    """Describe a function as a tool, from its signature, type hints and docstring."""
    hints = typing.get_type_hints(function)
    doc = inspect.getdoc(function) or ""
    description, arg_docs = _parse_doc(doc)
    properties: dict[str, Any] = {}
    required = []
    for name, param in inspect.signature(function).parameters.items():
        if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            continue
        kind, optional = _json_type(hints.get(name, str))
        properties[name] = {"type": kind}
        if name in arg_docs:
            properties[name]["description"] = arg_docs[name]
        if param.default is param.empty and not optional:
            required.append(name)
    parameters = {"type": "object", "properties": properties, "required": required}
    return Tool(function.__name__, description or function.__name__, parameters, function)


def _json_type(hint: Any) -> tuple[str, bool]:
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType) and type(None) in args:
        inner = [a for a in args if a is not type(None)]
        return _json_type(inner[0])[0], True
    return _JSON_TYPES.get(typing.get_origin(hint) or hint, "string"), False


def _parse_doc(doc: str) -> tuple[str, dict[str, str]]:
    description, _, rest = doc.partition("\n\n")
    arg_docs = {}
    in_args = False
    for line in rest.splitlines():
        if line.strip() in ("Args:", "Arguments:", "Parameters:"):
            in_args = True
        elif in_args and ":" in line:
            name, _, text = line.strip().partition(":")
            arg_docs[name.split(" ")[0]] = text.strip()
    return " ".join(description.split()), arg_docs


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


def calculator(expression: str) -> str:
    """Evaluate an arithmetic expression: numbers, + - * / // % ** and parentheses.

    Args:
        expression: the expression, for example "2 * (3 + 4)"
    """
    if len(expression) > MAX_EXPRESSION:
        raise ValueError(f"expression is longer than {MAX_EXPRESSION} characters")
    try:
        tree = ast.parse(expression, mode="eval")
    except SyntaxError:
        raise ValueError(f"not an arithmetic expression: {expression!r}") from None
    value = _evaluate(tree.body)
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
        if isinstance(node.op, ast.Pow) and abs(right) > MAX_EXPONENT:
            raise ValueError(f"exponents are limited to {MAX_EXPONENT}")
        return _OPERATORS[type(node.op)](left, right)
    if isinstance(node, ast.UnaryOp) and type(node.op) in _OPERATORS:
        return _OPERATORS[type(node.op)](_evaluate(node.operand))
    raise ValueError("only numbers and + - * / // % ** ( ) are allowed")


def current_time(timezone: str | None = None) -> str:
    """The current date and time, in ISO 8601.

    Args:
        timezone: an IANA time zone such as "Europe/Paris"; UTC when omitted
    """
    try:
        zone = zoneinfo.ZoneInfo(timezone or "UTC")
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        raise ValueError(f"unknown time zone: {timezone!r}") from None
    return dt.datetime.now(zone).isoformat(timespec="seconds")


BUILTINS = (tool(calculator), tool(current_time))


def toolbox(spec: str | None) -> dict[str, Tool]:
    """The built-ins plus the user's tools, by name."""
    tools = [*BUILTINS, *load(spec or "")]
    return {t.name: t for t in tools}
