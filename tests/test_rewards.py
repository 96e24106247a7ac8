"""Built-in rewards on single- and multi-line completions, number normalisation, user functions, failures."""

import pytest

from grpo import rewards as rw
from grpo.config import ConfigError

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
            "int_answer, strict_format, soft_format, tag_count, answer_mentioned or package.module:function.",
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
            "config.rewards[0] = {'weight': 2}: a mapping needs 'name' and may have 'weight', nothing else.",
        ),
        (
            {"name": "correctness", "weight": "x"},
            "config.rewards[0] weight = 'x' is not allowed: expected a number.",
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
