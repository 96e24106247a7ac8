"""scripts/bench.py end to end on a tiny model: our trainer and TRL's GRPOTrainer on the same forced-length work."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from tests.conftest import REPO


def bench(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "scripts/bench.py", *args], cwd=REPO, capture_output=True, text=True, timeout=600
    )


def test_side_by_side_rows_for_equal_work(tiny_model_dir, tmp_path):
    pytest.importorskip("trl", reason="the TRL side needs pip install -e '.[bench]'")
    out = tmp_path / "bench.jsonl"
    result = bench("cpu", "--systems", "ours,trl", "--steps", "3", "--model", str(tiny_model_dir), "--ignore-eos",
                   "--out", str(out))  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(line) for line in result.stdout.strip().splitlines()]
    assert [r["system"] for r in rows] == ["ours", "trl"]
    assert out.read_text().splitlines() == result.stdout.strip().splitlines()
    ours, trl = rows
    for row in rows:
        assert row["measured_steps"] == 2  # 3 steps, the first is warm-up
        assert row["completion_tokens_per_step"] == 1 * 4 * 64  # every completion forced to 64 tokens
        assert row["median_step_s"] > 0 and row["rollout_tokens_per_s"] > 0
        assert 0.3 < row["peak_memory_gb"] < 20 and row["memory_kind"] == "peak_rss"
        assert row["settings"]["beta"] == 0.04 and row["settings"]["num_generations"] == 4
    assert ours["step_time_vs_trl"] == round(ours["median_step_s"] / trl["median_step_s"], 3)
    assert set(ours["phase_median_s"]) == {"rollout", "reward", "logprob", "fwd_bwd", "optimizer"}
    assert trl["trl_version"]
    for row in rows:  # one bandwidth bound, measured on our side, for both
        assert row["rollout_bound_tokens_per_s"] == ours["rollout_bound_tokens_per_s"] > 0
        assert row["rollout_vs_bound"] == round(
            row["rollout_tokens_per_s"] / row["rollout_bound_tokens_per_s"], 3
        )


def test_ours_alone_and_bad_arguments(tiny_model_dir):
    result = bench("cpu", "--systems", "ours", "--steps", "2", "--model", str(tiny_model_dir))
    assert result.returncode == 0, result.stderr[-3000:]
    (row,) = [json.loads(line) for line in result.stdout.strip().splitlines()]
    assert row["system"] == "ours" and row["measured_steps"] == 1
    assert 0 < row["completion_tokens_per_step"] <= 256 and "step_time_vs_trl" not in row

    result = bench("cpu", "--systems", "ours,vllm")
    assert result.returncode != 0
    assert (
        result.stderr.strip().splitlines()[-1]
        == "error: --systems = 'ours,vllm': use a comma list of ours, trl."
    )
    result = bench("cpu", "--steps", "1")
    assert (
        result.stderr.strip().splitlines()[-1]
        == "error: --steps = 1 must be larger than the 1 warm-up step(s)."
    )
    result = bench("cpu", "--repeats", "0")
    assert result.stderr.strip().splitlines()[-1] == "error: --repeats = 0: it must be 1 or more."
    result = bench("nvme")
    assert result.returncode == 2 and "argument config: invalid choice: 'nvme'" in result.stderr
    if not torch.cuda.is_available():
        result = bench("gpu", "--systems", "ours")
        assert result.stderr.strip().splitlines()[-1] == (
            "error: the gpu benchmark needs a CUDA GPU and none is visible; use cpu."
        )


def bench_decode(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "scripts/bench_decode.py", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_decode_bench_times_each_implementation_on_equal_work(tiny_model_dir):
    args = ("--model", str(tiny_model_dir), "--prompts", "2", "--generations", "3", "--tokens", "5")
    result = bench_decode(*args, "--impls", "static,graph,hf", "--prompt-tokens", "7", "--repeat", "2")
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(line) for line in result.stdout.strip().splitlines()]
    assert [r["impl"] for r in rows] == ["static", "graph", "hf"]
    for row in rows:
        assert (row["device"], row["dtype"], row["rows"], row["tokens"]) == ("cpu", "float32", 6, 5)
        assert row["tokens_per_s"] == pytest.approx(6 * 5 / row["median_rollout_s"], rel=1e-3)
        assert row["ms_per_token"] == pytest.approx(1000 * row["median_rollout_s"] / 5, abs=1e-3)
        assert row["vs_bound"] == pytest.approx(row["tokens_per_s"] / row["bound_tokens_per_s"], abs=1e-3)

    result = bench_decode(*args, "--impls", "static,fast")
    assert result.returncode == 2
    assert (
        result.stderr.strip()
        .splitlines()[-1]
        .endswith("error: --impls: fast is not one of graph, packed, static, hf.")
    )
    result = bench_decode(*args, "--tokens", "0")
    assert result.stderr.strip().splitlines()[-1].endswith("error: --tokens = 0: it must be at least 1.")
    if not torch.cuda.is_available():
        result = bench_decode(*args, "--device", "cuda")
        assert result.stderr.strip() == "error: --device cuda, but no CUDA GPU is visible."


def test_reward_model_bench_compares_both_paths(tokenizer, tmp_path):
    from tests.test_reward_model import build_reward_model

    model = build_reward_model(tokenizer, tmp_path / "rm")
    run = [sys.executable, "scripts/bench_reward_model.py", "--model", str(model), "--repeat", "1"]
    result = subprocess.run(
        [*run, "--prompts", "2", "--generations", "3"], cwd=REPO, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr[-3000:]
    row = json.loads(result.stdout.strip().splitlines()[-1])
    assert row["conversations"] == 6 and row["tokens_per_conversation"] > 50
    assert row["max_score_difference"] < 1e-5  # the shared start changes the cost, not the scores
    assert row["speedup"] == pytest.approx(row["padded_s"] / row["shared_start_s"], rel=0.02)
    result = subprocess.run([*run, "--generations", "0"], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].endswith("error: --generations = 0: it must be at least 1.")
