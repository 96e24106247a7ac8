"""Evaluate a model on a held-out split with the template's own rewards.

    python scripts/eval.py CONFIG [--model PATH] [--adapter PATH] [--split test] [--limit N] [--samples K]
                           [--batch-size B] [--output FILE.json] [key=value ...]

Greedy answers when K = 1, else K sampled answers per problem (pass@K). Prints a summary, writes it as JSON
(default: <output_dir>/eval-<split>.json) and one record per completion to the .jsonl beside it.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from grpo.run.cli_common import run_cli  # noqa: E402


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="eval.py", description="Accuracy and format rates on a held-out split.", allow_abbrev=False
    )
    p.add_argument("config", help="template YAML")
    p.add_argument("--model", help="model folder / .gguf / hub id instead of the template's model")
    p.add_argument("--adapter", help="LoRA adapter folder (adapter_config.json + adapter_model.safetensors)")
    p.add_argument("--split", help="held-out split (default: the template's dataset.eval_split)")
    p.add_argument("--limit", type=int, help="first N problems only")
    p.add_argument("--samples", type=int, default=1, help="K: 1 = greedy, K > 1 = sampled, adds pass@K")
    p.add_argument("--batch-size", type=int, default=32, help="problems per generation batch")
    p.add_argument("--output", help="summary JSON path; records go to the same name with .jsonl")
    p.add_argument("overrides", nargs="*", help="key=value template overrides, e.g. temperature=0.7")
    return p.parse_intermixed_args(argv)  # key=value overrides may follow the options


def main(argv: list[str]) -> int:
    args = parse_args(argv)

    def job() -> int:
        import torch

        from grpo import rewards as rw
        from grpo.config import ConfigError, apply_overrides, read_yaml, template_from_dict
        from grpo.eval.evaluate import evaluate, load_eval_prompts
        from grpo.model.loading import load_model, load_tokenizer, resolve_device, stop_token_ids
        from grpo.model.precision import resolve_precision
        from grpo.rollout.decoding.torch_sampler import TorchSampler
        from grpo.rollout.generate import SamplingSettings
        from grpo.rollout.turns.multi_turn import MultiTurn

        data = apply_overrides(read_yaml(args.config), args.overrides)
        if args.model:
            data["model"] = args.model
        t = template_from_dict(data, source=f"Template file {args.config!r}")
        c = t.config
        for name in ("samples", "batch_size"):
            if getattr(args, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} = {getattr(args, name)} must be at least 1.")
        if args.adapter and not Path(args.adapter).is_dir():
            raise ConfigError(f"--adapter {args.adapter!r}: no such folder.")
        split = args.split or t.dataset.eval_split
        rewards = rw.resolve_rewards(
            c.rewards, max_completion_length=c.maximum_completion_length, timeout=c.reward_timeout
        )
        device = resolve_device(c)
        tokenizer = load_tokenizer(t.model)
        prompts = load_eval_prompts(t, tokenizer, split=split, limit=args.limit)
        model = load_model(t.model, device=device, dtype=resolve_precision(c.dtype, device).compute)
        if args.adapter:
            from grpo.model.lora import load_adapter

            load_adapter(model, args.adapter)
        prefix = t.template.response_prefix
        result = evaluate(
            TorchSampler(model, pad_id=tokenizer.pad_token_id, decode_impl=c.decode_impl),
            tokenizer,
            prompts,
            rewards,
            rw.Tags.from_config(c),
            SamplingSettings.from_config(c, stop_token_ids(model, tokenizer)),
            samples=args.samples,
            batch_size=args.batch_size,
            response_prefix=prefix,
            generator=torch.Generator(device=device).manual_seed(c.seed),
            turns=MultiTurn.from_config(c, prefix),  # tools: several turns, as in training
        )
        output = Path(args.output) if args.output else Path(c.output_dir) / f"eval-{Path(split).stem}.json"
        summary = {
            "model": t.model,
            "adapter": args.adapter,
            "dataset": t.dataset.path,
            "split": split,
            **result.summary(),
        }
        write_results(output, summary, result.records)
        print(format_summary(summary))
        print(f"wrote {output} and {output.with_suffix('.jsonl')}")
        return 0

    return run_cli(job)


def write_results(output: Path, summary: dict, records: list[dict]) -> None:
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(summary, indent=2) + "\n")
    with open(output.with_suffix(".jsonl"), "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")


def format_summary(summary: dict) -> str:
    lines = [
        f"{summary['model']} on {summary['dataset']} [{summary['split']}], {summary['num_prompts']} problems"
    ]
    for key, value in summary.items():
        if key in ("model", "adapter", "dataset", "split", "num_prompts") or value is None:
            continue
        lines.append(f"  {key:<24} {value:.4f}" if isinstance(value, float) else f"  {key:<24} {value}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
