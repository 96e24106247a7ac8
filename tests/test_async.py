"""Asynchronous rollouts (docs/async.md): real runs of scripts/train.py with a real rollout process, its weights
sent over a real gloo group; the staleness schedule, exact resume, the faults, and the decoupled objective."""

import json
import math
import re
import signal

import pytest
import torch

from grpo.config import ConfigError, template_from_dict
from grpo.loss import UpdateScale, rollout_gap
from grpo.loss_choice import resolve_loss
from grpo.off_policy import rollout_correction_weights
from grpo.rollout.engines.rollout_process import DELAY, FAULT
from tests.conftest import VOLATILE, tiny_template, write_template
from tests.test_checkpoint import train, weights


def rows(out, *, volatile=VOLATILE):
    return [
        {k: v for k, v in json.loads(line).items() if not k.startswith(volatile)}
        for line in (out / "metrics.jsonl").read_text().splitlines()
    ]


@pytest.fixture
def template(tiny_model_dir, tmp_path):
    data = tiny_template(
        tiny_model_dir, tmp_path / "unused", max_steps=4, rewards=["tests.user_rewards:length"]
    )
    return write_template(tmp_path / "t.yaml", data)


@pytest.mark.parametrize("level", [1, 2])
def test_a_delayed_engine_keeps_the_staleness_bound_and_the_trainer_waits(template, tmp_path, level):
    out = tmp_path / "out"
    result = train(template, f"output_dir={out}", f"async_level={level}", env_extra={DELAY: "0.6"})
    assert result.returncode == 0, result.stderr[-2000:]
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    # step t trains on the batch drawn by the weights of step max(0, t - k): never older, never newer
    assert [m["async/staleness"] for m in metrics] == [min(t, level) for t in range(4)]
    # the engine sleeps 0.6 s per batch and the tiny model learns in far less: the trainer waits for it
    assert all(m["time/rollout_wait_s"] > 0.3 for m in metrics)
    assert all(m["time/engine_busy_s"] >= 0.6 for m in metrics)
    # the batches drawn by older weights differ from the policy being trained; the first is drawn by its own
    gap = [m["rollout/mismatch_max"] for m in metrics]
    assert gap[0] < 1e-5 and min(gap[1:]) > 1e-3


def test_a_synchronous_rollout_process_trains_exactly_as_the_trainer_alone(template, tmp_path):
    alone, process = tmp_path / "alone", tmp_path / "process"
    assert train(template, f"output_dir={alone}").returncode == 0
    result = train(template, f"output_dir={process}", "rollout_process=true")
    assert result.returncode == 0, result.stderr[-2000:]
    # same seed, same decoder, the weights copied exactly over gloo after every step: the same run
    assert rows(process, volatile=(*VOLATILE, "async/")) == rows(alone)
    assert weights(process) == weights(alone)


def test_a_killed_async_run_resumes_bitwise(template, tmp_path):
    full, killed = tmp_path / "full", tmp_path / "killed"
    common = ["async_level=1", "max_steps=6", "save_steps=3"]
    assert train(template, f"output_dir={full}", *common).returncode == 0
    result = train(
        template, f"output_dir={killed}", *common, env_extra={"GRPO_TEST_KILL_AT": "after_commit_step3"}
    )
    assert result.returncode == -signal.SIGKILL
    saved = torch.load(killed / "checkpoints" / "step-000003" / "rollouts-rank0.pt", weights_only=False)
    assert [d["version"] for d in saved["drawn"]] == [2]  # step 4's batch, drawn by step 2's weights
    result = train(template, f"output_dir={killed}", *common, "resume=latest")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "Resumed from" in result.stdout
    assert rows(killed) == rows(full)
    assert [r["async/staleness"] for r in rows(full)] == [0, 1, 1, 1, 1, 1]
    assert weights(killed) == weights(full)


END = r" while drawing its batch 3; the run stops, and the checkpoints saved so far are kept\."
FAULTS = {  # batch 3 is step 3's, drawn while step 2 trains
    "kill:3": r"The rollout process \(pid \d+\) was killed by SIGKILL" + END,
    "hang:3": r"The rollout process \(pid \d+\) gave no answer in 4 s \(config\.rollout_timeout\) while drawing "
    r"its batch 3; it was killed, the run stops, and the checkpoints saved so far are kept\.",
    "oom:3": r"The rollout process failed while drawing its batch 3: RuntimeError: .*can't allocate memory.*; the "
    r"run stops, and the checkpoints saved so far are kept\.",
}


@pytest.mark.parametrize("fault", FAULTS)
def test_a_rollout_process_that_dies_hangs_or_runs_out_of_memory_stops_the_run_in_one_line(
    template, tmp_path, fault
):
    out = tmp_path / "out"
    overrides = [f"output_dir={out}", "async_level=1", "save_steps=1", "rollout_timeout=4"]
    result = train(template, *overrides, env_extra={FAULT: fault})
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    assert re.fullmatch("error: " + FAULTS[fault], last), last
    # step 1 trained and saved before the fault; step 2 trained, but its checkpoint needs batch 3: not written
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000001"]


@pytest.mark.parametrize(
    "config, message",
    [
        (
            {"async_level": 1, "dynamic_sampling": True},
            "config.async_level = 1 is not allowed: it must be 0 here: dynamic_sampling draws a number of rounds "
            "per step known only once scored.",
        ),
        (
            {"async_level": 2, "tools": ["calculator"]},
            "config.async_level = 2 is not allowed: it must be 0 here: tools and environments run their turns in "
            "the training process.",
        ),
        (
            {"async_level": 1, "rollout_engine": "vllm"},
            "config.async_level = 1 is not allowed: it must be 0 here: a colocated engine shares the trainer's "
            "device and process, so nothing overlaps; use vllm_mode: server or rollout_engine: torch.",
        ),
        (
            {"rollout_process": True, "rollout_engine": "vllm"},
            "config.rollout_process = True is not allowed: the rollout process runs our decoder on our model; use "
            "rollout_engine: torch and backend: torch.",
        ),
        (
            {"async_level": 1, "distributed_strategy": "fsdp"},
            "config.rollout_process = True is not allowed: it takes each rank's full weights, and FSDP holds "
            "shards; use distributed_strategy: ddp.",
        ),
        (
            {"rollout_cpus": [1]},
            "config.rollout_cpus = [1] is not allowed: it sets up the rollout process, which is off; set "
            "async_level >= 1 or rollout_process: true.",
        ),
        (
            {"async_level": -1},
            "config.async_level = -1 is not allowed: it must be 0 or more.",
        ),
        (
            {"rollout_process": True, "rollout_cpus": [0, -2]},
            "config.rollout_cpus = [0, -2] is not allowed: it must list CPU numbers (0 or more).",
        ),
    ],
)
def test_async_settings_that_cannot_run_are_refused_in_one_sentence(config, message):
    with pytest.raises(ConfigError) as e:
        template_from_dict({"config": config})
    assert str(e.value) == message


def test_the_loss_is_the_decoupled_objective_of_three_policies():
    """pi (being trained), pi_prox (the old log-probs recomputed before the update) and pi_behav (the engine's,
    k steps older): the ratio is clipped against pi_prox, and the behaviour gap weights each token through the
    rollout correction, min(pi_prox / pi_behav, clip_max) (AReaL's decoupled PPO)."""
    c = template_from_dict(
        {
            "config": {
                "loss_type": "bnpo",
                "vllm_importance_sampling_correction": True,
                "vllm_importance_sampling_mode": "token_truncate",
                "vllm_importance_sampling_clip_max": 2.0,
            }
        }
    ).config
    pi = [[0.5, 0.2, 0.9], [0.3, 0.6, 0.1]]
    prox = [[0.4, 0.25, 0.9], [0.3, 0.5, 0.5]]
    behav = [[0.2, 0.25, 0.3], [0.6, 0.5, 0.5]]
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    advantages = [1.0, -1.0]
    expected, tokens = 0.0, 0
    for i in range(2):
        for t in range(3):
            if not mask[i, t]:
                continue
            ratio, weight = pi[i][t] / prox[i][t], min(prox[i][t] / behav[i][t], 2.0)
            clipped = min(max(ratio, 0.8), 1.2)
            expected -= weight * min(ratio * advantages[i], clipped * advantages[i])
            tokens += 1
    expected /= tokens
    logps, old, behaviour = (torch.tensor(p, dtype=torch.float64).log() for p in (pi, prox, behav))
    weights, _ = rollout_correction_weights(
        rollout_gap(old, behaviour, mask), mask, mode="token_truncate", high=2.0
    )
    scale = UpdateScale("batch_token_mean", 2, mask.sum(), mask.sum(), 1, c.maximum_completion_length)
    loss, _ = resolve_loss(c).terms(
        logps,
        old,
        None,
        torch.tensor(advantages, dtype=torch.float64),
        mask,
        scale,
        {"token_weights": weights},
    )
    assert loss.item() == pytest.approx(expected, rel=1e-12)
    assert not math.isclose(expected, -sum(advantages) / 2)  # the case clips and weights some tokens
