"""Step time and memory of our GRPO trainer against TRL's GRPOTrainer on the same work.

    python scripts/bench.py cpu                     # ours, and TRL when installed (pip install .[bench])
    python scripts/bench.py cpu --repeats 2 --ignore-eos
    python scripts/bench.py gpu --systems ours

Runs alternate (ours, trl, ours, trl, ...), each in a fresh child process so peak memory is per system.
Prints one JSON line per system: median step time, rollout tokens/s, peak memory and ours/TRL ratios, and
rollout tokens/s against the memory-bandwidth bound (rows x measured copy bandwidth / weight bytes).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from grpo.bench import CONFIGS, BenchConfig, resolve_config  # noqa: E402

SYSTEMS = ("ours", "trl")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("config", choices=sorted(CONFIGS), help="benchmark setting")
    ap.add_argument("--systems", default="auto", help="comma list of ours,trl (auto: trl when installed)")
    ap.add_argument("--repeats", type=int, default=1, help="alternating runs per system")
    ap.add_argument("--steps", type=int, help="steps per run, warm-up included")
    ap.add_argument("--model", help="model override (hub id, folder or .gguf)")
    ap.add_argument("--data", help="GSM8K-style file or hub id (default: the shared GSM8K train file)")
    ap.add_argument("--ignore-eos", action="store_true", help="force every completion to full length")
    ap.add_argument("--out", type=Path, help="also write the result lines to this .jsonl file")
    ap.add_argument("--child", choices=SYSTEMS, help=argparse.SUPPRESS)
    ap.add_argument("--config-json", help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def pick_systems(spec: str) -> list[str]:
    if spec == "auto":
        return ["ours", "trl"] if importlib.util.find_spec("trl") else ["ours"]
    systems = [s.strip() for s in spec.split(",") if s.strip()]
    bad = [s for s in systems if s not in SYSTEMS]
    if bad or not systems:
        raise SystemExit(f"error: --systems = {spec!r}: use a comma list of {', '.join(SYSTEMS)}.")
    if "trl" in systems and not importlib.util.find_spec("trl"):
        raise SystemExit("error: --systems asks for trl, but it is not installed: pip install -e '.[bench]'.")
    return systems


def run_child(system: str, cfg: BenchConfig) -> dict[str, Any]:
    """One measured run in a fresh interpreter; its last stdout line is the JSON result."""
    cmd = [sys.executable, __file__, cfg.name, "--child", system, "--config-json", json.dumps(cfg.to_dict())]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-4000:])
        raise SystemExit(
            f"error: the {system} benchmark run failed (exit {proc.returncode}); its log is above."
        )
    return json.loads(proc.stdout.strip().splitlines()[-1])


def summarize(system: str, cfg: BenchConfig, runs: list[dict[str, Any]]) -> dict[str, Any]:
    measured = [s for run in runs for s in run["steps"][cfg.warmup_steps :]]
    tokens = sum(s["tokens"] for s in measured)
    rollout_s = sum(s["rollout_s"] for s in measured)
    row: dict[str, Any] = {
        "system": system,
        "config": cfg.name,
        "median_step_s": round(statistics.median(s["step_s"] for s in measured), 3),
        "rollout_tokens_per_s": round(tokens / rollout_s, 1),
        "median_rollout_s": round(statistics.median(s["rollout_s"] for s in measured), 3),
        "completion_tokens_per_step": round(tokens / len(measured), 1),
        "peak_memory_gb": round(max(r["peak_memory_bytes"] for r in runs) / 1e9, 2),
        "memory_kind": "max_allocated" if cfg.device == "cuda" else "peak_rss",
        "measured_steps": len(measured),
    }
    if runs[0].get("phases"):
        phases = [p for run in runs for p in run["phases"][cfg.warmup_steps :]]
        row["phase_median_s"] = {
            k.removeprefix("time/").removesuffix("_s"): round(statistics.median(p[k] for p in phases), 3)
            for k in phases[0]
        }
    if runs[0].get("trl_version"):
        row["trl_version"] = runs[0]["trl_version"]
    return row


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        cfg = BenchConfig(**json.loads(args.config_json))
        if args.child == "ours":
            from grpo.bench.ours import run_ours as run
        else:
            from grpo.bench.trl_side import run_trl as run
        print(json.dumps(run(cfg)), flush=True)
        return 0
    overrides = {k: v for k, v in {"steps": args.steps, "model": args.model, "data": args.data}.items() if v}
    if args.ignore_eos:
        overrides["ignore_eos"] = True
    try:
        cfg = resolve_config(args.config, overrides)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    if args.repeats < 1:
        raise SystemExit(f"error: --repeats = {args.repeats}: it must be 1 or more.")
    if cfg.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise SystemExit(
                f"error: the {cfg.name} benchmark needs a CUDA GPU and none is visible; use cpu."
            )
    systems = pick_systems(args.systems)
    runs: dict[str, list[dict[str, Any]]] = {s: [] for s in systems}
    for r in range(args.repeats):
        for system in systems:
            print(f"[bench] {cfg.name}: {system} run {r + 1}/{args.repeats} ...", file=sys.stderr, flush=True)
            runs[system].append(run_child(system, cfg))
    rows = [summarize(s, cfg, runs[s]) for s in systems]
    if "trl" in runs and "ours" in runs:
        ours, trl = rows[0], rows[1]
        ours["step_time_vs_trl"] = round(ours["median_step_s"] / trl["median_step_s"], 3)
        ours["peak_memory_vs_trl"] = round(ours["peak_memory_gb"] / trl["peak_memory_gb"], 3)
    bound = [
        r["rollout_bound_tokens_per_s"] for r in runs.get("ours", []) if "rollout_bound_tokens_per_s" in r
    ]
    for row in rows if bound else []:  # same model and rows on both sides, so one bound serves both
        row["rollout_bound_tokens_per_s"] = round(statistics.median(bound), 1)
        row["rollout_vs_bound"] = round(row["rollout_tokens_per_s"] / row["rollout_bound_tokens_per_s"], 3)
    lines = [json.dumps({**row, "settings": cfg.to_dict()}) for row in rows]
    print("\n".join(lines))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
