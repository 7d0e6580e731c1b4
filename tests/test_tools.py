from __future__ import annotations

import asyncio
import json
import logging
import subprocess
import sys
from typing import Annotated, Literal

import openai
import pytest
from pydantic import BaseModel, Field

from tests import agent_tools
from tests.fake_openai import FakeOpenAI, Reply
from thoughtwire.worker.agents.base import Turn
from thoughtwire.worker.agents.openai_chat import OpenAIAgent
from thoughtwire.worker.tools import (
    MAX_ERRORS_SHOWN,
    InvalidArguments,
    ToolError,
    ToolRefused,
    calculator,
    current_time,
    load,
    tool,
    toolbox,
)


@pytest.mark.parametrize(
    ("expression", "value"),
    [
        ("2 * (3 + 4)", "14"),
        ("7 / 2", "3.5"),
        ("-3 ** 2", "-9"),
        ("10 // 3 + 10 % 3", "4"),
        ("1e3", "1000"),
    ],
)
def test_calculator(expression, value):
    assert calculator(expression) == value


@pytest.mark.parametrize(
    "expression",
    [
        "__import__('os').system('true')",
        "open('/etc/passwd')",
        "x + 1",
        "2 ** 100000",
        "[1, 2]",
        "1; 2",
        "'a' * 3",
    ],
)
def test_calculator_refuses_anything_but_arithmetic(expression):
    with pytest.raises(ValueError):
        calculator(expression)


def test_current_time_knows_time_zones():
    assert current_time("Asia/Tokyo").endswith("+09:00")
    assert current_time().endswith("+00:00")
    with pytest.raises(ValueError):
        current_time("Mars/Olympus")


def test_schema_comes_from_hints_and_docstring():
    schema = tool(agent_tools.add).schema["function"]
    assert schema["name"] == "add"
    assert schema["description"] == "Add two whole numbers."
    assert schema["parameters"] == {
        "type": "object",
        "properties": {"a": {"type": "integer"}, "b": {"type": "integer", "default": 0}},
        "required": ["a"],
        "additionalProperties": False,
    }
    described = tool(current_time).schema["function"]["parameters"]
    assert described["required"] == []
    assert described["properties"]["timezone"]["anyOf"] == [{"type": "string"}, {"type": "null"}]
    assert "IANA" in described["properties"]["timezone"]["description"]


async def test_sync_and_async_tools_run_with_a_time_limit():
    assert await tool(agent_tools.add).call({"a": 1, "b": 2}, 1) == "3"
    assert await tool(calculator).call({"expression": "1+1"}, 1) == "2"

    async def slow() -> str:
        await asyncio.sleep(10)
        return "late"

    with pytest.raises(TimeoutError):
        await tool(slow).call({}, 0.05)


def test_user_tools_load_by_import_path():
    assert [t.name for t in load("tests.agent_tools:add, tests.agent_tools:explode")] == [
        "add",
        "explode",
    ]
    assert set(toolbox("tests.agent_tools:add")) == {"calculator", "current_time", "add"}
    with pytest.raises(ToolError):
        load("tests.agent_tools:nope")
    with pytest.raises(ToolError):
        load("no_such_module:f")


class Place(BaseModel):
    """Where something is."""

    city: str
    country: str = "FR"


class Folder(BaseModel):
    """A folder, which holds folders."""

    name: str
    children: list[Folder] = []


def plan(
    stops: list[str],
    mode: Literal["walk", "bike", "train"],
    start: Place,
    note: str | None,
    days: Annotated[int, Field(ge=1, description="how long, in days")] = 2,
    *,
    strict: bool = False,
) -> str:
    """Plan a trip.

    The planner is a stub: it says back what it was given.

    Args:
        stops: the places to see, in order; the list may
            go on for a while
        mode (str): how to travel
        start: where the trip begins
        note: anything the traveller wants said
        days: overridden by the hint's own description
    Returns:
        the plan
    """
    return f"{stops} {mode} {start.city},{start.country} {note} {days} {strict}"


def test_schema_is_pydantics_schema_of_the_arguments():
    described = tool(plan)
    assert described.description == "Plan a trip."
    parameters = described.parameters
    assert (parameters["type"], parameters["additionalProperties"]) == ("object", False)
    assert parameters["required"] == ["stops", "mode", "start"]
    properties = parameters["properties"]
    assert properties["stops"] == {
        "type": "array",
        "items": {"type": "string"},
        "description": "the places to see, in order; the list may go on for a while",
    }
    assert properties["mode"] == {
        "type": "string",
        "enum": ["walk", "bike", "train"],
        "description": "how to travel",
    }
    # The model is written out inline (no $ref), with the parameter's description.
    assert properties["start"] == {
        "type": "object",
        "title": "Place",
        "description": "where the trip begins",
        "properties": {"city": {"type": "string"}, "country": {"type": "string", "default": "FR"}},
        "required": ["city"],
    }
    # May be None, so not required: a model leaves it out.
    assert properties["note"]["default"] is None
    assert properties["days"] == {
        "type": "integer",
        "minimum": 1,
        "default": 2,
        "description": "how long, in days",
    }
    assert properties["strict"] == {"type": "boolean", "default": False}
    assert "$defs" not in json.dumps(parameters) and "$ref" not in json.dumps(parameters)


def test_a_recursive_model_keeps_its_definitions():
    def sync(root: Folder) -> str:
        """Copy a folder tree."""
        return root.name

    parameters = tool(sync).parameters
    assert parameters["properties"]["root"] == {"$ref": "#/$defs/Folder"}
    folder = parameters["$defs"]["Folder"]
    assert folder["properties"]["children"]["items"] == {"$ref": "#/$defs/Folder"}


async def test_arguments_are_validated_and_coerced_before_the_tool_runs():
    result = await tool(plan).call(
        {"stops": ["Lyon", 7], "mode": "train", "start": {"city": "Paris"}, "days": "3"}, 1
    )
    assert result == "['Lyon', '7'] train Paris,FR None 3 False"


async def test_arguments_that_do_not_fit_say_what_is_wrong_and_do_not_call_the_tool():
    calls = []

    def record(count: int, unit: Literal["s", "ms"] = "s") -> str:
        """Record a count."""
        calls.append(count)
        return "recorded"

    with pytest.raises(InvalidArguments) as raised:
        await tool(record).call({"count": "many", "unit": "h", "colour": "red"}, 1)
    assert str(raised.value).splitlines() == [
        "invalid arguments for record:",
        "- count: Input should be a valid integer, unable to parse string as an integer (got 'many')",
        "- unit: Input should be 's' or 'ms' (got 'h')",
        "- colour: Not a parameter of this tool (got 'red')",
    ]
    with pytest.raises(InvalidArguments, match=r"- count: Field required$"):
        await tool(record).call({}, 1)
    with pytest.raises(InvalidArguments, match=r"- start\.city: Field required"):
        await tool(plan).call({"stops": [], "mode": "walk", "start": {}}, 1)
    assert calls == []


async def test_a_long_list_of_problems_is_cut_short():
    def many(a: int, b: int, c: int, d: int, e: int, f: int, g: int) -> str:
        """Seven numbers."""
        return ""

    with pytest.raises(InvalidArguments) as raised:
        tool(many).validate({})
    lines = str(raised.value).splitlines()
    assert len(lines) == 1 + MAX_ERRORS_SHOWN + 1
    assert lines[-1] == "- and 2 more"


def test_functions_that_cannot_be_described_are_refused_when_loaded():
    def positional(a: int, /) -> str:
        """Positional only."""
        return ""

    def unresolved(a: NoSuchType) -> str:  # type: ignore[name-defined]  # noqa: F821
        """A hint that names nothing."""
        return ""

    class Opaque:
        pass

    def opaque(a: Opaque) -> str:
        """A hint pydantic cannot validate."""
        return ""

    for function in (positional, unresolved, opaque):
        with pytest.raises(ToolError):
            tool(function)


@pytest.fixture(scope="module")
def llm():
    server = FakeOpenAI().start()
    yield server
    server.stop()


async def test_a_bad_call_becomes_an_error_observation_and_the_model_calls_again(llm):
    llm.replies.extend(
        [
            Reply.tool_calls(("c1", "calculator", ['{"expr": ', '"6 * 7"}'])),
            Reply.tool_calls(("c2", "calculator", ['{"expression": "6 * 7"}'])),
            Reply.text("It is 42."),
        ]
    )
    client = openai.AsyncOpenAI(api_key="sk-test", base_url=llm.base_url, max_retries=0)
    agent = OpenAIAgent(client=client, model="test-model", tools=toolbox(None))
    try:
        async with asyncio.timeout(30):
            thoughts = [t async for t in agent.run(Turn("What is 6 * 7?"))]
    finally:
        await client.close()
    # The arguments stream as tool_input pieces before each whole action.
    assert [t.type for t in thoughts if t.type != "tool_input"] == [
        "action",
        "observation",
        "action",
        "observation",
        "answer",
        "done",
    ]
    bad, good = [t for t in thoughts if t.type == "observation"]
    assert bad.extra == {"tool": "calculator", "call_id": "c1.1", "is_error": True}
    assert bad.content.splitlines() == [
        "error: invalid arguments for calculator:",
        "- expression: Field required",
        "- expr: Not a parameter of this tool (got '6 * 7')",
    ]
    assert (good.content, good.extra["is_error"]) == ("42", False)
    assert thoughts[-1].extra["finish_reason"] == "stop"
    # The model read what was wrong before its second call.
    second = llm.requests[1]["body"]["messages"]
    assert second[-1] == {"role": "tool", "tool_call_id": "c1", "content": bad.content}
    sent = {t["function"]["name"]: t["function"] for t in llm.requests[0]["body"]["tools"]}
    assert sent["calculator"]["parameters"]["required"] == ["expression"]


def test_a_parameter_without_a_hint_is_a_string_and_extras_are_not_offered():
    def echo(text, *more, **options) -> str:  # type: ignore[no-untyped-def]
        """Say it back."""
        return str(text)

    described = tool(echo)
    assert described.parameters["properties"] == {"text": {"type": "string"}}
    assert described.validate({"text": 5}) == {"text": "5"}


# --- bounds on what a call may cost, and what a failure shows ----------------------


@pytest.mark.parametrize(
    "expression",
    [
        "(((9**99)**99)**99)**99",  # 23 characters, some 90 million digits
        "(9**99)**99 * (9**99)**99 * (9**99)**99",
        "(10**99)**99 * 10",
        "(2**99)**99 / 3",
        "(2.5**99)**99",
    ],
)
def test_the_calculator_refuses_a_result_too_large_before_computing_it(expression):
    # In a child process: on a calculator without bounds this would hold the GIL for
    # minutes, and no timeout in this process could stop it.
    code = (
        "import sys, time\n"
        "from thoughtwire.worker.tools import calculator, ToolRefused\n"
        "began = time.monotonic()\n"
        "try:\n"
        f"    calculator({expression!r})\n"
        "except ToolRefused as exc:\n"
        "    print(round(time.monotonic() - began, 3), exc)\n"
    )
    try:
        done = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, timeout=20
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"{expression} ran for more than 20 s")
    assert done.returncode == 0, done.stderr
    took, _, message = done.stdout.strip().partition(" ")
    assert float(took) < 0.1, took
    assert "digits" in message or "too large" in message, message


def test_the_calculator_still_computes_large_results_within_its_bound():
    assert calculator("10 ** 99 * 10 ** 99") == "1" + "0" * 198
    assert len(calculator("(2 ** 99) ** 40")) == len(str(2**3960))
    with pytest.raises(ToolRefused, match="division by zero"):
        calculator("1 / 0")


def leaky(city: str) -> str:
    """Fails with a secret in its message, as a careless user tool might.

    Args:
        city: the city
    """
    raise ConnectionError(f"GET https://api.example.com/weather?key=sk-SECRET&city={city}")


def polite(city: str) -> str:
    """Declines with a message written for the model.

    Args:
        city: the city
    """
    raise ToolRefused(f"no forecast for {city}; try a capital")


async def test_a_failing_tool_shows_the_model_and_clients_its_type_not_its_message(llm, caplog):
    llm.replies.extend(
        [
            Reply.tool_calls(("c1", "leaky", ['{"city": "Paris"}'])),
            Reply.tool_calls(("c2", "polite", ['{"city": "Lyon"}'])),
            Reply.text("No weather."),
        ]
    )
    client = openai.AsyncOpenAI(api_key="sk-test", base_url=llm.base_url, max_retries=0)
    tools = {**toolbox(None), "leaky": tool(leaky), "polite": tool(polite)}
    agent = OpenAIAgent(client=client, model="test-model", tools=tools)
    try:
        with caplog.at_level(logging.WARNING, logger="thoughtwire.agent"):
            async with asyncio.timeout(30):
                thoughts = [t async for t in agent.run(Turn("Weather?"))]
    finally:
        await client.close()
    leaked, declined = [t for t in thoughts if t.type == "observation"]
    assert leaked.content == "error: the tool failed (ConnectionError)"
    assert leaked.extra is not None
    assert (leaked.extra["tool"], leaked.extra["is_error"]) == ("leaky", True)
    assert declined.content == "error: no forecast for Lyon; try a capital"
    assert "SECRET" not in json.dumps(llm.requests[1]["body"])
    # The detail is in the worker's log, for its operator.
    assert "sk-SECRET" in caplog.text and "leaky" in caplog.text
