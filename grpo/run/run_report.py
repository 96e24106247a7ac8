"""The last lines a finished run prints: where the model is, how the reward moved, and what to run next."""

from __future__ import annotations

import json
import shlex
from pathlib import Path
from typing import Any

WINDOW = 10  # steps averaged at each end of the run; fewer when the run is short


def shown_path(path: Path) -> str:
    """Relative to the working directory when the path lies under it, else absolute."""
    path = Path(path).resolve()
    try:
        return str(path.relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def reward_movement(metrics_file: Path, keys: list[str]) -> str | None:
    """'steps 1-10 -> 15-24: total 2.36 -> 3.94, ...' from metrics.jsonl; None before the first step."""
    if not metrics_file.is_file():
        return None
    rows = [json.loads(line) for line in metrics_file.read_text().splitlines() if line.strip()]
    if not rows:
        return None
    if len(rows) == 1:
        values = ", ".join(f"{_label(k)} {rows[0][k]:.3f}" for k in keys if k in rows[0])
        return f"Reward at step {rows[0]['step']}: {values}"
    k = min(WINDOW, len(rows) // 2)
    first, last = rows[:k], rows[-k:]

    def span(part: list[dict[str, Any]]) -> str:
        a, b = part[0]["step"], part[-1]["step"]
        return str(a) if a == b else f"{a}-{b}"

    def mean(part: list[dict[str, Any]], key: str) -> float:
        return sum(r[key] for r in part) / len(part)

    moves = [
        f"{_label(key)} {mean(first, key):.3f} -> {mean(last, key):.3f}"
        for key in keys
        if all(key in r for r in rows)
    ]
    return f"Mean reward, steps {span(first)} -> {span(last)}: {', '.join(moves)}"


def closing_report(
    *, run_dir: Path, model_dir: Path, template: Any, example: str | None, scripts_dir: Path
) -> str:
    """The run's summary and next commands, as printed at the end of scripts/train.py."""
    c = template.config
    model, run = shown_path(model_dir), shown_path(run_dir)
    lines = []
    if c.use_lora:
        lines.append(f"LoRA adapter saved to {model} (on top of {template.model}).")
    else:
        lines.append(f"Model saved to {model} (a folder transformers' from_pretrained loads).")
    keys = ["reward/total_mean"] + [f"reward/{n}" for n in _reward_names(c.rewards) if _is_accuracy(n)]
    movement = reward_movement(Path(run_dir) / "metrics.jsonl", keys)
    if movement:
        lines.append(movement)
    eval_file = Path(run_dir) / "eval.json"
    if eval_file.is_file():
        result = json.loads(eval_file.read_text())
        lines.append(
            f"Held-out accuracy on {result['split']} ({result['num_prompts']} problems, greedy): "
            f"{result['accuracy']:.3f}"
        )
    scripts = shown_path(scripts_dir)
    weights = f"--adapter {shlex.quote(model)}" if c.use_lora else f"--model {shlex.quote(model)}"
    template_file = shlex.quote(str(Path(run) / "template.yaml"))
    lines += [
        "Next:",
        f"  evaluate:  python {scripts}/eval.py {template_file} {weights} --limit 200",
        f"  try it:    python {scripts}/generate.py {shlex.quote(run)} {shlex.quote(example or 'What is 3 + 4?')}",
        f"  curves:    tensorboard --logdir {shlex.quote(str(Path(run) / 'tensorboard'))}",
    ]
    return "\n".join(lines)


def example_question(template_input: str, row: dict[str, Any]) -> str | None:
    """The value a dataset row gives the template's one input variable: a question generate.py accepts."""
    from grpo.data import input_variable

    name = input_variable(template_input)
    return str(row[name]) if name in row else None


def _label(metric: str) -> str:
    return "total" if metric == "reward/total_mean" else metric.removeprefix("reward/")


def _reward_names(rewards: list[Any]) -> list[str]:
    return [r if isinstance(r, str) else str(r.get("name", "")) for r in rewards]


def _is_accuracy(name: str) -> bool:
    """The rewards that pay for the right answer, the ones worth following beside the total."""
    return name.rpartition(":")[2] in ("correctness", "final_answer")
