"""Held-out tool use and accuracy of a tools template (docs/tools.md): greedy multi-turn answers, every turn with
the template's tools, scored with its rewards.

    python scripts/eval_tools.py CONFIG [--model PATH] [--limit N] [--batch-size B] [key=value ...]

Prints one JSON line: problems, the share of samples with a tool call that ran, the accuracy two ways (strict:
the right number in the answer tags; flexible: the final reply's answer, in its tags or else its last number),
the share that mention the right number anywhere, and calls and turns per sample.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from grpo.run.cli_common import run_cli  # noqa: E402


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="eval_tools.py", allow_abbrev=False)
    p.add_argument("config", help="template YAML with config.tools or config.environment")
    p.add_argument("--model", help="model folder instead of the template's model")
    p.add_argument("--limit", type=int, default=100, help="first N held-out problems")
    p.add_argument("--batch-size", type=int, default=50, help="problems per rollout")
    p.add_argument("overrides", nargs="*", help="key=value template overrides")
    args = p.parse_intermixed_args(argv)

    import torch

    from grpo import rewards as rw
    from grpo.config import load_template
    from grpo.data import build_prompts, load_rows
    from grpo.model.loading import load_model, load_tokenizer, stop_token_ids
    from grpo.rollout.decoding.torch_sampler import TorchSampler
    from grpo.rollout.generate import SamplingSettings
    from grpo.rollout.turns.multi_turn import MultiTurn, conversation_metrics

    template = load_template(args.config, args.overrides)
    c = dataclasses.replace(template.config, num_generations=1)  # greedy: one answer per problem
    turns = MultiTurn.from_config(c, template.template.response_prefix)
    if turns is None:
        raise SystemExit("eval_tools.py needs a template with config.tools or config.environment.")
    model_path = args.model or template.model
    tokenizer = load_tokenizer(model_path)
    model = load_model(model_path, device=torch.device("cpu"), dtype=torch.float32)
    rows = load_rows(template.dataset, template.dataset.eval_split)[: args.limit]
    prompts = build_prompts(
        rows,
        template.template,
        tokenizer,
        max_prompt_tokens=c.maximum_sequence_length - c.maximum_completion_length,
        tools=turns.schemas,
        system_text=turns.system_text(tokenizer),
    )
    sampler = TorchSampler(model, pad_id=tokenizer.pad_token_id, decode_impl=c.decode_impl)
    settings = SamplingSettings.from_config(c, stop_token_ids(model, tokenizer))
    settings = dataclasses.replace(settings, greedy=True)
    conversations = []
    for start in range(0, len(prompts), args.batch_size):
        batch = prompts[start : start + args.batch_size]
        ro = turns.rollout(sampler, batch, settings, tokenizer, None, num_generations=1, version=0)
        conversations += ro.conversations
    texts = [conv.text for conv in conversations]
    refs = [p.reference for p in prompts]
    tags = rw.Tags.from_config(c)
    correct = rw.correctness(texts, refs, tags=tags)
    final = rw.final_answer(texts, refs, tags=tags, messages=[conv.messages for conv in conversations])
    mentioned = rw.answer_mentioned(texts, refs)
    used = rw.tool_used(texts, refs, tool_calls=[conv.tool_calls for conv in conversations])
    n = len(prompts)
    summary = {
        "model": str(model_path),
        "problems": n,
        "tool_use": sum(u > 0 for u in used) / n,
        "accuracy_strict": sum(x > 0 for x in correct) / n,
        "accuracy_flexible": sum(x > 0 for x in final) / n,
        "mentioned": sum(x > 0 for x in mentioned) / n,
        **conversation_metrics(conversations),
    }
    print(json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(lambda: main(sys.argv[1:])))
