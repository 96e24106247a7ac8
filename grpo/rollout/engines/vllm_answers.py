"""What a vLLM server's answers must hold before the trainer uses them (grpo/rollout/engines/vllm_server.py).

The trainer does not trust the server: a wrong answer, from a broken server, a proxy or something that only looks
like vLLM, must not reach the rollout as a KeyError, nor as samples paired with the wrong prompt, token ids the
model does not have, or log-probs that are not log-probs. Each check here refuses an answer with one line that
names the server, the route and what was wrong; a valid answer comes back in the shape the trainer uses.
"""

from __future__ import annotations

import json
import math
from typing import Any

from grpo.errors import EngineError

# vLLM's processed log-probs are a log-softmax, never above 0; the slack only forgives float rounding.
LOGPROB_SLACK = 1e-6


class BadAnswer(EngineError):
    """The server answered, with something the trainer cannot use (the message says what)."""


def _short(value: Any) -> str:
    text = json.dumps(value, allow_nan=True, default=repr)
    return text if len(text) <= 80 else text[:77] + "..."


def _refuse(url: str, path: str, problem: str) -> BadAnswer:
    return BadAnswer(f"the vLLM server at {url} answered {path} with {problem}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _field(url: str, path: str, answer: Any, name: str) -> Any:
    if not isinstance(answer, dict) or name not in answer:
        raise _refuse(url, path, f'no "{name}" field ({_short(answer)})')
    return answer[name]


def weight_version(url: str, answer: Any) -> str | None:
    """/weight_info: {"weight_version": str | null}."""
    found = _field(url, "/weight_info", answer, "weight_version")
    if found is not None and not isinstance(found, str):
        raise _refuse(url, "/weight_info", f"a weight_version that is not a string ({_short(found)})")
    return found


def served_model(url: str, answer: Any) -> tuple[str, int | None]:
    """/v1/models: the first model's id and its max_model_len (None when the server does not say)."""
    data = _field(url, "/v1/models", answer, "data")
    if not isinstance(data, list) or not data:
        raise _refuse(url, "/v1/models", f"no model in its data list ({_short(data)})")
    model = data[0]
    if not isinstance(model, dict) or not isinstance(model.get("id"), str) or not model["id"]:
        raise _refuse(url, "/v1/models", f"a model without an id ({_short(model)})")
    length = model.get("max_model_len")
    if length is not None and (not _is_int(length) or length <= 0):
        raise _refuse(url, "/v1/models", f"a max_model_len that is not a positive integer ({_short(length)})")
    return model["id"], length


def rpc_results(url: str, method: str, answer: Any) -> list[Any]:
    """/collective_rpc: {"results": [one per worker]}."""
    results = _field(url, f"/collective_rpc {method}", answer, "results")
    if not isinstance(results, list) or not results:
        raise _refuse(url, f"/collective_rpc {method}", f"no worker's result ({_short(results)})")
    return results


def completion_samples(
    url: str,
    answer: Any,
    *,
    n: int,
    max_tokens: int,
    vocab_size: int | None,
    with_logprobs: bool,
) -> list[tuple[list[int], list[float] | None]]:
    """/v1/completions for one prompt: its `n` samples in the order of their index, each the token ids (1 to
    max_tokens of them, inside the vocabulary) and, when asked for, one finite log-prob <= 0 per token."""
    path = "/v1/completions"
    choices = _field(url, path, answer, "choices")
    if not isinstance(choices, list) or len(choices) != n:
        count = len(choices) if isinstance(choices, list) else _short(choices)
        raise _refuse(url, path, f"{count} choices for n = {n} samples of the prompt")
    by_index: dict[int, tuple[list[int], list[float] | None]] = {}
    for choice in choices:
        if not isinstance(choice, dict):
            raise _refuse(url, path, f"a choice that is not an object ({_short(choice)})")
        index = choice.get("index")
        if not _is_int(index) or not 0 <= index < n or index in by_index:
            raise _refuse(url, path, f"choice index {_short(index)}: expected each of 0 to {n - 1} once")
        by_index[index] = _sample(url, path, choice, index, max_tokens, vocab_size, with_logprobs)
    return [by_index[i] for i in range(n)]


def _sample(
    url: str,
    path: str,
    choice: dict[str, Any],
    index: int,
    max_tokens: int,
    vocab_size: int | None,
    with_logprobs: bool,
) -> tuple[list[int], list[float] | None]:
    tokens = choice.get("token_ids")
    if not isinstance(tokens, list) or not tokens or not all(_is_int(t) for t in tokens):
        raise _refuse(url, path, f"choice {index} without a list of token ids ({_short(tokens)})")
    if len(tokens) > max_tokens:
        raise _refuse(url, path, f"choice {index} of {len(tokens)} tokens, above max_tokens = {max_tokens}")
    for t in tokens:
        if t < 0 or (vocab_size is not None and t >= vocab_size):
            vocab = f"the vocabulary of {vocab_size} tokens" if vocab_size is not None else "the vocabulary"
            raise _refuse(url, path, f"token id {t} in choice {index}, outside {vocab}")
    if not with_logprobs:
        return tokens, None
    logprobs = choice.get("logprobs")
    values = logprobs.get("token_logprobs") if isinstance(logprobs, dict) else None
    if not isinstance(values, list) or len(values) != len(tokens):
        raise _refuse(
            url, path, f"choice {index} without one log-prob per token ({_short(values)} for {len(tokens)})"
        )
    for v in values:
        if (
            not isinstance(v, (int, float))
            or isinstance(v, bool)
            or not math.isfinite(v)
            or v > LOGPROB_SLACK
        ):
            raise _refuse(url, path, f"log-prob {_short(v)} in choice {index}, not a finite number <= 0")
    return tokens, [float(v) for v in values]
