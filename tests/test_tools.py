"""Tools and environments on their own: the calculator's safety, resolving config.tools and config.environment
(one-line errors before any model loads), finding calls in a reply, and running calls with a timeout."""

from __future__ import annotations

import time

import pytest

from grpo.config import ConfigError, template_from_dict
from grpo.rollout.turns.environments import NumberGuess, resolve_environment
from grpo.rollout.turns.tools import CallFormat, calculator, resolve_tools, run_call, tools_description
from grpo.trainer import GRPOTrainer
from tests.conftest import tiny_template


# ---------------------------------------------------------------- user tools and environments for the tests
def add(a: int, b: int) -> int:
    """Add two whole numbers.

    Args:
        a: The first number.
        b: The second number.
    """
    return a + b


def sleepy(seconds: float) -> str:
    """Sleep, then answer.

    Args:
        seconds: How long to sleep.
    """
    time.sleep(seconds)
    return "awake"


def broken(x: int) -> int:
    """Always fails.

    Args:
        x: Ignored.
    """
    raise RuntimeError(f"broken on {x}")


def chatty(n: int) -> str:
    """A long answer.

    Args:
        n: How many characters.
    """
    return "y" * n


def untyped(a):
    """No type hints.

    Args:
        a: Something.
    """
    return a


class Stepless:
    def reset(self, row):
        return None


# ---------------------------------------------------------------- the calculator
@pytest.mark.parametrize(
    "expression, result",
    [
        ("347 * 58", "20126"),
        ("(2 + 3) * 4 - 1", "19"),
        ("7 / 2", "3.5"),
        ("8 / 2", "4"),
        ("2 ** 10", "1024"),
        (716, "716"),
    ],
)
def test_calculator_computes_arithmetic(expression, result):
    assert calculator(expression) == result


@pytest.mark.parametrize(
    "expression, message",
    [
        ("__import__('os').system('true')", "only numbers and + - * / // % ** are allowed, not Call"),
        ("x + 1", "only numbers and + - * / // % ** are allowed, not Name"),
        ("(1).real", "only numbers and + - * / // % ** are allowed, not Attribute"),
        ("'a' * 3", "only numbers and + - * / // % ** are allowed, not Constant"),
        ("[1] * 3", "only numbers and + - * / // % ** are allowed, not List"),
        ("2 ** 65", "exponents above 64 are not allowed"),
        ("10 ** 40", "numbers must stay below 10**30"),
        ("99999999999999999 * 99999999999999999", "numbers must stay below 10**30"),
        ("1 / 0", "division by zero"),
        ("1 +", "not an arithmetic expression: '1 +'"),
        ("1" + " + 1" * 100, "the expression is longer than 200 characters"),
    ],
)
def test_calculator_refuses_anything_but_bounded_arithmetic(expression, message):
    with pytest.raises(ValueError) as e:
        calculator(expression)
    assert str(e.value) == message


# ---------------------------------------------------------------- resolving tools and environments
def test_tools_resolve_to_functions_with_schemas():
    tools = resolve_tools(["calculator", "tests.test_tools:add"])
    assert list(tools) == ["calculator", "add"]
    assert tools["add"][0] is add
    assert tools["add"][1]["function"]["parameters"]["properties"]["a"] == {
        "type": "integer",
        "description": "The first number.",
    }


@pytest.mark.parametrize(
    "names, message",
    [
        (
            ["abacus"],
            "config.tools[0] = 'abacus' is not a built-in tool; use one of calculator or package.module:function.",
        ),
        (
            ["calculator", "tests.test_tools:untyped"],
            "config.tools[1] = 'tests.test_tools:untyped' cannot describe itself to the model (Argument a is missing "
            "a type hint in function untyped): a tool needs type hints on every argument and a Google-style "
            "docstring with an Args section.",
        ),
        (
            ["tests.test_tools:nothing"],
            "config.tools[0] = 'tests.test_tools:nothing': module 'tests.test_tools' has no function 'nothing'.",
        ),
        (
            ["calculator", "calculator"],
            "config.tools[1] = 'calculator': a tool named 'calculator' is listed twice.",
        ),
    ],
)
def test_bad_tools_are_refused_in_one_sentence(names, message):
    with pytest.raises(ConfigError) as e:
        resolve_tools(names)
    assert str(e.value) == message


def test_environments_need_reset_and_step():
    assert resolve_environment("number_guess") is NumberGuess
    with pytest.raises(ConfigError) as e:
        resolve_environment("tests.test_tools:Stepless")
    assert str(e.value) == (
        "config.environment = 'tests.test_tools:Stepless' lacks step: an environment needs reset(row) -> str | None "
        "and step(reply) -> (observation | None, done)."
    )
    with pytest.raises(ConfigError) as e:
        resolve_environment("tests.test_tools:add")
    assert (
        str(e.value)
        == "config.environment = 'tests.test_tools:add': module 'tests.test_tools' has no class 'add'."
    )


@pytest.mark.parametrize(
    "settings, message",
    [
        (
            {"tools": ["abacus"]},
            "config.tools[0] = 'abacus' is not a built-in tool; use one of calculator or package.module:function.",
        ),
        (
            {"environment": "tests.test_tools:Stepless"},
            "config.environment = 'tests.test_tools:Stepless' lacks step: an environment needs reset(row) -> str | "
            "None and step(reply) -> (observation | None, done).",
        ),
        (
            {"tools": ["calculator"], "environment": "number_guess"},
            "config.tools and config.environment are both set: a run uses one or the other.",
        ),
        (
            {"tools": ["calculator"], "tool_call_format": "<call>"},
            "config.tool_call_format = '<call>' must hold {json} once, with text on both sides, e.g. "
            "<tool_call>{json}</tool_call>.",
        ),
    ],
)
def test_the_trainer_refuses_bad_tool_settings_before_any_model_loads(tmp_path, settings, message):
    # the model folder is empty: the error must come before anything tries to load it
    (tmp_path / "empty").mkdir()
    template = template_from_dict(tiny_template(tmp_path / "empty", tmp_path / "run", **settings))
    with pytest.raises(ConfigError) as e:
        GRPOTrainer(template)
    assert str(e.value) == message


# ---------------------------------------------------------------- finding and running calls
def test_calls_are_found_in_the_configured_format():
    fmt = CallFormat.parse("<tool_call>{json}</tool_call>")
    reply = (
        'First <tool_call>{"name": "add", "arguments": {"a": 2, "b": 3}}</tool_call> then '
        '<tool_call>{"name": "add", "arguments": "{\\"a\\": 1, \\"b\\": 1}"}</tool_call> and <tool_call>oops</tool_call>'
    )
    assert fmt.find(reply) == [
        {"name": "add", "arguments": {"a": 2, "b": 3}, "error": None},
        {"name": "add", "arguments": {"a": 1, "b": 1}, "error": None},
        {"name": None, "arguments": {}, "error": "the call is not JSON (Expecting value)"},
    ]
    other = CallFormat.parse("[[{json}]]")
    assert other.find('[[{"name": "add", "arguments": {"a": 1, "b": 2}}]]') == [
        {"name": "add", "arguments": {"a": 1, "b": 2}, "error": None}
    ]
    assert other.find("<tool_call>{}</tool_call>") == []


def test_calls_run_with_a_timeout_an_output_budget_and_errors_as_text():
    tools = resolve_tools(
        [
            "tests.test_tools:add",
            "tests.test_tools:sleepy",
            "tests.test_tools:broken",
            "tests.test_tools:chatty",
        ]
    )

    def call(name, **arguments):
        return run_call(
            tools, {"name": name, "arguments": arguments, "error": None}, timeout=0.5, max_chars=80
        )

    assert call("add", a=2, b=3) == {
        "name": "add",
        "arguments": {"a": 2, "b": 3},
        "result": "5",
        "error": None,
    }
    start = time.perf_counter()
    assert call("sleepy", seconds=30)["error"] == "the tool did not return within 0.5 s"
    assert time.perf_counter() - start < 5
    assert call("broken", x=4)["error"] == "RuntimeError: broken on 4"
    assert call("chatty", n=100)["result"] == "y" * 80 + " ...[truncated]"
    assert call("add", a=1)["error"] == "TypeError: add() missing 1 required positional argument: 'b'"
    assert call("nope")["error"] == "unknown tool 'nope'; the tools are add, sleepy, broken, chatty"


def test_the_system_prompt_describes_the_tools_and_the_call_format():
    tools = resolve_tools(["calculator"])
    text = tools_description(
        [s for _, s in tools.values()], CallFormat.parse("<tool_call>{json}</tool_call>")
    )
    lines = text.splitlines()
    assert lines[0] == "You can call these tools:"
    assert lines[1].startswith('{"name": "calculator", "description": "Evaluate an arithmetic expression')
    assert lines[2] == (
        'To call a tool, write <tool_call>{"name": "calculator", "arguments": {"expression": "..."}}</tool_call> '
        "and wait for its result."
    )


def test_number_guess_answers_higher_lower_and_ends_on_the_secret():
    env = NumberGuess()
    assert env.reset({"question": "guess", "secret": 42}) is None
    assert env.step("I guess 10") == ("higher", False)
    assert env.step("maybe 90?") == ("lower", False)
    assert env.step("no idea") == ("Reply with one whole number from 1 to 100.", False)
    assert env.step("42") == (None, True)
    assert (env.guesses, env.solved) == (3, True)
    other = NumberGuess()
    other.reset({"question": "guess"})
    assert 1 <= other.secret <= 100
    again = NumberGuess()
    again.reset({"question": "guess"})
    assert again.secret == other.secret  # a function of the row alone
