"""Rollout decoding speed of each decode implementation, against the memory-bandwidth bound.

    python scripts/bench_decode.py                                  # CPU fp32: packed, static, hf
    python scripts/bench_decode.py --device cuda --impls graph,static,hf --prompts 16 --generations 8 --tokens 256

Every completion runs to full length (no end token), so each implementation does the same work. One JSON line
per implementation: median seconds per rollout, completion tokens/s, ms per token (prefill included), and tokens/s as a
share of the memory-bandwidth bound: rows x measured copy bandwidth / bytes a decode step reads (every weight once,
and each row's keys and values at the decode steps' mean context length, prompt + tokens / 2). The weights-only
bound of earlier runs is reported too (bound_weights_only_tokens_per_s, vs_weights_only_bound).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

DTYPES = {"fp32": "float32", "bf16": "bfloat16"}


def parse_args(argv: list[str]) -> argparse.Namespace:
    from grpo.rollout.decoding.decoders import DECODE_IMPLS

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="embedded:smollm2-135m-instruct", help="hub id, folder or .gguf")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--dtype", choices=sorted(DTYPES), help="default: fp32 on CPU, bf16 on CUDA")
    p.add_argument("--impls", help=f"comma list of {', '.join(DECODE_IMPLS)} (default: fastest first)")
    p.add_argument("--prompts", type=int, default=1, help="distinct prompts per rollout")
    p.add_argument("--generations", type=int, default=4, help="G completions per prompt")
    p.add_argument("--prompt-tokens", type=int, default=120)
    p.add_argument("--tokens", type=int, default=64, help="completion tokens per row")
    p.add_argument(
        "--repeat", type=int, default=3, help="timed rollouts per implementation (after a warm-up)"
    )
    args = p.parse_args(argv)
    default = "graph,static,hf" if args.device == "cuda" else "packed,static,hf"
    args.impls = [s.strip() for s in (args.impls or default).split(",") if s.strip()]
    bad = [s for s in args.impls if s not in DECODE_IMPLS or s == "auto"]
    if bad or not args.impls:
        p.error(f"--impls: {', '.join(bad) or 'empty'} is not one of graph, packed, static, hf.")
    for name in ("prompts", "generations", "prompt_tokens", "tokens", "repeat"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} = {getattr(args, name)}: it must be at least 1.")
    return args


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    import torch

    from grpo.model.loading import load_model
    from grpo.rollout.generate import SamplingSettings, generate
    from scripts.bench_systems import decode_bound, kv_cache_bytes_per_token, mean_decode_context, sync
    from scripts.bench_systems.ours import copy_bandwidth

    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda, but no CUDA GPU is visible.", file=sys.stderr)
        return 2
    device = torch.device(args.device)
    dtype = getattr(torch, DTYPES[args.dtype or ("bf16" if args.device == "cuda" else "fp32")])
    model = load_model(args.model, device=device, dtype=dtype)
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(0)
    prompts = [
        torch.randint(100, vocab, (args.prompt_tokens,), generator=g).tolist() for _ in range(args.prompts)
    ]
    rows = args.prompts * args.generations
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    kv_per_token = kv_cache_bytes_per_token(model.config, dtype.itemsize)
    context = mean_decode_context(args.prompt_tokens, args.tokens)
    bound = decode_bound(rows, copy_bandwidth(device), weight_bytes, kv_per_token, context)
    for impl in args.impls:
        times = []
        for i in range(args.repeat + 1):  # the first rollout warms up (allocations, calibration, autotuning)
            sync(args.device)
            t0 = time.perf_counter()
            generate(
                model,
                prompts,
                SamplingSettings(max_new_tokens=args.tokens, end_ids=()),  # every row to the full length
                num_generations=args.generations,
                pad_id=0,
                generator=torch.Generator(device=device).manual_seed(i),
                decode_impl=impl,
            )
            sync(args.device)
            times.append(time.perf_counter() - t0)
        median = statistics.median(times[1:])
        tokens_per_s = rows * args.tokens / median
        line = {
            "impl": impl,
            "device": args.device,
            "dtype": str(dtype).removeprefix("torch."),
            "rows": rows,
            "tokens": args.tokens,
            "median_rollout_s": round(median, 6),
            "tokens_per_s": round(tokens_per_s, 1),
            "ms_per_token": round(1000 * median / args.tokens, 3),  # prefill included
            "bound_tokens_per_s": round(bound["tokens_per_s"], 1),  # weights + KV cache per decode step
            "vs_bound": round(tokens_per_s / bound["tokens_per_s"], 3),
            "bound_weights_only_tokens_per_s": round(bound["weights_only_tokens_per_s"], 1),
            "vs_weights_only_bound": round(tokens_per_s / bound["weights_only_tokens_per_s"], 3),
            "weight_bytes": weight_bytes,
            "kv_cache_bytes_per_step": round(bound["kv_bytes_per_step"]),  # all rows, mean context
        }
        print(json.dumps(line), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
