"""Where metrics go: metrics.jsonl (one line per step), TensorBoard, optional W&B, and samples.jsonl."""

from __future__ import annotations

import json
import resource
import sys
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from grpo.run.atomic_files import atomic_write_text


def peak_memory_bytes(device: torch.device | str) -> int:
    """The process's peak so far: max allocated on a GPU, the peak resident set on CPU (ru_maxrss: KiB on
    Linux, bytes on macOS)."""
    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    scale = 1 if sys.platform == "darwin" else 1024
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * scale


def finish_queued(device: torch.device) -> None:
    """Wait for the GPU's queued work, so that a phase's wall-clock time covers its kernels rather than the
    next phase's first host read (one sync per phase; nothing to wait for on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory_metric(device: torch.device) -> dict[str, float]:
    """{'memory/peak_allocated_gb' or 'memory/peak_rss_gb': GB}, named by what was measured."""
    key = "memory/peak_allocated_gb" if device.type == "cuda" else "memory/peak_rss_gb"
    return {key: peak_memory_bytes(device) / 1e9}


class RunLogger:
    """Rank 0 only. Every sink gets the same flat dict of floats keyed like 'reward/correctness'."""

    def __init__(
        self,
        output_dir: Path,
        *,
        total_steps: int,
        config: dict[str, Any],
        use_wandb: bool,
        wandb_project: str,
        run_name: str,
        initial_step: int = 0,
    ):
        from torch.utils.tensorboard import SummaryWriter

        self.output_dir = output_dir
        self.metrics_path = output_dir / "metrics.jsonl"
        self.samples_path = output_dir / "samples.jsonl"
        # After a resume, drop TensorBoard events past the checkpoint so re-run steps are not doubled.
        purge = initial_step + 1 if initial_step > 0 else None
        self.tb = SummaryWriter(log_dir=str(output_dir / "tensorboard"), purge_step=purge)
        self.wandb = None
        if use_wandb:
            try:
                import wandb
            except ImportError:
                raise RuntimeError(
                    "config.log_to_wandb is true but wandb is not installed: pip install wandb."
                ) from None
            # A resumed run continues the same W&B run: its id is kept in the run folder. Steps the W&B run
            # already holds are re-logged with the same values (resume is exact) and W&B keeps the first.
            id_file = output_dir / "wandb_run_id"
            run_id = id_file.read_text().strip() if initial_step > 0 and id_file.is_file() else None
            self.wandb = wandb.init(
                project=wandb_project,
                name=run_name,
                config=config,
                dir=str(output_dir),
                reinit=True,
                id=run_id,  # None: W&B makes a new one
                resume="allow",
            )
            atomic_write_text(id_file, self.wandb.id + "\n")
        self.bar = tqdm(
            total=total_steps,
            initial=initial_step,
            desc="GRPO",
            unit="step",
            dynamic_ncols=True,
            file=sys.stderr,
        )

    def log(self, step: int, metrics: dict[str, float]) -> None:
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")
        for key, value in metrics.items():
            self.tb.add_scalar(key, value, step)
        self.tb.flush()
        if self.wandb is not None:
            self.wandb.log(metrics, step=step)
        self.bar.set_postfix(
            reward=f"{metrics.get('reward/total_mean', 0.0):.3f}",
            loss=f"{metrics.get('loss', 0.0):.4f}",
            refresh=False,
        )
        self.bar.update(1)

    def log_samples(self, step: int, records: list[dict[str, Any]]) -> None:
        with open(self.samples_path, "a") as f:
            for r in records:
                f.write(json.dumps({"step": step, **r}) + "\n")
        if records:
            first = records[0]
            self.tb.add_text(
                "samples", f"**reward {first['reward']:.3f}**\n\n```\n{first['completion']}\n```", step
            )

    def write(self, text: str) -> None:
        self.bar.write(text)

    def close(self) -> None:
        self.bar.close()
        self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()
