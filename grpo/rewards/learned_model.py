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

from grpo.errors import ConfigError
from grpo.model.logprobs import cache_argument


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
    if tokenizer.pad_token_id is None:  # a classifier without a score head pools by the pad token
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
    ids = tokenizer(texts, add_special_tokens=not templated)["input_ids"]  # a chat template writes its own
    ids = [x[-max_length:] for x in ids]  # a conversation over max_length keeps its end: the reply scored
    if not _decoder_with_score_head(net):
        return [
            v for i in range(0, len(ids), batch_size) for v in _plain_scores(net, ids[i : i + batch_size])
        ]
    scores: list[float] = []
    # The G samples of a prompt share the conversation's start: encode it once per group (see _group_scores).
    for group in _consecutive_groups(prompt_messages):
        for i in range(group.start, group.stop, batch_size):
            scores += _group_scores(net, ids[i : min(i + batch_size, group.stop)])
    return scores


def _consecutive_groups(prompt_messages: list[list[dict[str, str]]]) -> list[slice]:
    groups, start = [], 0
    for i in range(1, len(prompt_messages) + 1):
        if i == len(prompt_messages) or prompt_messages[i] != prompt_messages[start]:
            groups.append(slice(start, i))
            start = i
    return groups


def _decoder_with_score_head(net: torch.nn.Module) -> bool:
    """Llama/Qwen/Mistral-style: a decoder whose last real token's hidden state goes through a linear `score`."""
    base = getattr(net, net.base_model_prefix, None)
    return (
        isinstance(getattr(net, "score", None), torch.nn.Linear)
        and base is not None
        and not net.config.is_encoder_decoder
    )


def _right_pad(ids: list[list[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(x) for x in ids)
    batch = torch.tensor([x + [pad_id] * (width - len(x)) for x in ids], device=device)  # [B, S]
    mask = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in ids], device=device)  # [B, S]
    return batch, mask


def _plain_scores(net: torch.nn.Module, ids: list[list[int]]) -> list[float]:
    """Any sequence classifier: right-padded batch, the model's own pooling."""
    pad = net.config.pad_token_id if net.config.pad_token_id is not None else 0
    batch, mask = _right_pad(ids, pad, net.device)
    return net(input_ids=batch, attention_mask=mask).logits[:, 0].float().tolist()


def _group_scores(net: torch.nn.Module, ids: list[list[int]]) -> list[float]:
    """Conversations that share their first L tokens: those run once (batch 1), their key/value cache is
    repeated for every row, and only the rest of each conversation runs per row. The score is the linear head
    on the hidden state of each conversation's last token (with the pad token's id only as padding)."""
    base = getattr(net, net.base_model_prefix)
    common = min(len(x) for x in ids) - 1  # every row keeps at least one token of its own
    for j in range(common):
        if any(x[j] != ids[0][j] for x in ids):
            common = j
            break
    batch, mask = _right_pad([x[common:] for x in ids], 0, net.device)  # [B, S]
    width = batch.shape[1]
    kwargs: dict[str, Any] = {}
    if common > 0:
        prefix = base(input_ids=torch.tensor([ids[0][:common]], device=net.device), use_cache=True)
        cache = prefix.cache if hasattr(prefix, "cache") else prefix.past_key_values
        cache.batch_repeat_interleave(len(ids))  # [1, ...] -> [B, ...]
        kwargs[cache_argument(base)] = cache
    hidden = base(
        input_ids=batch,
        attention_mask=torch.cat([mask.new_ones(len(ids), common), mask], dim=1),
        position_ids=common + torch.arange(width, device=net.device).expand(len(ids), -1),
        use_cache=common > 0,
        **kwargs,
    ).last_hidden_state  # [B, S, H]
    last = hidden[torch.arange(len(ids), device=net.device), mask.sum(-1) - 1]  # [B, H]
    return net.score(last)[:, 0].float().tolist()
