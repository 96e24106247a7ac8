"""scripts/bench.py end to end on a tiny model: our trainer and TRL's GRPOTrainer on the same forced-length work."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO


def bench(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "scripts/bench.py", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )


def broken_trl(tmp_path: Path) -> dict[str, str]:
    """An environment in which `import trl` fails, as it may where TRL is installed but its datasets or
    pyarrow do not import: a trl package that raises, ahead of the installed one on PYTHONPATH."""
    site = tmp_path / "broken-site"
    (site / "trl").mkdir(parents=True)
    (site / "trl" / "__init__.py").write_text('raise ImportError("this trl does not import")\n')
    return {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")])),
    }


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
        check_rollout_bound(row, ours)


def check_rollout_bound(row: dict, ours: dict, prompts: int = 1, generations: int = 4) -> None:
    """The bound with the KV cache read is below the weights-only one, by the byte counts the row reports."""
    assert row["rollout_bound_tokens_per_s"] == ours["rollout_bound_tokens_per_s"] > 0
    assert row["rollout_vs_bound"] == round(
        row["rollout_tokens_per_s"] / row["rollout_bound_tokens_per_s"], 3
    )
    weights_only = row["rollout_bound_weights_only_tokens_per_s"]
    assert row["rollout_vs_weights_only_bound"] == round(row["rollout_tokens_per_s"] / weights_only, 3)
    b = row["rollout_bound_bytes"]
    rows = prompts * generations
    # Each row of the tiny model (fp32, 2 layers, 2 KV heads of 8) reads 2 x 2 x 2 x 8 x 4 = 256 bytes per token.
    assert b["kv_cache_per_step"] == pytest.approx(rows * b["mean_context_tokens"] * 256, rel=1e-3)
    ratio = (b["weights"] + b["kv_cache_per_step"]) / b["weights"]
    assert weights_only / row["rollout_bound_tokens_per_s"] == pytest.approx(ratio, rel=1e-4)


def test_ours_alone_and_bad_arguments(tiny_model_dir):
    result = bench("cpu", "--systems", "ours", "--steps", "2", "--model", str(tiny_model_dir))
    assert result.returncode == 0, result.stderr[-3000:]
    (row,) = [json.loads(line) for line in result.stdout.strip().splitlines()]
    assert row["system"] == "ours" and row["measured_steps"] == 1
    assert 0 < row["completion_tokens_per_step"] <= 256 and "step_time_vs_trl" not in row
    check_rollout_bound(row, row)
    assert row["rollout_bound_bytes"]["mean_context_tokens"] > 64  # GSM8K prompts with the system prompt

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
        # tokens_per_s is printed to 0.1: at the few tokens/s of a loaded CPU that is more than rel=1e-3
        assert row["tokens_per_s"] == pytest.approx(6 * 5 / row["median_rollout_s"], rel=1e-3, abs=0.05)
        assert row["ms_per_token"] == pytest.approx(1000 * row["median_rollout_s"] / 5, abs=1e-3)
        assert row["vs_bound"] == pytest.approx(row["tokens_per_s"] / row["bound_tokens_per_s"], abs=1e-3)
        weights_only = row["bound_weights_only_tokens_per_s"]
        assert row["vs_weights_only_bound"] == pytest.approx(row["tokens_per_s"] / weights_only, abs=1e-3)
        # 6 rows x (7 prompt tokens + 5 / 2) x 256 KV bytes per token (fp32, 2 layers, 2 KV heads of 8)
        assert row["kv_cache_bytes_per_step"] == 6 * 9.5 * 256
        ratio = (row["weight_bytes"] + 6 * 9.5 * 256) / row["weight_bytes"]
        assert weights_only / row["bound_tokens_per_s"] == pytest.approx(ratio, rel=1e-4)

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
    # speedup is rounded to 2 decimals: abs covers that when a busy machine makes it small.
    assert row["speedup"] == pytest.approx(row["padded_s"] / row["shared_start_s"], rel=0.02, abs=0.005)
    result = subprocess.run([*run, "--generations", "0"], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].endswith("error: --generations = 0: it must be at least 1.")


def test_kv_cache_bytes_and_the_decode_bound_exactly():
    from transformers import LlamaConfig, Qwen3Config

    from scripts.bench_systems import decode_bound, kv_cache_bytes_per_token, mean_decode_context

    # Grouped-query attention: 8 query heads share 2 KV heads; head_dim = hidden / heads = 64 / 8 = 8.
    llama = LlamaConfig(hidden_size=64, num_attention_heads=8, num_key_value_heads=2, num_hidden_layers=3)
    assert kv_cache_bytes_per_token(llama, 2) == 2 * 3 * 2 * 8 * 2 == 192  # keys and values, bf16
    assert kv_cache_bytes_per_token(llama, 4) == 384  # fp32
    # An explicit head_dim wins over hidden / heads (Qwen3: 16 here, not 64 / 8).
    qwen3 = Qwen3Config(
        hidden_size=64, num_attention_heads=8, num_key_value_heads=4, num_hidden_layers=2, head_dim=16
    )
    assert kv_cache_bytes_per_token(qwen3, 2) == 2 * 2 * 4 * 16 * 2 == 512
    # No head_dim and no KV head count: every query head has its own keys and values, head_dim = 96 / 6.
    plain = types.SimpleNamespace(hidden_size=96, num_attention_heads=6, num_hidden_layers=2)
    assert kv_cache_bytes_per_token(plain, 2) == 2 * 2 * 6 * 16 * 2 == 768
    # SmolLM2-135M in bf16 (30 layers, 3 KV heads of 64): 23,040 bytes per token and row, so 128 rows at a mean
    # context of 380 read 1.12 GB of cache per decode step, four times its 0.27 GB of weights.
    smollm2 = LlamaConfig(hidden_size=576, num_attention_heads=9, num_key_value_heads=3, num_hidden_layers=30)
    assert kv_cache_bytes_per_token(smollm2, 2) == 23_040

    # The prefill gives the first of 64 tokens; decode steps 1..63 read 100 + k tokens: a mean of 132.
    assert mean_decode_context(100, 64) == sum(100 + k for k in range(1, 64)) / 63 == 132.0
    bound = decode_bound(4, 1e9, 1000, 192, 10.5)
    assert bound["kv_bytes_per_step"] == 4 * 10.5 * 192 == 8064
    assert bound["tokens_per_s"] == 4e9 / (1000 + 8064)
    assert bound["weights_only_tokens_per_s"] == 4e9 / 1000
    assert bound["weight_bytes"] == 1000


def test_auto_runs_trl_only_where_it_imports(tmp_path, monkeypatch):
    from scripts.bench import pick_systems, trl_importable

    pytest.importorskip("trl", reason="needs pip install -e '.[bench]'")
    pytest.importorskip("datasets", reason="needs pip install -e '.[bench]'")
    assert trl_importable() == (True, "exit 0")
    assert pick_systems("auto") == ["ours", "trl"]
    monkeypatch.setenv("PYTHONPATH", broken_trl(tmp_path)["PYTHONPATH"])  # the probe's interpreter gets it
    assert trl_importable() == (False, "ImportError: this trl does not import")
    assert pick_systems("auto") == ["ours"]


def test_a_failed_system_keeps_the_other_systems_rows(tiny_model_dir, tmp_path):
    """TRL installed but failing: our runs still give their row (stdout and --out), one error line names TRL,
    its failed run is not repeated, and the exit status is 1."""
    pytest.importorskip("trl", reason="the explicit --systems trl needs it installed")
    out = tmp_path / "bench.jsonl"
    args = ("cpu", "--systems", "ours,trl", "--repeats", "2", "--steps", "2", "--model", str(tiny_model_dir))
    result = bench(*args, "--out", str(out), env=broken_trl(tmp_path))
    assert result.returncode == 1, result.stderr[-3000:]
    rows = [json.loads(line) for line in result.stdout.strip().splitlines()]
    assert [r["system"] for r in rows] == ["ours"] and rows[0]["measured_steps"] == 2  # both of ours' runs
    assert "step_time_vs_trl" not in rows[0] and rows[0]["rollout_bound_tokens_per_s"] > 0
    assert out.read_text().splitlines() == result.stdout.strip().splitlines()
    log = result.stderr.strip().splitlines()
    assert [line for line in log if line.startswith("[bench]")] == [
        "[bench] cpu: ours run 1/2 ...",
        "[bench] cpu: trl run 1/2 ...",
        "[bench] cpu: ours run 2/2 ...",
    ]
    assert "--- the trl run's stderr, last 4000 characters ---" in log
    assert "Traceback (most recent call last):" in log
    assert log[-1] == (
        "error: the trl benchmark run failed (exit 1), so it has no result row; "
        "its stderr ends: ImportError: this trl does not import"
    )


def test_kernel_bench_prints_each_vocabulary_when_it_is_done(tmp_path):
    """Stopped during the second vocabulary (as a time limit would), the first one's table is already out."""
    cmd = [sys.executable, "scripts/bench_kernels.py", "--rows", "64", "--hidden", "16", "--repeat", "1"]
    proc = subprocess.Popen(
        [*cmd, "--vocab", "300", "400"],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        start_new_session=True,  # its own process group: stopping it stops its children too
    )
    try:
        lines = [proc.stdout.readline() for _ in range(5)]  # the header and V=300's naive and chunked rows
        running = proc.poll() is None  # V=400's children take seconds to start: it has not finished
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=60)
        proc.stdout.close()
    assert running, "the bench finished before the test could stop it"
    assert lines[0].startswith("# ") and "N=64, H=16, 1 rounds" in lines[0]
    assert lines[1].startswith("| V | impl |") and lines[2].startswith("|---:|")
    assert [line.split(" | ")[:2] for line in lines[3:]] == [["| 300", "naive"], ["| 300", "chunked"]]
