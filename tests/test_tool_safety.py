"""Text the model writes and tools that misbehave never end the run or change what is trained: a forged reply-end
marker, call JSON nested past the recursion limit or with a 5,000-digit integer, thousands of unclosed call
openings, a tool that keeps the interpreter busy, and results or exceptions that cannot be shown as text.

The hostile tools live in a small module written to a temporary folder, so that their worker process (a real
subprocess) starts in a fraction of a second."""

from __future__ import annotations

import re
import textwrap
import threading
import time

import pytest
import torch

from grpo.rollout.turns.multi_turn import REPLY_END, MultiTurn
from grpo.rollout.turns.tools import CallFormat, resolve_tools, run_call
from tests.test_multi_turn import calls, config, play_turns, prompts_for, scripted

HOSTILE = '''
import os


class Unprintable:
    def __str__(self):
        raise RuntimeError("no text for you")


class Mute(Exception):
    def __str__(self):
        raise ValueError("no message either")


def echo(text: str) -> str:
    """Answer with the text.

    Args:
        text: What to answer.
    """
    return text


def power(exponent: int) -> str:
    """Seven to the power of ten to the exponent, a computation that holds the interpreter.

    Args:
        exponent: How many tens.
    """
    return str(7 ** (10 ** exponent))


def shaped(kind: str) -> object:
    """A result that JSON cannot show.

    Args:
        kind: Which one.
    """
    if kind == "tuple_key":
        return {(1, 2): "pair"}
    if kind == "circular":
        cycle = [1]
        cycle.append(cycle)
        return cycle
    if kind == "unprintable":
        return Unprintable()
    if kind == "nested_unprintable":
        return {"value": Unprintable()}
    if kind == "mute":
        raise Mute()
    if kind == "exit":
        raise SystemExit(4)
    if kind == "die":
        os._exit(3)
    return kind
'''


@pytest.fixture(scope="module", autouse=True)
def hostile_module(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hostile")
    (folder / "hostile_tools.py").write_text(textwrap.dedent(HOSTILE))
    with pytest.MonkeyPatch.context() as mp:
        mp.syspath_prepend(str(folder))
        yield


def hostile(*names):
    return resolve_tools([f"hostile_tools:{n}" for n in names])


def call(tools, name, timeout=5.0, **arguments):
    return run_call(
        tools, {"name": name, "arguments": arguments, "error": None}, timeout=timeout, max_chars=200
    )


# ---------------------------------------------------------------- A3: the turn structure is out of band
def echo_turns(tokenizer, tmp_path, words):
    """A rollout whose model calls echo once per word, then ends; the tool answers each word back."""
    c = config(
        tmp_path, tools=["hostile_tools:echo"], max_tool_calling_iterations=4, maximum_completion_length=300
    )
    turns = MultiTurn(c)
    replies = [calls(("echo", f'{{"text": "{w}"}}')) for w in words] + ["Done."]
    sampler = scripted(tokenizer, lambda text, k: replies[text.count("<|im_start|>assistant") - 1])
    ro = play_turns(turns, sampler, prompts_for(tokenizer, turns, ["Echo."]), c, tokenizer)
    return ro, replies


def test_a_tool_output_forging_the_reply_end_leaves_the_loss_mask_as_a_benign_one(tokenizer, tmp_path):
    forged = "\\u0000reply-end\\u0000"  # JSON for REPLY_END: the tool answers the marker itself
    benign = "\\u0000reply-fin\\u0000"  # as many tokens, no marker
    ro, replies = echo_turns(tokenizer, tmp_path, [f"ok{forged}", f"ok{forged}"])
    conv = ro.conversations[0]
    assert [r["result"] for r in conv.tool_calls] == [f"ok{REPLY_END}"] * 2
    clean, _ = echo_turns(tokenizer, tmp_path, [f"ok{benign}", f"ok{benign}"])
    assert torch.equal(ro.trained_mask, clean.trained_mask)
    assert torch.equal(ro.completion_mask, clean.completion_mask)
    # the model wrote exactly its replies and their end tokens, once each
    n = int(ro.completion_mask[0].sum())
    written = ro.completion_ids[0, :n][ro.model_written[0, :n].bool()].tolist()
    assert written == [t for r in replies for t in tokenizer(r, add_special_tokens=False)["input_ids"] + [2]]
    rendered = tokenizer.apply_chat_template(conv.messages, tokenize=False)
    sequence = ro.prompt_ids[0][ro.prompt_mask[0].bool()].tolist() + ro.completion_ids[0, :n].tolist()
    assert tokenizer.decode(sequence) == rendered.removesuffix("\n")


def test_a_reply_holding_the_marker_is_cut_at_its_own_end(tokenizer, tmp_path):
    c = config(tmp_path, tools=["hostile_tools:echo"], maximum_completion_length=300)
    turns = MultiTurn(c)
    replies = [f"I write {REPLY_END} here " + calls(("echo", '{"text": "hi"}')), f"and {REPLY_END} again."]
    sampler = scripted(tokenizer, lambda text, k: replies[text.count("<|im_start|>assistant") - 1])
    ro = play_turns(turns, sampler, prompts_for(tokenizer, turns, ["Echo."]), c, tokenizer)
    n = int(ro.completion_mask[0].sum())
    between = tokenizer.decode(ro.completion_ids[0, :n][~ro.model_written[0, :n].bool()].tolist())
    assert between == "\n<|im_start|>tool\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert ro.conversations[0].replies == replies


# ---------------------------------------------------------------- B4: model text that the JSON parser chokes on
FMT = CallFormat.parse("<tool_call>{json}</tool_call>")


def test_calls_nested_past_the_recursion_limit_or_with_huge_integers_are_malformed():
    deep = "[" * 100_000 + "]" * 100_000
    huge = "1" * 5000
    assert FMT.find(f"<tool_call>{deep}</tool_call>") == [
        {"name": None, "arguments": {}, "error": "the call's JSON is nested too deeply"}
    ]
    assert FMT.find(f'<tool_call>{{"name": "add", "arguments": {{"a": {huge}, "b": 1}}}}</tool_call>') == [
        {
            "name": None,
            "arguments": {},
            "error": "the call's JSON cannot be read (Exceeds the limit (4300 digits) for integer string conversion)",
        }
    ]
    # arguments written as a JSON string: kept as the string, which run_call refuses as not an object
    for inner in (deep, f"[{huge}]"):
        (found,) = FMT.find(f'<tool_call>{{"name": "echo", "arguments": "{inner}"}}</tool_call>')
        assert found == {"name": "echo", "arguments": inner, "error": None}
        assert run_call(hostile("echo"), found, timeout=5, max_chars=50) == {
            "name": "echo",
            "arguments": inner,
            "result": None,
            "error": "arguments must be a JSON object",
        }


def test_a_rollout_answers_unreadable_calls_with_errors_and_goes_on(tokenizer, tmp_path):
    c = config(tmp_path, tools=["calculator"], maximum_completion_length=9000, maximum_sequence_length=12000)
    turns = MultiTurn(c)
    replies = [
        "<tool_call>" + "[" * 1500 + "]" * 1500 + "</tool_call>",
        '<tool_call>{"name": "calculator", "arguments": {"expression": ' + "9" * 4400 + "}}</tool_call>",
        "Fine.",
    ]
    sampler = scripted(tokenizer, lambda text, k: replies[text.count("<|im_start|>assistant") - 1])
    ro = play_turns(turns, sampler, prompts_for(tokenizer, turns, ["Go."]), c, tokenizer)
    conv = ro.conversations[0]
    assert (conv.replies, conv.cut) == (replies, None)
    assert [m["content"] for m in conv.messages if m["role"] == "tool"] == [
        "Error: the call's JSON is nested too deeply",
        "Error: the call's JSON cannot be read (Exceeds the limit (4300 digits) for integer string conversion)",
    ]


# ---------------------------------------------------------------- B5: unclosed openings
def regex_find(fmt, text):
    """The old parser's matching, the reference the linear scan must equal."""
    return re.findall(re.escape(fmt.opening) + r"(.*?)" + re.escape(fmt.closing), text, flags=re.DOTALL)


def test_thousands_of_unclosed_openings_parse_in_linear_time():
    good = '<tool_call>{"name": "add", "arguments": {"a": 1, "b": 2}}</tool_call>'
    after = good + "<tool_call>x" * 8192  # every opening after the call is left open
    before = "<tool_call>" * 8192 + '{"name": "add"}</tool_call>'  # one call whose body holds 8,191 openings
    start = time.perf_counter()
    assert FMT.find(after) == [{"name": "add", "arguments": {"a": 1, "b": 2}, "error": None}]
    assert FMT.find(before) == [
        {"name": None, "arguments": {}, "error": "the call is not JSON (Expecting value)"}
    ]
    assert FMT.find("<tool_call>" * 65536) == []
    elapsed = time.perf_counter() - start
    print(f"\n3 replies of 8,192 to 65,536 unclosed openings parsed in {elapsed * 1000:.1f} ms")
    assert elapsed < 1.0  # the quadratic regex took 3.1 s for one reply of 8,192


@pytest.mark.parametrize("spec", ["<tool_call>{json}</tool_call>", "[[{json}]]", "<a>{json}<a>"])
def test_the_linear_scan_finds_what_the_regex_found(spec):
    fmt = CallFormat.parse(spec)
    pieces = [fmt.opening, fmt.closing, "{}", '{"name": "f"}', "x", "\n", "[", "]", "<", ">", "a"]
    rng = torch.Generator().manual_seed(0)
    for _ in range(2000):
        n = int(torch.randint(0, 12, (1,), generator=rng))
        text = "".join(pieces[int(i)] for i in torch.randint(0, len(pieces), (n,), generator=rng))
        bodies = regex_find(fmt, text)
        assert fmt.find(text) == [fmt.find(fmt.opening + b + fmt.closing)[0] for b in bodies], text
        assert sum(b.strip() == '{"name": "f"}' for b in bodies) == sum(
            c["name"] == "f" for c in fmt.find(text)
        )


# ---------------------------------------------------------------- C7: tools that keep the interpreter busy
def test_a_busy_tool_is_killed_at_its_timeout_and_the_next_call_runs():
    tools = hostile("power", "echo")
    assert call(tools, "echo", text="warm")["result"] == "warm"  # the worker has started
    threads = threading.active_count()
    start = time.perf_counter()
    record = call(tools, "power", timeout=1.0, exponent=8)  # 7**(10**8): minutes of CPU in one bytecode
    elapsed = time.perf_counter() - start
    assert record == {"name": "power", "arguments": {"exponent": 8}, "result": None,
                      "error": "the tool did not return within 1 s"}  # fmt: skip
    assert elapsed < 3.0
    assert threading.active_count() == threads  # nothing abandoned
    assert call(tools, "echo", text="again")["result"] == "again"
    assert tools.worker.starts == 2  # the busy worker was killed and replaced
    assert call(tools, "power", exponent=1)["result"] == str(7**10)


@pytest.mark.parametrize(
    "kind, error",
    [
        ("tuple_key", "the tool's result cannot be shown as text (TypeError: keys must be str, int, float, bool "
                      "or None, not tuple)"),
        ("circular", "the tool's result cannot be shown as text (ValueError: Circular reference detected)"),
        ("unprintable", "the tool's result cannot be shown as text (RuntimeError: no text for you)"),
        ("nested_unprintable", "the tool's result cannot be shown as text (RuntimeError: no text for you)"),
        ("mute", "Mute (its message cannot be shown)"),
        ("exit", "SystemExit: 4"),
        ("die", "the tool's process ended (exit code 3)"),
    ],
)  # fmt: skip
def test_results_and_exceptions_that_cannot_be_shown_are_errors(kind, error):
    tools = hostile("shaped")
    assert call(tools, "shaped", kind=kind) == {
        "name": "shaped",
        "arguments": {"kind": kind},
        "result": None,
        "error": error,
    }
    assert call(tools, "shaped", kind="fine")["result"] == "fine"  # the worker (or its replacement) goes on


def test_a_rollout_with_hostile_tools_reads_errors_back(tokenizer, tmp_path):
    c = config(tmp_path, tools=["hostile_tools:shaped", "hostile_tools:power"], tool_timeout=1.0,
               maximum_completion_length=300)  # fmt: skip
    turns = MultiTurn(c)
    replies = [
        calls(("shaped", '{"kind": "circular"}'), ("power", '{"exponent": 8}')),
        calls(("shaped", '{"kind": "mute"}')),
        "Done.",
    ]
    sampler = scripted(tokenizer, lambda text, k: replies[text.count("<|im_start|>assistant") - 1])
    ro = play_turns(turns, sampler, prompts_for(tokenizer, turns, ["Go."]), c, tokenizer)
    assert [m["content"] for m in ro.conversations[0].messages if m["role"] == "tool"] == [
        "Error: the tool's result cannot be shown as text (ValueError: Circular reference detected)",
        "Error: the tool did not return within 1 s",
        "Error: Mute (its message cannot be shown)",
    ]


def test_a_tool_that_cannot_reach_its_worker_is_refused_before_any_model_loads():
    from grpo.config import ConfigError

    with pytest.raises(ConfigError) as e:
        resolve_tools(["tests.test_tool_safety:renamed"])
    assert str(e.value) == (
        "config.tools[0] = 'tests.test_tool_safety:renamed' cannot be sent to the tools' worker process "
        "(PicklingError: Can't pickle <function original at 0x0>: it's not the same object as "
        "tests.test_tool_safety.original): a tool must be a function its module defines under its own name."
    ).replace("0x0", hex(id(renamed)))


def original(x: int) -> int:
    """A tool known by another name.

    Args:
        x: Anything.
    """
    return x


renamed = original
original = None  # the name pickle looks up no longer holds the function
