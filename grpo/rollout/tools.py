"""Tools a model may call during a rollout: resolving `config.tools`, their JSON schemas, finding the calls in a
reply, and running each call with a timeout and an output budget. The built-in `calculator` is here too.

User tools run in the training process, by design (docs/tools.md): a tool is trusted code. Built-in tools never
run model-written code: the calculator parses arithmetic with `ast` and evaluates only numbers and operators.
"""

from __future__ import annotations

import ast
import json
import operator
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from grpo.errors import ConfigError
from grpo.rewards.scoring import resolve_function

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
def resolve_tools(names: list[str]) -> dict[str, tuple[Callable[..., Any], dict[str, Any]]]:
    """config.tools -> {name: (function, JSON schema)}, checked before any model loads."""
    from transformers.utils import get_json_schema

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
        name = schema["function"]["name"]
        if name in tools:
            raise ConfigError(f"{where} = {spec!r}: a tool named {name!r} is listed twice.")
        tools[name] = (fn, schema)
    return tools


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
        the error, so the model is told what went wrong."""
        pattern = re.escape(self.opening) + r"(.*?)" + re.escape(self.closing)
        calls = []
        for body in re.findall(pattern, text, flags=re.DOTALL):
            try:
                call = json.loads(body)
            except json.JSONDecodeError as e:
                calls.append({"name": None, "arguments": {}, "error": f"the call is not JSON ({e.msg})"})
                continue
            if not isinstance(call, dict) or not isinstance(call.get("name"), str):
                calls.append(
                    {"name": None, "arguments": {}, "error": 'a call needs {"name": ..., "arguments": {...}}'}
                )
                continue
            arguments = call.get("arguments", {})
            if isinstance(arguments, str):  # some families write the arguments as a JSON string
                try:
                    arguments = json.loads(arguments)
                except json.JSONDecodeError:
                    pass
            calls.append({"name": call["name"], "arguments": arguments, "error": None})
        return calls


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
def run_call(
    tools: dict[str, tuple[Callable[..., Any], dict[str, Any]]],
    call: dict[str, Any],
    *,
    timeout: float,
    max_chars: int,
) -> dict[str, Any]:
    """{name, arguments, result, error}: the call run in a daemon thread for at most `timeout` seconds (a thread
    cannot be stopped, so one that hangs is abandoned, and the interpreter does not wait for it at exit). Any
    failure becomes an error text for the model; the run goes on. Results are cut to `max_chars`."""
    record = {"name": call["name"], "arguments": call["arguments"], "result": None, "error": call["error"]}
    if record["error"] is None and call["name"] not in tools:
        record["error"] = f"unknown tool {call['name']!r}; the tools are {', '.join(tools)}"
    if record["error"] is None and not isinstance(call["arguments"], dict):
        record["error"] = "arguments must be a JSON object"
    if record["error"] is not None:
        return record
    fn = tools[call["name"]][0]
    out: dict[str, Any] = {}

    def work() -> None:
        try:
            out["value"] = fn(**call["arguments"])
        except BaseException as e:  # reported to the model as text
            out["error"] = f"{type(e).__name__}: {e}"

    worker = threading.Thread(target=work, name=f"tool {call['name']}", daemon=True)
    worker.start()
    worker.join(timeout)
    if worker.is_alive():
        record["error"] = f"the tool did not return within {timeout:g} s"
    elif "error" in out:
        record["error"] = truncate(out["error"], max_chars)
    else:
        value = out["value"]
        record["result"] = truncate(
            value if isinstance(value, str) else json.dumps(value, default=str), max_chars
        )
    return record


def truncate(text: str, max_chars: int) -> str:
    return text if len(text) <= max_chars else text[:max_chars] + " ...[truncated]"


def tool_message(record: dict[str, Any]) -> str:
    """What the model reads back for one call."""
    return f"Error: {record['error']}" if record["error"] is not None else record["result"]
