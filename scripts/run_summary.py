"""One JSON line per training run: median step time, peak memory, reward, entropy and the rollout mismatch,
read from its metrics.jsonl.

    python scripts/run_summary.py runs/ddp runs/fsdp

The first step is left out of the median (it pays for warm-up: allocator growth, kernel autotuning, caches).
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path
from typing import Any

MEMORY_KEYS = ("memory/peak_allocated_gb", "memory/peak_rss_gb")


def summarize_run(run_dir: Path) -> dict[str, Any]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise ValueError(f"{path} not found: pass a run folder (a template's config.output_dir).")
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if not rows:
        raise ValueError(f"{path} has no steps yet.")
    measured = rows[1:] or rows
    summary: dict[str, Any] = {
        "run": str(run_dir),
        "steps": len(rows),
        "median_step_s": round(statistics.median(r["time/step_s"] for r in measured), 3),
        "median_rollout_s": round(statistics.median(r["time/rollout_s"] for r in measured), 3),
        "reward_first": round(rows[0]["reward/total_mean"], 4),
        "reward_last": round(rows[-1]["reward/total_mean"], 4),
    }
    if "entropy" in rows[0]:  # runs logged before the entropy metric existed lack it
        summary["entropy_first"] = round(rows[0]["entropy"], 4)
        summary["entropy_last"] = round(rows[-1]["entropy"], 4)
    if "rollout/mismatch_kl" in rows[0]:  # the decode path against the training forward, worst step
        summary["mismatch_kl_max"] = max(r["rollout/mismatch_kl"] for r in rows)
        summary["mismatch_logp_gap_max"] = max(r["rollout/mismatch_max"] for r in rows)
    for key in MEMORY_KEYS:
        if key in rows[0]:
            summary["peak_memory_gb"] = round(max(r[key] for r in rows), 3)
            summary["memory_kind"] = key.removeprefix("memory/").removesuffix("_gb")
    return summary


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        return 0 if argv else 2
    try:
        lines = [json.dumps(summarize_run(Path(a))) for a in argv]
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
