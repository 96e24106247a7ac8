"""A learned reward: a sequence-classification model with one output scores each conversation.

Template entry: `{name: reward_model, model: PATH_OR_HUB_ID, batch_size: 8, max_length: 2048, device: auto}`.
The conversation is the prompt's messages (system + user, from the data template) plus the completion as the
assistant's reply, rendered with the reward model's own chat template (plain "role: content" lines when it has
none): a reward model scores the format it was trained on, not the policy's.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import torch

from grpo.config import ConfigError


def options_problem(options: dict[str, Any]) -> str | None:
    """Why a template entry's options cannot work, or None. Cheap: checked before anything loads."""
    for key in ("batch_size", "max_length"):
        value = options.get(key, 1)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            return f"reward_model {key} = {value!r} is not allowed: expected an integer of at least 1."
    model = options.get("model")
    if not isinstance(model, str) or not model:
        return "reward_model needs model: a local folder or hub id of a sequence-classification model."
    path = Path(model).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            return f"reward_model model = {model!r} is not a model folder (no config.json)."
        return None
    if model.startswith((".", "/", "~")) or model.count("/") != 1:
        return f"reward_model model = {model!r}: no such folder, and not a hub id (org/name)."
    return None


@functools.lru_cache(maxsize=4)
def load_reward_model(model: str, device: str) -> tuple[torch.nn.Module, Any]:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    dev = torch.device(device)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    net = AutoModelForSequenceClassification.from_pretrained(model, dtype=dtype).to(dev).eval()
    net.requires_grad_(False)
    if net.config.num_labels != 1:
        raise ConfigError(
            f"reward_model model = {model!r} has {net.config.num_labels} outputs; a reward model has 1."
        )
    tokenizer = AutoTokenizer.from_pretrained(model)
    tokenizer.truncation_side = "left"  # a conversation over max_length keeps its end: the reply being scored
    if tokenizer.pad_token_id is None:  # batches need padding; the model pools the last real token
        tokenizer.pad_token = tokenizer.eos_token
    net.config.pad_token_id = tokenizer.pad_token_id
    return net, tokenizer


def conversation_text(tokenizer: Any, messages: list[dict[str, str]], completion: str) -> str:
    chat = [*messages, {"role": "assistant", "content": completion}]
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(chat, tokenize=False)
    return "\n".join(f"{m['role']}: {m['content']}" for m in chat)


def _auto_device() -> str:
    return f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available() else "cpu"


@torch.no_grad()
def reward_model(
    completions: list[str],
    references: list[str],
    *,
    model: str,
    prompt_messages: list[list[dict[str, str]]] | None = None,
    batch_size: int = 8,
    max_length: int = 2048,
    device: str = "auto",
    **_: Any,
) -> list[float]:
    """The model's single logit for each (prompt, completion) conversation; references are not used."""
    if prompt_messages is None or len(prompt_messages) != len(completions):
        raise ValueError("reward_model needs prompt_messages, one per completion (the trainer passes them).")
    net, tokenizer = load_reward_model(model, _auto_device() if device == "auto" else device)
    texts = [conversation_text(tokenizer, m, c) for m, c in zip(prompt_messages, completions, strict=True)]
    templated = bool(getattr(tokenizer, "chat_template", None))
    scores: list[float] = []
    for i in range(0, len(texts), batch_size):
        batch = tokenizer(
            texts[i : i + batch_size],
            return_tensors="pt",
            padding=True,
            truncation=True,
            max_length=max_length,
            add_special_tokens=not templated,  # a chat template writes its own
        ).to(net.device)
        scores += net(**batch).logits[:, 0].float().tolist()
    return scores
