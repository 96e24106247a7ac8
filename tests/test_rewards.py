"""Built-in rewards on single- and multi-line completions, number normalisation, user functions, failures,
per-reward keyword arguments from the template, the overlong penalty, and the contract every function is held to
(finite numbers, one per completion, within config.reward_timeout)."""

import re
import threading
import time

import pytest
import torch

from grpo import rewards as rw
from grpo.config import ConfigError
from tests.conftest import tiny_template, train_cli, write_template

TAGS = rw.Tags()
STRICT = "<reasoning>\n4 + 5 = 9\nso nine\n</reasoning>\n<answer>\n9\n</answer>\n"
ONE_LINE = "<reasoning>4 + 5 = 9</reasoning> <answer>9</answer>"
MULTI_ANSWER = "<reasoning>\nstep one\nstep two\n</reasoning>\n<answer>\n1,000\n</answer>"
NO_TAGS = "The answer is 9."


def call(name, completions, references):
    return rw.BUILTIN[name](completions, references, tags=TAGS)


def test_correctness_multi_line_and_normalised():
    assert call("correctness", [STRICT, ONE_LINE, NO_TAGS], ["9", "9", "9"]) == [2.0, 2.0, 0.0]
    assert call("correctness", [MULTI_ANSWER] * 3, ["1000", "1000.0", "$1,000"]) == [2.0, 2.0, 2.0]
    assert call("correctness", [MULTI_ANSWER], ["100"]) == [0.0]
    assert call("correctness", ["<answer>Paris</answer>"], ["paris"]) == [2.0]


def test_custom_tags():
    tags = rw.Tags("<think>", "</think>", "<final>", "</final>")
    text = "<think>\nhm\n</think>\n<final>\n42\n</final>"
    assert rw.correctness([text], ["42"], tags=tags) == [2.0]
    assert rw.strict_format([text], ["42"], tags=tags) == [0.5]
    assert rw.correctness([STRICT], ["9"], tags=tags) == [0.0]


def test_formats_and_int_answer():
    assert call("strict_format", [STRICT, ONE_LINE, MULTI_ANSWER, NO_TAGS], [""] * 4) == [0.5, 0.0, 0.5, 0.0]
    assert call("soft_format", [STRICT, ONE_LINE, MULTI_ANSWER, NO_TAGS], [""] * 4) == [0.5, 0.5, 0.5, 0.0]
    assert call(
        "int_answer", [STRICT, "<answer>2.5</answer>", "<answer>3.0</answer>", NO_TAGS], [""] * 4
    ) == [0.5, 0.0, 0.5, 0.0]


def test_tag_count_and_answer_mentioned():
    assert call("tag_count", [STRICT], [""]) == [0.5]
    assert call("tag_count", [STRICT + "extra"], [""]) == [pytest.approx(0.5 - 0.005)]
    assert call("tag_count", ["<reasoning><reasoning></reasoning>"], [""]) == [0.125]
    assert call("answer_mentioned", ["so it is 1,000 apples", "about 10", "none"], ["1000", "1", "3"]) == [
        0.5,
        0.0,
        0.0,
    ]


def test_extract_answer_takes_last_complete_pair():
    assert rw.extract_answer("<answer>1</answer> then <answer>\n2\n</answer>", TAGS) == "2"
    assert rw.extract_answer("<answer>open only", TAGS) is None


def test_resolve_rewards_names_weights_and_user_functions():
    rs = rw.resolve_rewards(
        ["correctness", {"name": "soft_format", "weight": 2}, "tests.user_rewards:length"]
    )
    assert [r.name for r in rs] == ["correctness", "soft_format", "tests.user_rewards:length"]
    assert [r.weight for r in rs] == [1.0, 2.0, 1.0]
    scores = rw.score(rs, [STRICT, NO_TAGS], ["9", "9"], tags=TAGS)
    assert scores.tolist() == [[2.0, 0.5, float(len(STRICT))], [0.0, 0.0, float(len(NO_TAGS))]]


@pytest.mark.parametrize(
    "entry, message",
    [
        (
            "corectness",
            "config.rewards[0] = 'corectness' is not a built-in reward; use one of correctness, "
            "int_answer, strict_format, soft_format, tag_count, answer_mentioned, final_answer, tool_used, tool_answer, overlong_penalty, reward_model or "
            "package.module:function.",
        ),
        (
            "no_such_module_xyz:f",
            "config.rewards[0] = 'no_such_module_xyz:f': cannot import module 'no_such_module_xyz'",
        ),
        (
            "tests.user_rewards:missing",
            "config.rewards[0] = 'tests.user_rewards:missing': module 'tests.user_rewards' "
            "has no function 'missing'.",
        ),
        (
            {"weight": 2},
            "config.rewards[0] = {'weight': 2}: a mapping needs 'name', may have 'weight', and passes its other "
            "keys (strings) to the function as keyword arguments.",
        ),
        (
            {"name": "correctness", "weight": "x"},
            "config.rewards[0] weight = 'x' is not allowed: expected a finite number.",
        ),
        (
            {"name": "correctness", "weight": float("nan")},
            "config.rewards[0] weight = nan is not allowed: expected a finite number.",
        ),
        (3, "config.rewards[0] = 3: name a built-in reward or package.module:function."),
    ],
)
def test_resolve_errors(entry, message):
    with pytest.raises(ConfigError) as e:
        rw.resolve_rewards([entry])
    assert str(e.value).startswith(message)


def test_failing_reward_names_function_and_completion():
    rs = rw.resolve_rewards(["tests.user_rewards:fails_on_seven"])
    with pytest.raises(rw.RewardError) as e:
        rw.score(rs, ["fine", "has 7 in it"], ["1", "2"], tags=TAGS)
    assert str(e.value) == (
        "Reward function 'tests.user_rewards:fails_on_seven' raised ValueError: cannot score 7\n"
        "on completion 1:\n'has 7 in it'"
    )
    rs = rw.resolve_rewards(["tests.user_rewards:wrong_length"])
    with pytest.raises(rw.RewardError, match="returned 1 values for 2 completions"):
        rw.score(rs, ["a", "b"], ["1", "2"], tags=TAGS)


# Module-level so the tests can resolve them as tests.test_rewards:NAME.
def scaled_length(
    completions,
    references,
    *,
    scale,
    offset=0.0,
    tags=None,
    rows=None,
    prompts=None,
    completion_lengths=None,
    max_completion_length=None,
):
    """No **kwargs: a key the template gives must be scale or offset (the trainer fills the rest)."""
    assert isinstance(tags, rw.Tags)
    return [scale * len(c) + offset for c in completions]


def echo_options(completions, references, **kwargs):
    """Takes **kwargs: any option goes; scores the option 'value' and fails on a completion 'bad'."""
    if "bad" in completions:
        raise ValueError(f"bad with value={kwargs['value']}")
    return [float(kwargs["value"]) for _ in completions]


def plain(c, r, tags=None, **kwargs):
    return [0.0 for _ in c]


def test_overlong_penalty_values():
    lengths = [10, 80, 81, 90, 99, 100]
    out = rw.overlong_penalty(
        [""] * 6, [""] * 6, completion_lengths=lengths, max_completion_length=100, buffer=20
    )
    assert out == [0.0, 0.0, -1 / 20, -0.5, -19 / 20, -1.0]
    # default buffer: a fifth of max_completion_length, so 20 tokens here
    out = rw.overlong_penalty(
        [""] * 5, [""] * 5, completion_lengths=[20, 80, 81, 90, 100], max_completion_length=100
    )
    assert out == [0.0, 0.0, -1 / 20, -0.5, -1.0]
    # buffer = max_completion_length: the penalty starts at the first token
    out = rw.overlong_penalty(
        [""] * 2, [""] * 2, completion_lengths=[0, 2], max_completion_length=4, buffer=4
    )
    assert out == [0.0, -0.5]
    # a tiny limit: the default buffer is still at least 1 token
    assert rw.overlong_penalty([""] * 2, [""] * 2, completion_lengths=[2, 3], max_completion_length=3) == [
        0.0,
        -1.0,
    ]
    assert "overlong_penalty" in rw.BUILTIN


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (
            {},
            "overlong_penalty needs completion_lengths and max_completion_length, which grpo.rewards.score "
            "gets from the trainer and evaluator.",
        ),
        (
            {"completion_lengths": [1, 2], "max_completion_length": 10},
            "overlong_penalty got 2 completion_lengths for 1 completions.",
        ),
        (
            {"completion_lengths": [1], "max_completion_length": 10, "buffer": 11},
            "overlong_penalty buffer = 11 is not allowed: expected an integer from 1 to max_completion_length (10).",
        ),
        (
            {"completion_lengths": [1], "max_completion_length": 10, "buffer": 0},
            "overlong_penalty buffer = 0 is not allowed: expected an integer from 1 to max_completion_length (10).",
        ),
        (
            {"completion_lengths": [1], "max_completion_length": 10, "buffer": 2.5},
            "overlong_penalty buffer = 2.5 is not allowed: expected an integer from 1 to max_completion_length (10).",
        ),
    ],
)
def test_overlong_penalty_errors(kwargs, message):
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        rw.overlong_penalty([""], [""], **kwargs)


def test_reward_kwargs_reach_the_function_through_score():
    rs = rw.resolve_rewards(
        [
            {"name": "overlong_penalty", "weight": 0.5, "buffer": 4},
            {"name": "tests.test_rewards:scaled_length", "scale": 2.0},
            {"name": "tests.test_rewards:scaled_length", "scale": 1.0, "offset": 3},
            {"name": "tests.test_rewards:echo_options", "value": 7},
            "overlong_penalty",
        ]
    )
    assert [r.name for r in rs] == [
        "overlong_penalty",
        "tests.test_rewards:scaled_length",
        "tests.test_rewards:scaled_length#2",
        "tests.test_rewards:echo_options",
        "overlong_penalty#2",
    ]
    assert [r.weight for r in rs] == [0.5, 1.0, 1.0, 1.0, 1.0]
    assert rs[0].kwargs == {"buffer": 4} and rs[4].kwargs == {}
    scores = rw.score(
        rs,
        ["ab", "abcd"],
        ["", ""],
        tags=TAGS,
        rows=[{}, {}],
        prompts=["p", "p"],
        completion_lengths=[6, 9],
        max_completion_length=10,
    )
    # overlong buffer 4: 6 -> 0, 9 -> -3/4; default buffer 10 // 5 = 2: 6 -> 0, 9 -> -1/2
    assert scores.tolist() == [[0.0, 4.0, 5.0, 7.0, 0.0], [-0.75, 8.0, 7.0, 7.0, -0.5]]


def test_reward_kwargs_in_failure_report():
    rs = rw.resolve_rewards([{"name": "tests.test_rewards:echo_options", "value": 3}])
    with pytest.raises(rw.RewardError) as e:
        rw.score(rs, ["fine", "bad"], ["1", "2"], tags=TAGS, completion_lengths=[1, 1])
    assert str(e.value) == (
        "Reward function 'tests.test_rewards:echo_options' raised ValueError: bad with value=3\n"
        "on completion 1:\n'bad'"
    )
    rs = rw.resolve_rewards([{"name": "overlong_penalty", "buffer": 20}])
    with pytest.raises(rw.RewardError) as e:
        rw.score(rs, ["a"], ["1"], tags=TAGS, completion_lengths=[1], max_completion_length=10)
    assert str(e.value) == (
        "Reward function 'overlong_penalty' raised ValueError: overlong_penalty buffer = 20 is not allowed: "
        "expected an integer from 1 to max_completion_length (10).\non completion 0:\n'a'"
    )


@pytest.mark.parametrize(
    "entry, message",
    [
        (
            {"name": "overlong_penalty", "bufer": 16},
            "config.rewards[0] bufer = 16 is not allowed: overlong_penalty takes only buffer.",
        ),
        (
            {"name": "correctness", "scale": 2},
            "config.rewards[0] scale = 2 is not allowed: correctness takes no keyword arguments.",
        ),
        (
            {"name": "tests.test_rewards:scaled_length", "scale": 1, "size": 3},
            "config.rewards[0] size = 3 is not allowed: tests.test_rewards:scaled_length takes only scale, "
            "offset.",
        ),
        (
            {"name": "tests.test_rewards:echo_options", "tags": "x"},
            "config.rewards[0] tags = 'x' is not allowed: the trainer passes tags itself.",
        ),
        (
            {"name": "tests.test_rewards:scaled_length", "max_completion_length": 5},
            "config.rewards[0] max_completion_length = 5 is not allowed: the trainer passes "
            "max_completion_length itself.",
        ),
        (
            {"name": "overlong_penalty", "completion_lengths": [1]},
            "config.rewards[0] completion_lengths = [1] is not allowed: the trainer passes completion_lengths "
            "itself.",
        ),
        (
            {"name": "tests.test_rewards:echo_options", "completions": []},
            "config.rewards[0] completions = [] is not allowed: the trainer passes completions itself.",
        ),
        (
            {"name": "tests.test_rewards:plain", "r": 1},
            "config.rewards[0] r = 1 is not allowed: the trainer passes r itself.",
        ),
        (
            {"name": "overlong_penalty", "buffer": 0},
            "config.rewards[0] overlong_penalty buffer = 0 is not allowed: expected an integer of at least 1.",
        ),
        (
            {"name": "overlong_penalty", "buffer": "big"},
            "config.rewards[0] overlong_penalty buffer = 'big' is not allowed: expected an integer of at "
            "least 1.",
        ),
        (
            {"name": "correctness", 1: 2},
            "config.rewards[0] = {'name': 'correctness', 1: 2}: a mapping needs 'name', may have 'weight', and "
            "passes its other keys (strings) to the function as keyword arguments.",
        ),
    ],
)
def test_reward_kwargs_errors(entry, message):
    with pytest.raises(ConfigError, match=f"^{re.escape(message)}$"):
        rw.resolve_rewards([entry])


def test_reward_kwargs_any_key_with_var_kwargs():
    (r,) = rw.resolve_rewards([{"name": "tests.test_rewards:echo_options", "value": 1, "anything": [1, 2]}])
    assert r.kwargs == {"value": 1, "anything": [1, 2]}
    assert rw.score([r], ["a"], [""], tags=TAGS).tolist() == [[1.0]]


def test_overlong_buffer_is_checked_against_the_completion_length_before_the_run():
    entry = {"name": "overlong_penalty", "buffer": 65}
    with pytest.raises(ConfigError) as err:
        rw.resolve_rewards([entry], max_completion_length=64)
    assert str(err.value) == (
        "config.rewards[0] overlong_penalty buffer = 65 is not allowed: expected an integer from 1 to "
        "max_completion_length (64)."
    )
    (r,) = rw.resolve_rewards([{**entry, "buffer": 64}], max_completion_length=64)
    assert r.kwargs == {"buffer": 64}


def test_a_function_named_twice_is_logged_apart():
    rs = rw.resolve_rewards(
        ["correctness", "soft_format", {"name": "correctness", "weight": 2}, "correctness"]
    )
    assert [r.name for r in rs] == ["correctness", "soft_format", "correctness#2", "correctness#3"]
    assert rs[2].fn is rs[0].fn and rs[2].weight == 2.0


# ---------------------------------------------------------------- the contract: finite numbers, one per completion, in time
seen: list[tuple[bool, bool]] = []  # (main thread?, grad enabled?) per call of where_it_ran


def where_it_ran(completions, references, **kwargs):
    """Scores 1.0 and records the thread and grad mode it ran with."""
    seen.append((threading.current_thread() is threading.main_thread(), torch.is_grad_enabled()))
    return torch.ones(len(completions))  # a tensor counts as a list of numbers


def letter_grades(completions, references, **kwargs):
    return ["A" for _ in completions]


def test_a_reward_that_breaks_the_contract_is_named():
    with pytest.raises(rw.RewardError) as e:
        rw.score(
            rw.resolve_rewards(["tests.bad_rewards:nan_on_second"]), ["a", "b", "c"], ["1"] * 3, tags=TAGS
        )
    assert str(e.value) == (
        "Reward function 'tests.bad_rewards:nan_on_second' returned nan for completion 1: a reward must be a "
        "finite number."
    )
    with pytest.raises(rw.RewardError) as e:
        rw.score(rw.resolve_rewards(["tests.bad_rewards:text"]), ["a", "b"], ["1"] * 2, tags=TAGS)
    assert str(e.value) == (
        "Reward function 'tests.bad_rewards:text' must return a list of numbers, one per completion; it returned "
        "a value of type str, length 4: 'good'."
    )
    with pytest.raises(rw.RewardError) as e:
        rw.score(rw.resolve_rewards(["tests.test_rewards:letter_grades"]), ["a", "b"], ["1"] * 2, tags=TAGS)
    assert str(e.value) == (
        "Reward function 'tests.test_rewards:letter_grades' must return a list of numbers, one per completion; it "
        "returned a value of type list, length 2, whose item 0 is str: 'A'."
    )


def test_reward_timeout_stops_a_call_that_never_returns():
    (r,) = rw.resolve_rewards(["tests.bad_rewards:hangs"], timeout=0.5)
    start = time.monotonic()
    with pytest.raises(rw.RewardError) as e:
        rw.score([r], ["a", "b"], ["1", "2"], tags=TAGS)
    assert 0.5 <= time.monotonic() - start < 5
    assert str(e.value) == (
        "Reward function 'tests.bad_rewards:hangs' did not return within config.reward_timeout = 0.5 s; make it "
        "faster, or raise reward_timeout (0 = no limit)."
    )
    # within the limit the call runs in a worker thread with the caller's grad mode; with 0, in the caller's
    seen.clear()
    with torch.no_grad():
        for timeout in (5.0, 0.0):
            rs = rw.resolve_rewards(["tests.test_rewards:where_it_ran"], timeout=timeout)
            assert rw.score(rs, ["a", "b"], ["1", "2"], tags=TAGS).tolist() == [[1.0], [1.0]]
    assert seen == [(False, False), (True, False)]
    # a function that raises inside the worker is reported as before
    (r,) = rw.resolve_rewards(["tests.user_rewards:fails_on_seven"], timeout=5.0)
    with pytest.raises(rw.RewardError, match=r"raised ValueError: cannot score 7\non completion 1:"):
        rw.score([r], ["fine", "7"], ["1", "2"], tags=TAGS)


@pytest.mark.parametrize(
    "reward, overrides, message",
    [
        (
            "tests.bad_rewards:nan_on_second",
            [],
            "Reward function 'tests.bad_rewards:nan_on_second' returned nan for completion 1: a reward must be a "
            "finite number.",
        ),
        (
            "tests.bad_rewards:text",
            [],
            "Reward function 'tests.bad_rewards:text' must return a list of numbers, one per completion; it "
            "returned a value of type str, length 4: 'good'.",
        ),
        (
            "tests.bad_rewards:hangs",
            ["reward_timeout=2"],
            "Reward function 'tests.bad_rewards:hangs' did not return within config.reward_timeout = 2 s; make it "
            "faster, or raise reward_timeout (0 = no limit).",
        ),
    ],
)
def test_cli_reward_errors_are_one_line(tiny_model_dir, tmp_path, reward, overrides, message):
    """The hung call is abandoned in a daemon thread: the process exits at once instead of waiting an hour."""
    path = write_template(
        tmp_path / "t.yaml", tiny_template(tiny_model_dir, tmp_path / "out", rewards=[reward])
    )
    start = time.monotonic()
    result = train_cli(path, *overrides, timeout=240)
    assert time.monotonic() - start < 180
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == f"error: {message}"
    assert not (tmp_path / "out" / "model").exists()


def test_tool_rewards_by_hand():
    ran = {"name": "calculator", "arguments": {"expression": "711 * 68"}, "result": "48348", "error": None}
    bare = {"name": "calculator", "arguments": {"expression": "711"}, "result": "711", "error": None}
    failed = {"name": "calculator", "arguments": {"expression": "711 *"}, "result": None, "error": "bad"}
    calls = [[ran], [bare], [failed], [], [bare, ran]]
    refs = ["48348"] * 5
    assert rw.tool_used([""] * 5, refs, tool_calls=calls) == [0.5, 0.5, 0.0, 0.0, 0.5]
    # only a call that computed the reference pays: a bare number runs, but earns nothing
    assert rw.tool_answer([""] * 5, refs, tool_calls=calls) == [0.5, 0.0, 0.0, 0.0, 0.5]
    assert rw.tool_answer([""], ["48,348"], tool_calls=[[ran]]) == [0.5]  # numbers compare normalised


def test_final_answer_reads_the_last_reply():
    tags = rw.Tags()

    def chat(*replies):
        turns = [{"role": "user", "content": "What is 711 * 68?"}]
        for r in replies:
            turns += [{"role": "assistant", "content": r}, {"role": "tool", "content": "48348"}]
        return turns[:-1]

    messages = [
        chat("<tool_call>{}</tool_call>", "48348"),  # bare number after the tool result
        chat("<tool_call>{}</tool_call>", "So 711 * 68 = 48,348."),  # its last number, normalised
        chat("48348 <tool_call>{}</tool_call>", "The answer is 711 * 68."),  # an earlier reply does not count
        chat("<answer>48348</answer> or 5"),  # the tags win over the last number
        chat("<answer>5</answer> 48348"),
        chat("no number at all"),
        [{"role": "user", "content": "q"}],  # no reply
    ]
    completions = ["\n".join(m["content"] for m in c if m["role"] == "assistant") for c in messages]
    scores = rw.final_answer(completions, ["48348"] * 7, tags=tags, messages=messages)
    assert scores == [1.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.0]
