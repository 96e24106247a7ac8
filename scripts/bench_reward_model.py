"""Reward-model scoring time: the shared conversation start (one pass per prompt) against padded batches.

    python scripts/bench_reward_model.py                       # a one-output head on the embedded SmolLM2
    python scripts/bench_reward_model.py --model path/to/rm --prompts 16 --generations 8

Prompts come from configs/default.yaml's built-in task; each gets G fixed replies of different lengths. Prints
one JSON line: median seconds per call of each path, tokens per conversation, and the largest score difference.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

REPLIES = [
    "<reasoning>\n2 + 3 = 5\n</reasoning>\n<answer>\n5\n</answer>",
    "<reasoning>\nShe had some and got more, so I add them.\n</reasoning>\n<answer>\n7\n</answer>",
    "<reasoning>\nI am not sure.\n</reasoning>",
    "The answer is 4.",
]


def random_head_model(folder: Path) -> str:
    """The embedded SmolLM2 with a fresh one-output score head: the cost of a real 135M reward model."""
    from transformers import AutoModelForSequenceClassification

    from grpo.config import EMBEDDED_MODEL
    from grpo.model.loading import load_tokenizer, resolve_model_source

    source, kwargs = resolve_model_source(EMBEDDED_MODEL)
    torch.manual_seed(0)
    net = AutoModelForSequenceClassification.from_pretrained(
        source, num_labels=1, id2label={0: "reward"}, label2id={"reward": 0}, **kwargs
    )
    tokenizer = load_tokenizer(EMBEDDED_MODEL)
    net.config.pad_token_id = tokenizer.pad_token_id
    net.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="reward model folder or hub id (default: embedded SmolLM2 + random head)")
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--generations", type=int, default=4, help="G replies per prompt")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--repeat", type=int, default=3)
    args = p.parse_args(argv)
    for name in ("prompts", "generations", "batch_size", "repeat"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} = {getattr(args, name)}: it must be at least 1.")

    from grpo.config import load_template
    from grpo.data import build_prompts, load_rows
    from grpo.model.loading import load_tokenizer
    from grpo.rewards.learned_model import conversation_text, load_reward_model, reward_model

    with tempfile.TemporaryDirectory() as tmp:
        model = args.model or random_head_model(Path(tmp) / "rm")
        t = load_template(REPO / "configs" / "default.yaml")
        tokenizer = load_tokenizer(t.model)
        prompts = build_prompts(
            load_rows(t.dataset)[: args.prompts], t.template, tokenizer, max_prompt_tokens=1000
        )
        messages = [q.messages for q in prompts for _ in range(args.generations)]
        replies = [REPLIES[j % len(REPLIES)] for _ in prompts for j in range(args.generations)]
        net, rm_tokenizer = load_reward_model(model, "cpu")
        texts = [conversation_text(rm_tokenizer, m, c) for m, c in zip(messages, replies)]

        @torch.no_grad()
        def padded() -> list[float]:
            out: list[float] = []
            for i in range(0, len(texts), args.batch_size):
                batch = rm_tokenizer(
                    texts[i : i + args.batch_size],
                    return_tensors="pt",
                    padding=True,
                    add_special_tokens=False,
                )
                out += net(**batch).logits[:, 0].float().tolist()
            return out

        def shared() -> list[float]:
            kw = {"model": model, "prompt_messages": messages, "batch_size": args.batch_size, "device": "cpu"}
            return reward_model(replies, [""] * len(replies), **kw)

        times: dict[str, list[float]] = {"padded": [], "shared_start": []}
        values = {}
        for name, fn in [("padded", padded), ("shared_start", shared)] * (args.repeat + 1):
            start = time.perf_counter()
            values[name] = fn()
            times[name].append(time.perf_counter() - start)
        tokens = [len(rm_tokenizer(x, add_special_tokens=False)["input_ids"]) for x in texts]
        medians = {k: statistics.median(v[1:]) for k, v in times.items()}  # the warm-up call left out
        result = {f"{k}_s": round(v, 4) for k, v in medians.items()}
        result["speedup"] = round(medians["padded"] / max(medians["shared_start"], 1e-9), 2)
        result["conversations"] = len(texts)
        result["tokens_per_conversation"] = round(sum(tokens) / len(tokens), 1)
        result["max_score_difference"] = max(
            abs(a - b) for a, b in zip(values["padded"], values["shared_start"])
        )
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
