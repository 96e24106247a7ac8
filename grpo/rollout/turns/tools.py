"""Tools a model may call during a rollout: resolving `config.tools`, their JSON schemas, finding the calls in a
reply, and running each call with a timeout and an output budget. The built-in `calculator` is here too.

A tool is trusted code (docs/tools.md), but the model chooses its arguments: every call runs in a worker process
(user_code.py) that a timeout kills and replaces, and anything a call does wrong comes back to the model as an
error text. Built-in tools never run model-written code: the calculator parses arithmetic with `ast` and
evaluates only numbers and operators.
"""

from __future__ import annotations

import ast
import json
import operator
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from grpo.errors import ConfigError
from grpo.rollout.turns.user_code import UserProcess, describe, require_sendable

CALC_MAX_DIGITS = 30  # operands and every intermediate result stay below 10**30
CALC_MAX_EXPONENT = 64
CALC_MAX_LENGTH = 200  # characters of an expression


def calculator(expression: str) -> str:
    """Evaluate an arithmetic expression with + - * / // % ** and parentheses.

    Args:
        expression: The arithmetic to evaluate, for example "347 * 58".
    """
    expression = str(expression)  # a model may write a bare number where the schema asks for a string
    if len(expression) > CALC_MAX_LENGTH:
        raise ValueError(f"the expression is longer than {CALC_MAX_LENGTH} characters")
    try:
        tree = ast.parse(expression.strip(), mode="eval")
    except SyntaxError:
        raise ValueError(f"not an arithmetic expression: {expression!r}") from None
    value = _arithmetic(tree.body)
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return str(value)


_BINARY = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: operator.pow,
}
_UNARY = {ast.UAdd: operator.pos, ast.USub: operator.neg}


def _arithmetic(node: ast.AST) -> int | float:
    """Numbers and operators only: any name, call or attribute is refused, so nothing but arithmetic runs."""
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return _bounded(node.value)
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _UNARY[type(node.op)](_arithmetic(node.operand))
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        left, right = _arithmetic(node.left), _arithmetic(node.right)
        if isinstance(node.op, ast.Pow) and abs(right) > CALC_MAX_EXPONENT:
            raise ValueError(f"exponents above {CALC_MAX_EXPONENT} are not allowed")
        if isinstance(node.op, (ast.Div, ast.FloorDiv, ast.Mod)) and right == 0:
            raise ValueError("division by zero")
        return _bounded(_BINARY[type(node.op)](left, right))
    raise ValueError(f"only numbers and + - * / // % ** are allowed, not {type(node).__name__}")


def _bounded(value: Any) -> int | float:
    if isinstance(value, complex) or abs(value) >= 10**CALC_MAX_DIGITS:
        raise ValueError(f"numbers must stay below 10**{CALC_MAX_DIGITS}")
    return value


BUILTIN_TOOLS: dict[str, Callable[..., Any]] = {"calculator": calculator}


# ---------------------------------------------------------------- resolving
class Tools(dict):
    """{name: (function, JSON schema)}, and the worker process that runs the calls (started at the first)."""

    def __init__(self, tools: dict[str, tuple[Callable[..., Any], dict[str, Any]]]):
        super().__init__(tools)
        functions = {name: fn for name, (fn, _) in tools.items()}
        self.worker = UserProcess(_serve_call, functions, what=f"config.tools = {list(tools)!r}")


def resolve_tools(names: list[str]) -> Tools:
    """config.tools -> {name: (function, JSON schema)}, checked before any model loads."""
    from transformers.utils import get_json_schema

    # Imported here: the worker process imports this module, and must not pay for torch.
    from grpo.rewards.scoring import resolve_function

    tools: dict[str, tuple[Callable[..., Any], dict[str, Any]]] = {}
    for i, spec in enumerate(names):
        where = f"config.tools[{i}]"
        if not isinstance(spec, str):
            raise ConfigError(f"{where} = {spec!r}: name a built-in tool or package.module:function.")
        if ":" in spec:
            fn = resolve_function(spec, field=where)
        elif spec in BUILTIN_TOOLS:
            fn = BUILTIN_TOOLS[spec]
        else:
            raise ConfigError(
                f"{where} = {spec!r} is not a built-in tool; use one of {', '.join(BUILTIN_TOOLS)} or "
                "package.module:function."
            )
        try:
            schema = get_json_schema(fn)
        except Exception as e:  # transformers raises its own types for missing hints and docstrings
            raise ConfigError(
                f"{where} = {spec!r} cannot describe itself to the model ({e}): a tool needs type hints on "
                "every argument and a Google-style docstring with an Args section."
            ) from None
        require_sendable(fn, f"{where} = {spec!r}", "tools", "a tool must be a function")
        name = schema["function"]["name"]
        if name in tools:
            raise ConfigError(f"{where} = {spec!r}: a tool named {name!r} is listed twice.")
        tools[name] = (fn, schema)
    return Tools(tools)


# ---------------------------------------------------------------- the call format
@dataclass(frozen=True)
class CallFormat:
    """`config.tool_call_format`: the text around a call's JSON, e.g. <tool_call>{json}</tool_call>."""

    opening: str
    closing: str

    @classmethod
    def parse(cls, spec: str) -> CallFormat:
        opening, found, closing = spec.partition("{json}")
        if not found or not opening.strip() or not closing.strip() or "{json}" in closing:
            raise ConfigError(
                f"config.tool_call_format = {spec!r} must hold {{json}} once, with text on both sides, e.g. "
                "<tool_call>{json}</tool_call>."
            )
        return cls(opening, closing)

    def example(self, name: str, arguments: dict[str, Any]) -> str:
        return f"{self.opening}{json.dumps({'name': name, 'arguments': arguments})}{self.closing}"

    def find(self, text: str) -> list[dict[str, Any]]:
        """Each call in a reply as {name, arguments, error}: a call whose JSON does not parse keeps its text as
        the error, so the model is told what went wrong.

        One scan with str.find, linear in the reply: a regex's lazy match would rescan the rest of the reply
        from every opening that is never closed. Once an opening has no closing after it, no later one has."""
        calls, start = [], 0
        while (start := text.find(self.opening, start)) >= 0:
            body_start = start + len(self.opening)
            end = text.find(self.closing, body_start)
            if end < 0:
                break
            calls.append(_call(text[body_start:end]))
            start = end + len(self.closing)
        return calls


def _call(body: str) -> dict[str, Any]:
    call, error = _json(body)
    if error is not None:
        return {"name": None, "arguments": {}, "error": error}
    if not isinstance(call, dict) or not isinstance(call.get("name"), str):
        return {"name": None, "arguments": {}, "error": 'a call needs {"name": ..., "arguments": {...}}'}
    arguments = call.get("arguments", {})
    if isinstance(arguments, str):  # some families write the arguments as a JSON string
        decoded, error = _json(arguments)
        if error is None:
            arguments = decoded
    return {"name": call["name"], "arguments": arguments, "error": None}


def _json(text: str) -> tuple[Any, str | None]:
    """The JSON value of model text, or why it has none. Any failure is the model's, never the run's: nesting
    past the recursion limit raises RecursionError, an integer of over 4,300 digits ValueError."""
    try:
        return json.loads(text), None
    except json.JSONDecodeError as e:
        return None, f"the call is not JSON ({e.msg})"
    except RecursionError:
        return None, "the call's JSON is nested too deeply"
    except ValueError as e:
        return None, f"the call's JSON cannot be read ({str(e).split(':')[0]})"


def tools_description(schemas: list[dict[str, Any]], call_format: CallFormat) -> str:
    """The system-prompt text for a chat template that ignores `tools=`: each tool's schema and the call format."""
    lines = ["You can call these tools:"]
    lines += [json.dumps(s["function"]) for s in schemas]
    first = schemas[0]["function"]
    example = {k: "..." for k in first["parameters"].get("properties", {})}
    lines.append(
        f"To call a tool, write {call_format.example(first['name'], example)} and wait for its result."
    )
    return "\n".join(lines)


# ---------------------------------------------------------------- running
def run_call(tools: Tools, call: dict[str, Any], *, timeout: float, max_chars: int) -> dict[str, Any]:
    """{name, arguments, result, error}: the call run in the tools' worker process for at most `timeout` seconds
    (a call past it kills the worker; a fresh one takes the next call). Any failure becomes an error text for
    the model; the run goes on. Results are cut to `max_chars`."""
    record = {"name": call["name"], "arguments": call["arguments"], "result": None, "error": call["error"]}
    if record["error"] is None and call["name"] not in tools:
        record["error"] = f"unknown tool {call['name']!r}; the tools are {', '.join(tools)}"
    if record["error"] is None and not isinstance(call["arguments"], dict):
        record["error"] = "arguments must be a JSON object"
    if record["error"] is not None:
        return record
    status, reply = tools.worker.request((call["name"], call["arguments"], max_chars), timeout)
    if status == "timeout":
        record["error"] = f"the tool did not return within {timeout:g} s"
    elif status == "ended":
        record["error"] = f"the tool's process ended (exit code {reply})"
    elif status == "unsendable":
        record["error"] = truncate(f"the arguments cannot be passed to the tool ({reply})", max_chars)
    else:
        record["result" if reply[0] == "result" else "error"] = reply[1]
    return record


def _serve_call(functions: dict[str, Callable[..., Any]], request: tuple[str, dict[str, Any], int]) -> tuple:
    """In the worker process: ("result", text) or ("error", text), cut to max_chars. A value that is no string
    is shown as JSON, and one that JSON cannot show (a tuple key, a cycle, a str() that raises) is an error."""
    name, arguments, max_chars = request
    try:
        value = functions[name](**arguments)
    except BaseException as e:  # SystemExit too: reported to the model as text
        return "error", truncate(describe(e), max_chars)
    try:
        text = str.__str__(value) if isinstance(value, str) else json.dumps(value, default=str)
    except BaseException as e:
        return "error", truncate(f"the tool's result cannot be shown as text ({describe(e)})", max_chars)
    return "result", truncate(text, max_chars)


def truncate(text: str, max_chars: int) -> str:
    return text if len(text) <= max_chars else text[:max_chars] + " ...[truncated]"


def tool_message(record: dict[str, Any]) -> str:
    """What the model reads back for one call."""
    return f"Error: {record['error']}" if record["error"] is not None else record["result"]
