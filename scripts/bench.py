"""Step time and memory of our GRPO trainer against TRL's GRPOTrainer on the same work.

    python scripts/bench.py cpu                     # ours, and TRL when `import trl, datasets` works
    python scripts/bench.py cpu --repeats 2 --ignore-eos
    python scripts/bench.py gpu --systems ours
    python scripts/bench.py cpu --systems ours --engine vllm   # our decoder and vLLM side by side

Runs alternate (ours, trl, ours, trl, ...), each in a fresh child process so peak memory is per system.
Prints one JSON line per system: median step time, rollout tokens/s, peak memory and ours/TRL ratios, and
rollout tokens/s against the memory-bandwidth bound: rows x measured copy bandwidth / bytes read per decode
step (the weights, plus each row's KV cache at the decode steps' mean context length; the weights-only bound of
earlier runs is reported too). When one system's run fails, the other systems' rows are still printed (and
written to --out), an error line names the failed one, and the exit status is 1.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import statistics
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from scripts.bench_systems import CONFIGS, BenchConfig, resolve_config  # noqa: E402

SYSTEMS = ("ours", "trl")
CHILDREN = (*SYSTEMS, "ours-vllm")  # ours-vllm: our trainer with rollout_engine vllm (--engine vllm)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("config", choices=sorted(CONFIGS), help="benchmark setting")
    ap.add_argument("--systems", default="auto", help="comma list of ours,trl (auto: trl when installed)")
    ap.add_argument("--repeats", type=int, default=1, help="alternating runs per system")
    ap.add_argument("--steps", type=int, help="steps per run, warm-up included")
    ap.add_argument("--model", help="model override (hub id, folder or .gguf)")
    ap.add_argument("--data", help="GSM8K-style file or hub id (default: the shared GSM8K train file)")
    ap.add_argument(
        "--engine",
        choices=("torch", "vllm"),
        default="torch",
        help="vllm: our trainer also runs with rollout_engine vllm, a row beside our decoder's",
    )
    ap.add_argument("--ignore-eos", action="store_true", help="force every completion to full length")
    ap.add_argument("--out", type=Path, help="also write the result lines to this .jsonl file")
    ap.add_argument("--child", choices=CHILDREN, help=argparse.SUPPRESS)
    ap.add_argument("--config-json", help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def trl_importable() -> tuple[bool, str]:
    """Whether `import trl, datasets` works, tried in a fresh interpreter: an installed TRL can still fail to
    import (say, a datasets built against another pyarrow), and a failed import must not touch this process."""
    proc = subprocess.run([sys.executable, "-c", "import trl, datasets"], capture_output=True, text=True)
    lines = proc.stderr.strip().splitlines()
    return proc.returncode == 0, lines[-1] if lines else f"exit {proc.returncode}"


def pick_systems(spec: str) -> list[str]:
    if spec == "auto":
        if not importlib.util.find_spec("trl"):
            return ["ours"]
        ok, error = trl_importable()
        if not ok:
            print(f"[bench] trl is installed but does not import ({error}): ours alone.", file=sys.stderr)
        return ["ours", "trl"] if ok else ["ours"]
    systems = [s.strip() for s in spec.split(",") if s.strip()]
    bad = [s for s in systems if s not in SYSTEMS]
    if bad or not systems:
        raise SystemExit(f"error: --systems = {spec!r}: use a comma list of {', '.join(SYSTEMS)}.")
    if "trl" in systems and not importlib.util.find_spec("trl"):
        raise SystemExit("error: --systems asks for trl, but it is not installed: pip install -e '.[bench]'.")
    return systems


class ChildFailed(Exception):
    def __init__(self, system: str, returncode: int, stderr: str):
        super().__init__(f"the {system} benchmark run failed (exit {returncode})")
        self.system, self.returncode, self.stderr = system, returncode, stderr


def run_child(system: str, cfg: BenchConfig) -> dict[str, Any]:
    """One measured run in a fresh interpreter; its last stdout line is the JSON result."""
    cmd = [sys.executable, __file__, cfg.name, "--child", system, "--config-json", json.dumps(cfg.to_dict())]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise ChildFailed(system, proc.returncode, proc.stderr)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_systems(
    systems: list[str], cfg: BenchConfig, repeats: int, run: Callable[[str, BenchConfig], dict[str, Any]]
) -> tuple[dict[str, list[dict[str, Any]]], list[ChildFailed]]:
    """Alternating runs (ours, trl, ours, trl, ...). A system whose run fails is not run again and gets no row;
    the others still run and keep theirs. Returns the finished runs per system and the failures."""
    runs: dict[str, list[dict[str, Any]]] = {s: [] for s in systems}
    failures: list[ChildFailed] = []
    for r in range(repeats):
        for system in [s for s in systems if s in runs]:
            print(f"[bench] {cfg.name}: {system} run {r + 1}/{repeats} ...", file=sys.stderr, flush=True)
            try:
                runs[system].append(run(system, cfg))
            except ChildFailed as e:
                failures.append(e)
                del runs[system]
    return runs, failures


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
    if runs[0].get("engine_start_s") is not None:
        row["engine_start_s"] = statistics.median(r["engine_start_s"] for r in runs)
    if runs[0].get("trl_version"):
        row["trl_version"] = runs[0]["trl_version"]
    return row


def add_rollout_bound(rows: list[dict[str, Any]], ours_runs: list[dict[str, Any]]) -> None:
    """The memory-bandwidth bounds measured on our side, medians over its runs (the byte counts of its first run),
    on every row: the same model, rows and prompts on both sides, so one bound serves both (with end tokens, the
    completion lengths behind the KV-cache bytes may differ a little between the sides)."""
    if not ours_runs:
        return
    bytes_ = ours_runs[0]["rollout_bound_bytes"]
    bound = round(statistics.median(r["rollout_bound_tokens_per_s"] for r in ours_runs), 1)
    weights_only = round(
        statistics.median(r["rollout_bound_weights_only_tokens_per_s"] for r in ours_runs), 1
    )
    for row in rows:
        row["rollout_bound_tokens_per_s"] = bound  # weights + KV cache read per decode step
        row["rollout_vs_bound"] = round(row["rollout_tokens_per_s"] / bound, 3)
        row["rollout_bound_weights_only_tokens_per_s"] = weights_only  # what earlier runs called the bound
        row["rollout_vs_weights_only_bound"] = round(row["rollout_tokens_per_s"] / weights_only, 3)
        row["rollout_bound_bytes"] = bytes_


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        cfg = BenchConfig(**json.loads(args.config_json))
        if args.child in ("ours", "ours-vllm"):
            from scripts.bench_systems.ours import run_ours as run

            engine = "vllm" if args.child == "ours-vllm" else "torch"
            cfg = dataclasses.replace(cfg, rollout_engine=engine)
        else:
            from scripts.bench_systems.trl_side import run_trl as run
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
    if args.engine == "vllm":
        if not importlib.util.find_spec("vllm"):
            raise SystemExit(
                "error: --engine vllm needs the vllm package: docs/vllm.md says how to install it."
            )
        systems.insert(systems.index("ours") + 1 if "ours" in systems else 0, "ours-vllm")
    runs, failures = run_systems(systems, cfg, args.repeats, run_child)
    rows = [summarize(s, cfg, runs[s]) for s in systems if s in runs]
    by_system = {row["system"]: row for row in rows}
    if "trl" in by_system and "ours" in by_system:
        ours, trl = by_system["ours"], by_system["trl"]
        ours["step_time_vs_trl"] = round(ours["median_step_s"] / trl["median_step_s"], 3)
        ours["peak_memory_vs_trl"] = round(ours["peak_memory_gb"] / trl["peak_memory_gb"], 3)
    add_rollout_bound(rows, runs.get("ours", []))
    engines = {"ours-vllm": "vllm"}  # the row's own settings: our trainer's rows differ in the engine alone
    lines = [
        json.dumps(
            {**row, "settings": {**cfg.to_dict(), "rollout_engine": engines.get(row["system"], "torch")}}
        )
        for row in rows
    ]
    if lines:
        print("\n".join(lines), flush=True)
    if args.out:  # written even when empty, so no earlier file passes for this run's result
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text("".join(line + "\n" for line in lines))
    for failure in failures:
        print(f"--- the {failure.system} run's stderr, last 4000 characters ---", file=sys.stderr)
        sys.stderr.write(failure.stderr[-4000:].rstrip() + "\n")
        last = (failure.stderr.strip().splitlines() or ["(nothing on stderr)"])[-1]
        print(f"error: {failure}, so it has no result row; its stderr ends: {last}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
