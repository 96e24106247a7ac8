"""Reward functions: the built-ins (builtin.py), learned reward models (learned_model.py), and resolving and
scoring a template's list (scoring.py). Every reward function has the same signature, the one user functions
implement too:

    def my_reward(completions: list[str], references: list[str], **kwargs) -> list[float]

`completions[i]` is the decoded text of sample i, `references[i]` its prompt's reference answer. kwargs holds
`prompts` (list[str], chat-formatted), `prompt_messages` (list of the prompt's chat messages, system + user),
`rows` (list[dict], the dataset rows), `tags` (a `Tags` with the template's four tag strings),
`completion_lengths` (list[int], completion tokens), `max_completion_length` (int,
config.maximum_completion_length), `messages` (each sample's whole conversation as chat messages: the prompt's,
then each reply and, with tools or an environment, each tool or user message) and `tool_calls` (each sample's
calls, dicts with name, arguments, result and error; empty without tools). With tools or an environment,
`completions[i]` holds the model's own replies, one per turn, joined by newlines. Accept **kwargs so that new keys do not break your function. A template entry
{name: ..., weight: ..., KEY: VALUE} also passes KEY=VALUE to its function on every call.
"""

from grpo.errors import RewardError
from grpo.rewards.builtin import (
    BUILTIN,
    RewardFn,
    Tags,
    answer_mentioned,
    answers_match,
    correctness,
    extract_answer,
    final_answer,
    int_answer,
    normalize_number,
    overlong_penalty,
    soft_format,
    strict_format,
    tag_count,
    tool_answer,
    tool_used,
)
from grpo.rewards.learned_model import reward_model
from grpo.rewards.rollout_scores import RolloutScores, completion_texts, score_rollouts
from grpo.rewards.scoring import PASSED_KWARGS, Reward, RewardInputs, resolve_function, resolve_rewards, score

__all__ = [
    "BUILTIN",
    "PASSED_KWARGS",
    "Reward",
    "RewardError",
    "RewardInputs",
    "RewardFn",
    "RolloutScores",
    "Tags",
    "answer_mentioned",
    "answers_match",
    "completion_texts",
    "correctness",
    "extract_answer",
    "final_answer",
    "int_answer",
    "normalize_number",
    "overlong_penalty",
    "resolve_function",
    "resolve_rewards",
    "reward_model",
    "score",
    "score_rollouts",
    "soft_format",
    "strict_format",
    "tag_count",
    "tool_answer",
    "tool_used",
]
