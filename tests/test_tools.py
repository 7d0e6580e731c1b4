import asyncio

import pytest

from tests import agent_tools
from thoughtwire.worker.tools import ToolError, calculator, current_time, load, tool, toolbox


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
        "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
        "required": ["a"],
    }
    described = tool(current_time).schema["function"]["parameters"]
    assert described["required"] == []
    assert described["properties"]["timezone"]["type"] == "string"
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
