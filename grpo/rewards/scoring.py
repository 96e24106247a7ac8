"""From a template's `rewards` list to reward columns: resolving names (built-ins or package.module:function) with
their options, checked before anything heavy loads, and scoring completions with a clear error naming the
function and the completion that broke it."""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any

import torch

from grpo.errors import ConfigError, RewardError
from grpo.rewards.builtin import BUILTIN, RewardFn, overlong_buffer_problem, overlong_penalty
from grpo.rewards.learned_model import options_problem as reward_model_options_problem
from grpo.rewards.learned_model import reward_model


@dataclass(frozen=True)
class RewardInputs:
    """What every reward function gets besides completions and references, one entry per completion: the
    reward contract, built here for training and evaluation alike."""

    tags: Any  # Tags: the template's four tag strings
    rows: list[dict[str, Any]]  # the dataset rows
    prompts: list[str]  # chat-formatted
    prompt_messages: list[list[dict[str, str]]]  # system + user, before the chat template
    completion_lengths: list[int]  # completion tokens
    max_completion_length: int  # config.maximum_completion_length

    @classmethod
    def of(
        cls, prompts: list[Any], completion_lengths: list[int], *, tags: Any, max_completion_length: int
    ) -> RewardInputs:
        """From the Prompt of each completion (a prompt repeated once per sample) and the completion lengths."""
        return cls(
            tags=tags,
            rows=[p.row for p in prompts],
            prompts=[p.text for p in prompts],
            prompt_messages=[p.messages for p in prompts],
            completion_lengths=[int(n) for n in completion_lengths],
            max_completion_length=max_completion_length,
        )

    def as_kwargs(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


# What the trainer and evaluator pass to every reward function; a template entry cannot set these.
PASSED_KWARGS = ("completions", "references", *(f.name for f in fields(RewardInputs)))


# ---------------------------------------------------------------- registry
@dataclass
class Reward:
    name: str
    fn: RewardFn
    weight: float = 1.0
    # The template entry's extra keys, passed to fn as keyword arguments on every call.
    kwargs: dict[str, Any] = field(default_factory=dict)

    def __call__(self, completions: list[str], references: list[str], **kwargs: Any) -> list[float]:
        return self.fn(completions, references, **kwargs, **self.kwargs)


def resolve_function(spec: str, *, field: str) -> Callable[..., Any]:
    """Import 'package.module:function'."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ConfigError(f"{field} = {spec!r}: write package.module:function.")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ConfigError(f"{field} = {spec!r}: cannot import module {module_name!r} ({e}).") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ConfigError(f"{field} = {spec!r}: module {module_name!r} has no function {attr!r}.")
    return fn


def _check_reward_kwargs(fn: Callable[..., Any], name: str, options: dict[str, Any], where: str) -> None:
    """Each extra key must be a parameter of `fn` (any key when a user function takes **kwargs) and not one the
    trainer passes. A built-in's **kwargs only swallows the trainer's keys, so it takes its named parameters only."""
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):  # no signature to check against (a C function)
        params = None
    positional = [p.name for p in params or [] if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)][:2]
    reserved = set(PASSED_KWARGS) | set(positional)
    for key, value in options.items():
        if key in reserved:
            raise ConfigError(f"{where} {key} = {value!r} is not allowed: the trainer passes {key} itself.")
    if params is None or (fn not in BUILTIN.values() and any(p.kind is p.VAR_KEYWORD for p in params)):
        return
    takes = [
        p.name
        for p in params
        if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.name not in reserved
    ]
    for key, value in options.items():
        if key not in takes:
            allowed = f"takes only {', '.join(takes)}" if takes else "takes no keyword arguments"
            raise ConfigError(f"{where} {key} = {value!r} is not allowed: {name} {allowed}.")


def resolve_rewards(entries: list[Any], *, max_completion_length: int | None = None) -> list[Reward]:
    """Entries are 'name', 'pkg.mod:fn', or {name: ..., weight: ..., KEY: VALUE...}, the extra keys passed to the
    function as keyword arguments; checked before anything heavy loads (overlong_penalty's buffer against
    max_completion_length when given)."""
    rewards: list[Reward] = []
    for i, entry in enumerate(entries):
        where = f"config.rewards[{i}]"
        weight: Any = 1.0
        options: dict[str, Any] = {}
        if isinstance(entry, dict):
            if "name" not in entry or not all(isinstance(k, str) for k in entry):
                raise ConfigError(
                    f"{where} = {entry!r}: a mapping needs 'name', may have 'weight', and passes its other "
                    "keys (strings) to the function as keyword arguments."
                )
            options = {k: v for k, v in entry.items() if k not in ("name", "weight")}
            entry, weight = entry["name"], entry.get("weight", 1.0)
        if not isinstance(weight, (int, float)) or isinstance(weight, bool):
            raise ConfigError(f"{where} weight = {weight!r} is not allowed: expected a number.")
        if not isinstance(entry, str):
            raise ConfigError(f"{where} = {entry!r}: name a built-in reward or package.module:function.")
        if ":" in entry:
            fn = resolve_function(entry, field=where)
        elif entry in BUILTIN:
            fn = BUILTIN[entry]
        else:
            raise ConfigError(
                f"{where} = {entry!r} is not a built-in reward; use one of "
                f"{', '.join(BUILTIN)} or package.module:function."
            )
        _check_reward_kwargs(fn, entry, options, where)
        problem = None
        if fn is overlong_penalty and "buffer" in options:
            problem = overlong_buffer_problem(options["buffer"], max_completion_length)
        elif fn is reward_model:
            problem = reward_model_options_problem(options)
        if problem:
            raise ConfigError(f"{where} {problem}")
        # The same function twice (e.g. with other options) is logged apart: reward/<name>, reward/<name>#2.
        repeats = sum(r.fn is fn for r in rewards)
        label = entry if not repeats else f"{entry}#{repeats + 1}"
        rewards.append(Reward(label, fn, float(weight), options))
    return rewards


def score(
    rewards: list[Reward], completions: list[str], references: list[str], **kwargs: Any
) -> torch.Tensor:
    """[N, R] raw scores, one column per reward function. A failing function is named with its input."""
    columns = []
    for r in rewards:
        try:
            values = r(completions, references, **kwargs)
            values = [float(v) for v in values]
            if len(values) != len(completions):
                raise ValueError(f"returned {len(values)} values for {len(completions)} completions")
        except Exception as e:
            raise RewardError(_locate_failure(r, completions, references, kwargs, e)) from e
        columns.append(torch.tensor(values, dtype=torch.float32))
    return torch.stack(columns, dim=1)  # [N, R]


def _locate_failure(
    r: Reward, completions: list[str], references: list[str], kwargs: dict[str, Any], error: Exception
) -> str:
    """Re-run one completion at a time to show the user which one broke their function."""
    for i in range(len(completions)):
        one = {
            k: (v[i : i + 1] if isinstance(v, list) and len(v) == len(completions) else v)
            for k, v in kwargs.items()
        }
        try:
            r(completions[i : i + 1], references[i : i + 1], **one)
        except Exception as e:
            return (
                f"Reward function {r.name!r} raised {type(e).__name__}: {e}\n"
                f"on completion {i}:\n{completions[i]!r}"
            )
    return f"Reward function {r.name!r} raised {type(error).__name__}: {error}"
