"""Asynchronous rollouts against the synchronous loop: the same template, the same steps, side by side.

    python scripts/bench_async.py                       # configs/default.yaml, 8 steps, cores 0 and 1
    python scripts/bench_async.py --steps 12 --trainer-cpus 0 --rollout-cpus 1 --levels 1,2

Each mode is a real `scripts/train.py` run:
- sync, all cores: the default loop, every phase on every core the machine lends (the honest baseline);
- sync, split: async_level 0 with the rollout process: the trainer on --trainer-cpus, the engine on
  --rollout-cpus, one thread per core, each waiting for the other;
- async k, split: async_level k with the same split, the engine drawing ahead while the trainer learns.

Steps per second are counted from the end of step 1 to the end of the last step (time/elapsed_s), so start-up
and the first step's warm-up are left out. Per step: the trainer's wait for rollouts (time/rollout_s, and the
weight pushes), the engine's busy and idle seconds. One JSON line per mode, then a table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(REPO / "configs" / "default.yaml"))
    p.add_argument("--steps", type=int, default=8, help="training steps per mode (at least 3)")
    p.add_argument("--trainer-cpus", default="0", help="comma list of cores for the trainer")
    p.add_argument("--rollout-cpus", default="1", help="comma list of cores for the rollout process")
    p.add_argument("--levels", default="1", help="comma list of async_level values to run")
    p.add_argument("--out", default="/tmp/grpo-bench-async", help="folder for the runs")
    p.add_argument("overrides", nargs="*", help="template overrides for every mode (key=value)")
    args = p.parse_args(argv)
    if args.steps < 3:
        p.error("--steps must be at least 3: the first step is warm-up")
    return args


def run_mode(args: argparse.Namespace, name: str, overrides: list[str], cpus: str | None) -> dict:
    out = Path(args.out) / name
    command = [sys.executable, str(REPO / "scripts" / "train.py"), args.config, *args.overrides, *overrides]
    command += [f"max_steps={args.steps}", f"output_dir={out}", "save_steps=0", "eval_steps=0"]
    env = dict(os.environ)
    if cpus is not None:  # pinned, one thread per core
        command = ["taskset", "-c", cpus, *command]
        env["OMP_NUM_THREADS"] = str(len(cpus.split(",")))
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{name} failed ({done.returncode}): {done.stderr.strip().splitlines()[-1:]}")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    timed = rows[1:]  # step 1 is warm-up
    seconds = rows[-1]["time/elapsed_s"] - rows[0]["time/elapsed_s"]

    def per_step(key: str) -> float:
        return sum(r.get(key, 0.0) for r in timed) / len(timed)

    return {
        "mode": name,
        "steps_per_s": len(timed) / seconds,
        "s_per_step": seconds / len(timed),
        "trainer_wait_rollout_s": per_step("time/rollout_s"),
        "trainer_push_s": per_step("time/push_s"),
        "update_s": per_step("time/update_s"),
        "engine_busy_s": per_step("time/engine_busy_s") or per_step("time/rollout_s"),
        "engine_idle_s": per_step("time/engine_idle_s"),
        "staleness": per_step("async/staleness"),
        "reward_mean": sum(r["reward/total_mean"] for r in rows) / len(rows),
    }


def main(argv: list[str] | None = None) -> None:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    split = f"rollout_cpus=[{args.rollout_cpus}]"
    modes = [("sync-all-cores", [], None), ("sync-split", ["rollout_process=true", split], args.trainer_cpus)]
    modes += [
        (f"async-{k}-split", [f"async_level={k}", split], args.trainer_cpus) for k in args.levels.split(",")
    ]
    results = []
    for name, overrides, cpus in modes:
        results.append(run_mode(args, name, overrides, cpus))
        print(json.dumps(results[-1]), flush=True)
    base = next(r for r in results if r["mode"] == "sync-split")
    print(f"\n{'mode':<16} {'steps/s':>8} {'s/step':>7} {'vs split':>8} {'wait':>6} {'push':>6} {'update':>7} "
          f"{'busy':>6} {'idle':>6}")  # fmt: skip
    for r in results:
        print(
            f"{r['mode']:<16} {r['steps_per_s']:8.3f} {r['s_per_step']:7.2f} "
            f"{r['steps_per_s'] / base['steps_per_s']:7.2f}x {r['trainer_wait_rollout_s']:6.2f} "
            f"{r['trainer_push_s']:6.2f} {r['update_s']:7.2f} {r['engine_busy_s']:6.2f} {r['engine_idle_s']:6.2f}"
        )


if __name__ == "__main__":
    main()
