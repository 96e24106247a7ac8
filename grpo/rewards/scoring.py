"""From a template's `rewards` list to reward columns: resolving names (built-ins or package.module:function) with
their options, checked before anything heavy loads, and scoring completions with a clear error naming the
function and the completion that broke it."""

from __future__ import annotations

import importlib
import inspect
import math
import numbers
import threading
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any

import torch

from grpo.errors import ConfigError, RewardError, RewardTimeout
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
    # the whole conversation: prompt messages, then each reply and each tool or environment message
    messages: list[list[dict[str, str]]]
    tool_calls: list[list[dict[str, Any]]]  # each call: name, arguments, result, error ([] without tools)

    @classmethod
    def of(
        cls,
        prompts: list[Any],
        completion_lengths: list[int],
        *,
        tags: Any,
        max_completion_length: int,
        completions: list[str],
        conversations: list[Any] | None = None,
    ) -> RewardInputs:
        """From the Prompt of each completion (a prompt repeated once per sample), the completion lengths and
        texts, and for a multi-turn rollout each sample's Conversation (grpo/rollout/turns/multi_turn.py)."""
        if conversations is None:  # one reply
            messages = [
                [*p.messages, {"role": "assistant", "content": t}] for p, t in zip(prompts, completions)
            ]
            tool_calls: list[list[dict[str, Any]]] = [[] for _ in prompts]
        else:
            messages = [list(conv.messages) for conv in conversations]
            tool_calls = [list(conv.tool_calls) for conv in conversations]
        return cls(
            tags=tags,
            rows=[p.row for p in prompts],
            prompts=[p.text for p in prompts],
            prompt_messages=[p.messages for p in prompts],
            completion_lengths=[int(n) for n in completion_lengths],
            max_completion_length=max_completion_length,
            messages=messages,
            tool_calls=tool_calls,
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
    timeout: float = 0.0  # config.reward_timeout: seconds a call may take, 0 = no limit

    def __call__(self, completions: list[str], references: list[str], **kwargs: Any) -> list[float]:
        if self.timeout <= 0:
            return self.fn(completions, references, **kwargs, **self.kwargs)
        return _call_with_timeout(self, lambda: self.fn(completions, references, **kwargs, **self.kwargs))


def _call_with_timeout(r: Reward, call: Callable[[], Any]) -> Any:
    """Run one call in a worker thread and wait at most r.timeout seconds. A thread cannot be stopped, so a call
    that overruns is abandoned: the thread is a daemon, which the interpreter does not wait for at exit, and the
    run stops with the function's name. The worker takes over the caller's grad mode and CUDA device, which are
    per thread in torch (a learned reward model would otherwise land on GPU 0 on every rank)."""
    result: dict[str, Any] = {}
    grad = torch.is_grad_enabled()
    device = (
        torch.cuda.current_device() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    )

    def work() -> None:
        try:
            if device is not None:
                torch.cuda.set_device(device)
            with torch.set_grad_enabled(grad):
                result["value"] = call()
        except BaseException as e:  # handed to the caller, raised there
            result["error"] = e

    worker = threading.Thread(target=work, name=f"reward {r.name}", daemon=True)
    worker.start()
    worker.join(r.timeout)
    if worker.is_alive():
        raise RewardTimeout(
            f"Reward function {r.name!r} did not return within config.reward_timeout = {r.timeout:g} s; make "
            "it faster, or raise reward_timeout (0 = no limit)."
        )
    if "error" in result:
        raise result["error"]
    return result["value"]


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


def resolve_rewards(
    entries: list[Any], *, max_completion_length: int | None = None, timeout: float = 0.0
) -> list[Reward]:
    """Entries are 'name', 'pkg.mod:fn', or {name: ..., weight: ..., KEY: VALUE...}, the extra keys passed to the
    function as keyword arguments; checked before anything heavy loads (overlong_penalty's buffer against
    max_completion_length when given). `timeout`: seconds each call may take (config.reward_timeout)."""
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
        if not isinstance(weight, (int, float)) or isinstance(weight, bool) or not math.isfinite(weight):
            raise ConfigError(f"{where} weight = {weight!r} is not allowed: expected a finite number.")
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
        rewards.append(Reward(label, fn, float(weight), options, timeout=float(timeout)))
    return rewards


def score(
    rewards: list[Reward], completions: list[str], references: list[str], **kwargs: Any
) -> torch.Tensor:
    """[N, R] raw scores, one column per reward function. A failing function is named with its input; so is one
    that breaks the contract (a list of finite numbers, one per completion), here rather than as a non-finite
    loss later."""
    columns = []
    for r in rewards:
        try:
            returned = r(completions, references, **kwargs)
        except RewardTimeout:
            raise
        except Exception as e:
            raise RewardError(_locate_failure(r, completions, references, kwargs, e)) from e
        values = _numbers(r, returned)
        if len(values) != len(completions):
            error = ValueError(f"returned {len(values)} values for {len(completions)} completions")
            raise RewardError(_locate_failure(r, completions, references, kwargs, error))
        bad = next((i for i, v in enumerate(values) if not math.isfinite(v)), None)
        if bad is not None:
            raise RewardError(
                f"Reward function {r.name!r} returned {values[bad]} for completion {bad}: a reward must be a "
                "finite number."
            )
        columns.append(torch.tensor(values, dtype=torch.float32))
    return torch.stack(columns, dim=1)  # [N, R]


def _numbers(r: Reward, returned: Any) -> list[float]:
    """The returned scores as floats: a list or tuple (or a 1-D tensor or array) of real numbers. Anything else
    is refused by name: float() would read a returned string character by character."""
    items = (
        returned.tolist()
        if isinstance(returned, torch.Tensor) or hasattr(returned, "__array__")
        else returned
    )
    contract = f"Reward function {r.name!r} must return a list of numbers, one per completion"
    try:
        what = f"a value of type {type(returned).__name__}, length {len(returned)}"
    except TypeError:  # no length: a number, None, a 0-d tensor
        what = f"a value of type {type(returned).__name__}"
    if returned is None:
        raise RewardError(f"{contract}; it returned None.")
    if not isinstance(items, (list, tuple)):
        raise RewardError(f"{contract}; it returned {what}: {_short(returned)}.")
    for i, v in enumerate(items):
        if not isinstance(v, numbers.Real) and not (isinstance(v, torch.Tensor) and v.numel() == 1):
            raise RewardError(
                f"{contract}; it returned {what}, whose item {i} is {type(v).__name__}: {_short(v)}."
            )
    return [float(v) for v in items]


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


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
        except RewardTimeout:
            raise
        except Exception as e:
            return (
                f"Reward function {r.name!r} raised {type(e).__name__}: {e}\n"
                f"on completion {i}:\n{completions[i]!r}"
            )
    return f"Reward function {r.name!r} raised {type(error).__name__}: {error}"
