"""A saved model folder must build the same model under every transformers version setup.py allows.

    python .ci/model_logits.py save  MODEL REF.json   # token ids and logits under this venv's versions
    python .ci/model_logits.py check MODEL REF.json   # the same folder under other versions: equal ids, logits to 1e-4

The prompt goes through the folder's own tokenizer and chat template, so a tokenizer that is refused or reads
differently fails here too, not only a config key read with another meaning (a RoPE base, say)."""

from __future__ import annotations

import json
import sys

import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer

TOLERANCE = 1e-4
MESSAGES = [{"role": "user", "content": "What is 7 + 5? Put the answer in <answer></answer> tags."}]


def logits(model_dir: str) -> tuple[list[int], torch.Tensor]:
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    text = tokenizer.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    ids = tokenizer(text + "The answer is <answer>12</answer>", add_special_tokens=False)["input_ids"]
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        return ids, model(torch.tensor([ids])).logits[0]


def main(mode: str, model_dir: str, ref: str) -> int:
    ids, out = logits(model_dir)
    if mode == "save":
        with open(ref, "w") as f:
            json.dump({"transformers": transformers.__version__, "ids": ids, "logits": out.tolist()}, f)
        print(f"logits of {len(ids)} tokens under transformers {transformers.__version__} -> {ref}")
        return 0
    saved = json.load(open(ref))
    if ids != saved["ids"]:
        print(
            f"the tokenizer reads differently under transformers {transformers.__version__}: {ids} != {saved['ids']}"
        )
        return 1
    gap = (out - torch.tensor(saved["logits"])).abs().max().item()
    print(f"transformers {transformers.__version__} vs {saved['transformers']}: largest logit gap {gap:.2e}")
    return 0 if gap <= TOLERANCE else 1


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
