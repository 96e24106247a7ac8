"""scripts/eval_tools.py: the held-out tool use and accuracy of a tools template, as one JSON line."""

from __future__ import annotations

import json

from tests.conftest import tiny_template, write_template
from tests.test_generate import run_script


def tools_template(model_dir, tmp_path, **config):
    data = tiny_template(model_dir, tmp_path / "out", maximum_completion_length=16, **config)
    data["dataset"] = {"path": "builtin:multiply"}
    return write_template(tmp_path / "t.yaml", data)


def test_a_template_without_tools_is_refused(tiny_model_dir, tmp_path):
    done = run_script("scripts/eval_tools.py", str(tools_template(tiny_model_dir, tmp_path)))
    assert done.returncode == 1
    assert done.stderr.strip() == "eval_tools.py needs a template with config.tools or config.environment."


def test_it_prints_one_line_of_shares(tiny_model_dir, tmp_path):
    template = tools_template(tiny_model_dir, tmp_path, tools=["calculator"], maximum_sequence_length=600)
    done = run_script("scripts/eval_tools.py", str(template), "--limit", "3", "--batch-size", "2")
    assert done.returncode == 0, done.stderr[-2000:]
    (line,) = done.stdout.strip().splitlines()
    summary = json.loads(line)
    shares = ["tool_use", "accuracy_strict", "accuracy_flexible", "mentioned"]
    assert summary["problems"] == 3 and summary["model"] == str(tiny_model_dir)
    assert all(summary[k] in (0.0, 1 / 3, 2 / 3, 1.0) for k in shares)  # shares of the 3 problems
    # a random model writes no call: one turn each, nothing run, no right number
    assert summary["turns/mean"] == 1.0 and summary["tools/calls_per_sample"] == 0.0
    assert summary["tool_use"] == summary["accuracy_flexible"] == 0.0
