"""End to end: a real tiny model trained from a template, with every output read back."""

import json
import subprocess
import sys

import pytest
import torch
import yaml
from safetensors.torch import load_file

from grpo.config import ConfigError, load_template, template_from_dict
from grpo.model.loading import enable_checkpointing
from grpo.run.logger import peak_memory_bytes
from grpo.trainer import GRPOTrainer
from tests.conftest import GSM8K, REPO, VOLATILE, tiny_template, write_template


def run(data):
    trainer = GRPOTrainer(template_from_dict(data))
    return trainer, trainer.train()


def read_metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_run_writes_a_loadable_model_and_every_log(tiny_model_dir, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "run"
    _, model_dir = run(tiny_template(tiny_model_dir, out, max_steps=3, logging_steps=2))
    assert model_dir == out / "model"
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    tok = AutoTokenizer.from_pretrained(model_dir)
    generated = model.generate(**tok("Hello", return_tensors="pt"), max_new_tokens=3, do_sample=False)
    assert generated.shape[1] == len(tok("Hello")["input_ids"]) + 3
    assert not any(p.name.endswith((".tmp", ".old")) for p in out.iterdir())

    rows = read_metrics(out)
    assert [r["step"] for r in rows] == [1, 2, 3]
    for key in (
        "reward/correctness",
        "reward/tag_count",
        "reward/total_mean",
        "reward/total_std",
        "reward/zero_spread_groups",
        "loss",
        "kl",
        "clip_ratio_low",
        "clip_ratio_high",
        "grad_norm",
        "completion/length_mean",
        "completion/length_max",
        "completion/truncated_share",
        "learning_rate",
        "tokens_per_s",
        "time/step_s",
        "prompt/truncated",
    ):
        assert key in rows[0], key
    assert rows[0]["learning_rate"] == pytest.approx(1e-3)
    assert 1 <= rows[0]["completion/length_mean"] <= 8
    # This process's peak resident set so far: it never falls, and no step reports more than the peak now.
    peaks = [r["memory/peak_rss_gb"] for r in rows]
    assert peaks == sorted(peaks) and 0.1 < peaks[0]
    assert (
        peaks[-1] <= peak_memory_bytes(torch.device("cpu")) / 1e9
        and "memory/peak_allocated_gb" not in rows[0]
    )

    summary = json.loads(
        subprocess.run(
            [sys.executable, "scripts/run_summary.py", str(out)], cwd=REPO, capture_output=True, text=True
        ).stdout
    )
    step_times = sorted(r["time/step_s"] for r in rows[1:])  # the first step is left out
    assert summary == {
        "run": str(out),
        "steps": 3,
        "median_step_s": round((step_times[0] + step_times[1]) / 2, 3),
        "median_rollout_s": round((rows[1]["time/rollout_s"] + rows[2]["time/rollout_s"]) / 2, 3),
        "reward_first": round(rows[0]["reward/total_mean"], 4),
        "reward_last": round(rows[2]["reward/total_mean"], 4),
        "entropy_first": round(rows[0]["entropy"], 4),
        "entropy_last": round(rows[2]["entropy"], 4),
        "mismatch_kl_max": max(r["rollout/mismatch_kl"] for r in rows),
        "mismatch_logp_gap_max": max(r["rollout/mismatch_max"] for r in rows),
        "peak_memory_gb": round(peaks[-1], 3),
        "memory_kind": "peak_rss",
    }
    missing = subprocess.run(
        [sys.executable, "scripts/run_summary.py", str(out), str(out / "model")],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert missing.returncode == 2 and missing.stdout == ""
    assert missing.stderr.strip() == (
        f"error: {out / 'model' / 'metrics.jsonl'} not found: pass a run folder (a template's config.output_dir)."
    )

    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    scalars = events.Scalars("reward/total_mean")
    assert [e.step for e in scalars] == [1, 2, 3]
    assert [e.value for e in scalars] == pytest.approx([r["reward/total_mean"] for r in rows])

    samples = [json.loads(s) for s in (out / "samples.jsonl").read_text().splitlines()]
    assert {s["step"] for s in samples} == {2} and len(samples) == 2  # one per prompt, every 2nd step
    assert set(samples[0]) == {"step", "prompt", "completion", "reference", "reward", "rewards"}
    resolved = template_from_dict(yaml.safe_load((out / "template.yaml").read_text()))
    assert resolved.config.max_steps == 3 and resolved.model == str(tiny_model_dir)


def test_same_seed_same_run(tiny_model_dir, tmp_path):
    runs = []
    for name in ("a", "b"):
        trainer, _ = run(tiny_template(tiny_model_dir, tmp_path / name, max_steps=2))
        metrics = [
            {k: v for k, v in r.items() if not k.startswith(VOLATILE)} for r in read_metrics(tmp_path / name)
        ]
        runs.append((metrics, {k: v.clone() for k, v in trainer.model.state_dict().items()}))
    assert runs[0][0] == runs[1][0]
    assert all(torch.equal(runs[0][1][k], runs[1][1][k]) for k in runs[0][1])


def test_training_changes_weights_and_micro_batches_agree(tiny_model_dir, tmp_path):
    """One update on the same samples: micro-batches of 1 (shared prefix split across groups) and gradient
    checkpointing (concatenated pass, layers recomputed) give the full batch's weights (fp32 tolerance)."""
    results = []
    for mb, checkpointing in ((0, False), (1, False), (0, True)):
        data = tiny_template(
            tiny_model_dir,
            tmp_path / f"m{mb}{checkpointing}",
            micro_batch_size=mb,
            gradient_checkpointing=checkpointing,
            loss_type="dapo",
            beta=0.1,
            rewards=["tests.user_rewards:length"],
        )  # random completions differ in length
        trainer = GRPOTrainer(template_from_dict(data))
        model = trainer.model  # transformers >= 5.2x renamed is_gradient_checkpointing
        flag = "is_activation_checkpointing" if hasattr(type(model), "is_activation_checkpointing") else None
        assert getattr(model, flag or "is_gradient_checkpointing") == checkpointing
        if checkpointing:  # recomputation is on: only layer inputs are kept for backward, no MLP products
            assert saved_tensor_bytes(trainer) < saved_tensor_bytes(trainer, checkpointing=False) / 3
        assert trainer.updates.shared_prefix == (not checkpointing)
        before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
        metrics, _ = trainer.train_step()
        assert metrics["reward/zero_spread_groups"] < 1.0
        results.append(trainer.model.state_dict())
        changed = [k for k in before if not torch.equal(before[k], results[-1][k])]
        assert len(changed) == len(before), "every weight should move"
    for other in results[1:]:
        for k in results[0]:
            torch.testing.assert_close(results[0][k], other[k], rtol=1e-4, atol=1e-6)


def saved_tensor_bytes(trainer: GRPOTrainer, *, checkpointing: bool = True) -> int:
    """Activation bytes (weights left out) that autograd keeps for backward after one policy forward."""
    storages: dict[int, int] = {}
    weights = {p.untyped_storage().data_ptr() for p in trainer.model.parameters()}

    def keep(t: torch.Tensor) -> torch.Tensor:
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    if not checkpointing:
        model = trainer.model  # transformers >= 5.2x renamed gradient_checkpointing_disable
        getattr(model, "activation_checkpointing_disable", model.gradient_checkpointing_disable)()
    rng = trainer.generator.get_state()
    ro = trainer.sampling.rollout(list(range(trainer.config.batch_size)), version=0)
    trainer.generator.set_state(rng)  # the step that follows samples as if this never ran
    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
        trainer.policy(*trainer.updates.logprob_inputs(ro, slice(0, ro.completion_ids.shape[0])))
    if not checkpointing:
        enable_checkpointing(trainer.model)
    return sum(size for ptr, size in storages.items() if ptr not in weights)


@pytest.mark.parametrize(
    "extra",
    [
        {"loss_type": "bnpo", "num_iterations": 2, "beta": 0.04},
        {"loss_type": "dr_grpo", "importance_sampling_level": "sequence", "scale_rewards": "batch"},
        {
            "mask_truncated_completions": True,
            "learning_rate_schedule": "cosine",
            "warmup_ratio": 0.5,
            "top_p": 0.9,
        },
    ],
)
def test_variants_run(tiny_model_dir, tmp_path, extra):
    _, model_dir = run(tiny_template(tiny_model_dir, tmp_path / "v", max_steps=2, **extra))
    rows = read_metrics(tmp_path / "v")
    assert len(rows) == 2 and all(torch.isfinite(torch.tensor(r["loss"])) for r in rows)
    if extra.get("beta"):
        assert rows[0]["kl"] == 0.0  # the first update starts at the reference model
    assert all(r["entropy"] > 0 for r in rows)
    assert (model_dir / "model.safetensors").is_file()


def test_research_add_ons_together(tiny_model_dir, tmp_path):
    extra = {
        "loss_type": "cispo",
        "num_iterations": 2,
        "mini_batches": 2,
        "beta": 0.04,
        "micro_batch_size": 3,
        "top_entropy_quantile": 0.5,
        "dynamic_sampling": True,
        "rewards": ["tests.user_rewards:length", {"name": "overlong_penalty", "buffer": 4}],
    }
    run(tiny_template(tiny_model_dir, tmp_path / "r", **extra))
    rows = read_metrics(tmp_path / "r")
    assert len(rows) == 2 and all(torch.isfinite(torch.tensor(r["loss"])) for r in rows)
    assert all(r["entropy"] > 0 and r["entropy_threshold"] > 0 for r in rows)
    assert all(r["dynamic_sampling/rounds"] == 1 for r in rows)  # lengths differ: every group informative
    assert all(-1.0 <= r["reward/overlong_penalty"] <= 0.0 for r in rows)
    assert (
        rows[0]["kl"] > 0
    )  # logged by the second update, after the first moved the policy off the reference


def test_gsm8k_seed_template_runs(tiny_model_dir, tmp_path):
    t = load_template(
        REPO / "configs" / "gsm8k.yaml",
        [
            f"dataset.path={GSM8K / 'train.jsonl'}",
            "limit=8",
            f"model={tiny_model_dir}",
            "max_steps=1",
            "batch_size=2",
            "num_generations=2",
            "maximum_completion_length=8",
            "train_device=cpu",
            f"output_dir={tmp_path / 'g'}",
        ],
    )
    GRPOTrainer(t).train()
    samples = [json.loads(s) for s in (tmp_path / "g" / "samples.jsonl").read_text().splitlines()]
    assert samples[0]["reference"].lstrip("-").isdigit()


def test_wandb_offline_and_a_resumed_run_continues_it(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    out = tmp_path / "w"
    run(tiny_template(tiny_model_dir, out, max_steps=2, save_steps=1, log_to_wandb=True))
    runs = list((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb"))
    run_id = (out / "wandb_run_id").read_text().strip()
    assert runs[0].name.endswith("-" + run_id)
    run(
        tiny_template(
            tiny_model_dir, out, max_steps=3, save_steps=1, log_to_wandb=True, resume_from_checkpoint="latest"
        )
    )
    runs = sorted((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and all(r.name.endswith("-" + run_id) for r in runs)  # one W&B run, two sessions
    other = tmp_path / "other"
    run(tiny_template(tiny_model_dir, other, max_steps=1, log_to_wandb=True))
    assert (other / "wandb_run_id").read_text().strip() != run_id


def cli(*args, cwd=REPO, env=None):
    return subprocess.run(
        [sys.executable, "scripts/train.py", *map(str, args)],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            ["max_step=2"],
            "error: Unknown field 'max_step' in override 'max_step=2' (did you mean 'config.max_steps'?).",
        ),
        (["learning_rate=fast"], "error: config.learning_rate = 'fast' is not allowed: expected a number."),
        (["model=/no/model"], "error: model = '/no/model': no such file or folder."),
        (
            ["input={{problem}}"],
            "error: template.input uses {{problem}}, which the dataset lacks; its columns are: "
            "question, answer.",
        ),
        (
            ["rewards=[nope]"],
            "error: config.rewards[0] = 'nope' is not a built-in reward; use one of correctness, "
            "int_answer, strict_format, soft_format, tag_count, answer_mentioned, final_answer, tool_used, tool_answer, overlong_penalty, reward_model or "
            "package.module:function.",
        ),
        (
            ["loss_type=ppo"],
            "error: config.loss_type = 'ppo' is not allowed: use one of grpo, bnpo, dr_grpo, dapo, cispo, sapo, luspo, "
            "vespo or "
            "package.module:function.",
        ),
        (["train_device=tpu"], "error: config.train_device = 'tpu' is not supported: use cuda, cpu or auto."),
    ],
)
def test_cli_user_errors_are_one_line(tiny_model_dir, tmp_path, overrides, message):
    path = write_template(tmp_path / "t.yaml", tiny_template(tiny_model_dir, tmp_path / "out"))
    result = cli(path, *overrides)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == message
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "out" / "model").exists()


def test_cli_missing_and_bad_files(tmp_path):
    result = cli(tmp_path / "none.yaml")
    assert (
        result.returncode == 2
        and result.stderr.strip() == f"error: Template file '{tmp_path / 'none.yaml'}' does not exist."
    )
    bad = tmp_path / "bad.yaml"
    bad.write_text("config: {max_steps: 2\n")
    result = cli(bad)
    assert (
        result.returncode == 2
        and "is not valid YAML at line" in result.stderr
        and "Traceback" not in result.stderr
    )


def test_cli_failing_reward_names_function_and_completion(tiny_model_dir, tmp_path):
    path = write_template(
        tmp_path / "t.yaml",
        tiny_template(tiny_model_dir, tmp_path / "out", rewards=["tests.user_rewards:wrong_length"]),
    )
    result = cli(path)
    assert result.returncode == 1
    assert (
        "error: Reward function 'tests.user_rewards:wrong_length' raised ValueError: returned 1 values for "
        "4 completions" in result.stderr
    )
    assert "Traceback" not in result.stderr


def test_cli_unreachable_hub_model(tiny_model_dir, tmp_path):
    import os

    path = write_template(tmp_path / "t.yaml", tiny_template(tiny_model_dir, tmp_path / "out"))
    result = cli(path, "model=someone/no-such-model", env={**os.environ, "HF_HUB_OFFLINE": "1"})
    last = result.stderr.strip().splitlines()[-1]
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert last.startswith(
        "error: model = 'someone/no-such-model' is neither a local folder nor reachable on the "
        "Hugging Face hub ("
    )
    assert last.endswith("use a local folder, a .gguf file, or embedded:smollm2-135m-instruct.")


def test_sampling_filters_reach_the_rollout(tiny_model_dir, tmp_path):
    """top_k = 1 leaves one token to draw: every prompt's G samples agree, so every group has zero spread."""
    out = tmp_path / "run"
    common = {"num_generations": 3, "temperature": 2.0, "rewards": ["tests.user_rewards:length"]}
    run(tiny_template(tiny_model_dir, out, top_k=1, **common))
    assert [r["reward/zero_spread_groups"] for r in read_metrics(out)] == [1.0, 1.0]
    out = tmp_path / "loose"  # the text lengths differ without the filter
    run(tiny_template(tiny_model_dir, out, **common))
    assert [r["reward/zero_spread_groups"] for r in read_metrics(out)] == [0.0, 0.0]


def test_rollout_mismatch_is_measured_and_corrected(tiny_model_dir, tmp_path):
    """The decode path and the training forward compute the same fp32 policy: their per-token gap is tiny. With
    rollout_is_cap the loss gets min(exp(gap), cap) per token, here all within 1e-4 of 1."""
    from tests import user_losses

    common = {
        "rewards": ["tests.user_rewards:length"],
        "loss_type": "tests.user_losses:records_token_weights",
    }
    user_losses.seen_weights.clear()
    run(tiny_template(tiny_model_dir, tmp_path / "plain", **common))
    assert user_losses.seen_weights == [None, None]  # off: the loss is not handed weights
    rows = read_metrics(tmp_path / "plain")
    for r in rows:
        assert 0 <= r["rollout/mismatch_kl"] < 1e-9 and 0 < r["rollout/mismatch_max"] < 1e-4
    run(tiny_template(tiny_model_dir, tmp_path / "tis", rollout_is_cap=2.0, **common))
    assert len(user_losses.seen_weights) == 4
    for weights in user_losses.seen_weights[2:]:
        assert weights.shape == (4, 8) and (weights - 1).abs().max() < 1e-4 and not weights.requires_grad
    tis = read_metrics(tmp_path / "tis")
    assert tis[0]["rollout/mismatch_kl"] == rows[0]["rollout/mismatch_kl"]  # same samples, same model
    # weights within 1e-4 of 1 move the update by about as little
    plain, corrected = (
        load_file(str(tmp_path / d / "model" / "model.safetensors")) for d in ("plain", "tis")
    )
    assert max((plain[k] - corrected[k]).abs().max().item() for k in plain) < 1e-6


def test_kl_estimator_reaches_the_loss(tiny_model_dir, tmp_path):
    """Step 1: policy == reference, both estimators give 0. Step 2: both ~ delta^2 / 2, but not equal."""
    common = {"beta": 0.1, "rewards": ["tests.user_rewards:length"]}
    kl = {}
    for name in ("k3", "k2"):
        run(tiny_template(tiny_model_dir, tmp_path / name, kl_estimator=name, **common))
        kl[name] = [r["kl"] for r in read_metrics(tmp_path / name)]
    assert kl["k3"][0] == kl["k2"][0] == 0.0
    assert kl["k3"][1] > 0 and kl["k2"][1] > 0 and kl["k3"][1] != kl["k2"][1]
    assert kl["k2"][1] == pytest.approx(kl["k3"][1], rel=0.05)


def test_num_iterations_takes_old_log_probs_from_the_first_update(tiny_model_dir, tmp_path):
    """The first update's forward is the sampling policy's: its log-probs replace the separate no-grad pass,
    with the same result. Dropout makes that forward random, so then the separate pass runs."""
    common = {"num_iterations": 2, "beta": 0.1, "rewards": ["tests.user_rewards:length"]}
    weights, passes = {}, {}
    for reuse in (True, False):
        trainer = GRPOTrainer(
            template_from_dict(tiny_template(tiny_model_dir, tmp_path / str(reuse), **common))
        )
        assert trainer.updates.old_from_first_update
        trainer.updates.old_from_first_update = reuse
        passes[reuse] = calls = []

        def counted(
            module, ro, frozen=trainer.updates.frozen_logprobs, calls=calls
        ):  # the real pass, counted
            calls.append(module)
            return frozen(module, ro)

        trainer.updates.frozen_logprobs = counted
        trainer.train()
        weights[reuse] = {k: v.clone() for k, v in trainer.model.state_dict().items()}
        assert [m is trainer.ref for m in passes[reuse]] == ([True, True] if reuse else [True, False] * 2)
    for k in weights[True]:
        torch.testing.assert_close(weights[True][k], weights[False][k], rtol=0, atol=1e-7)
    lora = {"use_lora": True, "num_iterations": 2}
    assert not GRPOTrainer(
        template_from_dict(tiny_template(tiny_model_dir, tmp_path / "d", **lora))
    ).updates.old_from_first_update
    plain = tiny_template(tiny_model_dir, tmp_path / "n", lora_dropout=0.0, **lora)
    assert GRPOTrainer(template_from_dict(plain)).updates.old_from_first_update


def test_loss_options_are_passed_only_when_set(tiny_model_dir, tmp_path):
    """User losses written for the base signature keep working: the optional keywords appear only when set."""
    from tests import user_losses

    common = {"beta": 0.1, "loss_type": "tests.user_losses:records_token_weights"}
    user_losses.seen_options.clear()
    run(tiny_template(tiny_model_dir, tmp_path / "plain", **common))
    assert user_losses.seen_options == [{}, {}]
    user_losses.seen_options.clear()
    run(tiny_template(tiny_model_dir, tmp_path / "set", kl_estimator="k2", delta=1.5, **common))
    assert user_losses.seen_options == [{"kl_estimator": "k2", "delta": 1.5}] * 2


def test_long_prompts_drop_is_logged(tiny_model_dir, tmp_path, capsys):
    """The built-in prompts run 51-67 tokens with the chat template: a 62-token limit drops about half."""
    data = tiny_template(
        tiny_model_dir, tmp_path / "run", max_steps=1, maximum_sequence_length=70, long_prompts="drop"
    )
    trainer, _ = run(data)
    assert all(not p.truncated and len(p.ids) <= 62 for p in trainer.prompts)
    kept, dropped = len(trainer.prompts), trainer.dropped_prompts
    assert kept > 0 and dropped > 0 and kept + dropped == 64
    assert (
        f"Dropped {dropped} of 64 prompts longer than 62 tokens (long_prompts: drop)"
        in capsys.readouterr().out
    )


def completion_log_softmax(model, ro, rows):
    """The plain recipe: HF forward over prompt + completion, full fp32 log_softmax at the completion positions."""
    ids = torch.cat([ro.prompt_ids, ro.completion_ids], 1)[rows]
    attention = torch.cat([ro.prompt_mask, torch.ones_like(ro.completion_ids)], 1)[rows]
    positions = (attention.cumsum(-1) - 1).clamp(min=0)
    logits = model(input_ids=ids, attention_mask=attention, position_ids=positions).logits
    return logits[:, ro.prompt_ids.shape[1] - 1 : -1].float().log_softmax(-1)  # [B, T, V]


def test_mini_batches_make_one_update_per_mini_batch(tiny_model_dir, tmp_path):
    """mini_batches=2: the step's 4 prompts split into 2 halves of whole groups, one AdamW update each; the
    second half is scored against the sampling policy (a no-grad pass over it before the updates). Checked against
    the recipe written out plainly: HF forward, log_softmax, policy_loss, torch's AdamW."""
    import copy

    from grpo.advantages import group_advantages
    from grpo.loss import policy_loss
    from tests.dist_step import fixed_rollout
    from tests.user_rewards import length

    data = tiny_template(
        tiny_model_dir,
        tmp_path / "mb",
        batch_size=4,
        mini_batches=2,
        beta=0.1,
        # Adam's step is lr * g / (|g| + eps): with eps 1 it is proportional to the gradient, so float noise in
        # a near-zero gradient element stays noise (with eps 1e-8 it can become a step of lr either way)
        learning_rate=0.5,
        adam_epsilon=1.0,
        max_grad_norm=0.0,
        rewards=["tests.user_rewards:length"],
    )
    trainer = GRPOTrainer(template_from_dict(data))
    model, reference = copy.deepcopy(trainer.model), copy.deepcopy(trainer.model)
    seen, passes = [], []

    def rollout(batch):
        seen.append(fixed_rollout(trainer, batch))
        return seen[-1]

    def counted(module, ro, frozen=trainer.updates.frozen_logprobs):
        passes.append((module is trainer.ref, ro.completion_ids.shape[0]))
        return frozen(module, ro)

    trainer.sampling.rollout = lambda batch, version: rollout(batch)[0]
    trainer.updates.frozen_logprobs = counted
    metrics, _ = trainer.train_step()
    # the reference, then the old policy for the second half only: the first update's forward gives the first's
    assert passes == [(True, 8), (False, 4)]
    assert trainer.optimizer.state_dict()["state"][0]["step"] == 2  # two updates from one rollout

    ro, texts, *_ = seen[0]
    g = trainer.config.num_generations

    def logps(m, rows):
        log_probs = completion_log_softmax(m, ro, rows)
        return log_probs.gather(-1, ro.completion_ids[rows].unsqueeze(-1)).squeeze(-1)

    everything = slice(0, len(ro.completion_ids))
    with torch.no_grad():
        old, ref = logps(model, everything), logps(reference, everything)
    advantages = group_advantages(torch.tensor(length(texts, None)), g)
    opt = torch.optim.AdamW(model.parameters(), lr=0.5, betas=(0.9, 0.99), eps=1.0, weight_decay=0.0)
    losses, kls = [], []
    for rows in (slice(0, 2 * g), slice(2 * g, 4 * g)):
        loss, stats = policy_loss(
            logps(model, rows), old[rows], ref[rows], advantages[rows], ro.completion_mask[rows], beta=0.1
        )
        losses.append(float(loss.detach()))
        kls.append(float(stats["kl"]))
        opt.zero_grad()
        loss.backward()
        opt.step()
    expected, got = model.state_dict(), trainer.model.state_dict()
    start = reference.state_dict()
    assert max(float((expected[k] - start[k]).abs().max()) for k in start) > 1e-3  # a real step
    for k in expected:
        torch.testing.assert_close(got[k], expected[k], rtol=1e-5, atol=1e-6)
    # the step reports the mean over its updates; the first starts at the reference, the second does not
    assert kls[0] == 0.0 and kls[1] > 1e-6
    assert metrics["kl"] == pytest.approx(sum(kls) / 2, rel=1e-4)
    assert metrics["loss"] == pytest.approx(sum(losses) / 2, rel=1e-4, abs=1e-7)
    # LoRA dropout makes the first update's forward random: then the pass covers every mini-batch
    lora = GRPOTrainer(template_from_dict({**data, "config": {**data["config"], "use_lora": True}}))
    rows = []
    lora.updates.frozen_logprobs = lambda module, ro: rows.append(len(ro.completion_ids)) or ro.sampling_logps
    olds = lora.updates.old_logprobs(ro, [slice(0, 2 * g), slice(2 * g, 4 * g)])
    assert not olds.from_first_forward and rows == [4 * g]
    assert [o.tolist() for o in olds.values] == [
        ro.sampling_logps[: 2 * g].tolist(),
        ro.sampling_logps[2 * g :].tolist(),
    ]


def test_mini_batches_must_divide_the_batch(tiny_model_dir, tmp_path):
    with pytest.raises(
        ConfigError,
        match=r"^config.mini_batches = 3 is not allowed: it must divide batch_size \(4\): each mini-batch "
        r"takes whole prompts, the same number on every process.$",
    ):
        template_from_dict(tiny_template(tiny_model_dir, tmp_path, batch_size=4, mini_batches=3))
    with pytest.raises(
        ConfigError, match=r"^config.mini_batches = 0 is not allowed: it must be at least 1.$"
    ):
        template_from_dict(tiny_template(tiny_model_dir, tmp_path, mini_batches=0))


def test_entropy_bonus_is_the_gradient_of_the_mean_token_entropy(tiny_model_dir, tmp_path):
    """Equal rewards give zero advantages, so the policy term has no gradient: the weights move only by the
    entropy bonus, exactly as AdamW on -entropy_coef x (mean entropy over the loss tokens) moves them."""
    import copy

    from tests.dist_step import fixed_rollout

    data = tiny_template(
        tiny_model_dir,
        tmp_path / "e",
        batch_size=4,
        micro_batch_size=3,  # the token mean must not care how the rows are split
        rewards=["tests.user_rewards:constant"],
        learning_rate=1e-2,
        adam_epsilon=1.0,  # an update proportional to the gradient: a wrong scale shows
        max_grad_norm=0.0,
    )
    moved = {}
    for coef in (0.0, 100.0):  # the random model's entropy is near its maximum: a flat gradient
        trainer = GRPOTrainer(
            template_from_dict({**data, "config": {**data["config"], "entropy_coef": coef}})
        )
        start = copy.deepcopy(trainer.model)
        seen = []
        trainer.sampling.rollout = lambda b, v, t=trainer, s=seen: s.append(fixed_rollout(t, b)) or s[-1][0]
        metrics, _ = trainer.train_step()
        moved[coef] = trainer.model.state_dict()
    assert all(torch.equal(moved[0.0][k], v) for k, v in start.state_dict().items())  # no bonus, no move
    ro, mask = seen[0][0], seen[0][0].completion_mask
    log_probs = completion_log_softmax(start, ro, slice(0, len(mask)))  # [B, T, V]
    entropy = -(log_probs.exp() * log_probs).sum(-1)  # [B, T]
    opt = torch.optim.AdamW(start.parameters(), lr=1e-2, betas=(0.9, 0.99), eps=1.0, weight_decay=0.0)
    (-100.0 * (entropy * mask).sum() / mask.sum()).backward()
    opt.step()
    assert metrics["entropy"] == pytest.approx(float((entropy.detach() * mask).sum() / mask.sum()), rel=1e-5)
    expected = start.state_dict()
    assert max(float((expected[k] - moved[0.0][k]).abs().max()) for k in expected) > 2e-4
    for k in expected:
        torch.testing.assert_close(moved[100.0][k], expected[k], rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize(
    ("epsilons", "warned"), [({}, True), ({"epsilon": 3e-4, "epsilon_high": 4e-4}, False)]
)
def test_gspo_with_token_level_clip_ranges_is_warned(tiny_model_dir, tmp_path, capsys, epsilons, warned):
    data = tiny_template(
        tiny_model_dir, tmp_path / "g", max_steps=1, importance_sampling_level="sequence", **epsilons
    )
    run(data)
    warning = (
        "warning: importance_sampling_level: sequence (GSPO) with epsilon 0.2 / epsilon_high None: a sequence "
        "ratio rarely moves that far, so almost nothing is clipped; GSPO clips at 3e-4 / 4e-4 (docs/losses.md)."
    )
    assert (warning in capsys.readouterr().out) is warned


def test_old_and_reference_passes_run_without_dropout(tiny_model_dir, tmp_path):
    # LoRA dropout 0.5: a train-mode forward is a random sample of log-probs; the frozen passes are not
    data = tiny_template(
        tiny_model_dir, tmp_path / "d", use_lora=True, lora_dropout=0.5, num_iterations=2, beta=0.04
    )
    trainer = GRPOTrainer(template_from_dict(data))
    from grpo.model.lora import lora_layers

    with torch.no_grad():  # B starts at 0, which hides dropout: give the adapters an effect
        for layer in lora_layers(trainer.model).values():
            layer.lora_B.weight.normal_()
    ro = trainer.sampling.rollout(trainer.sampler.next_batch(), version=0)
    updates = trainer.updates
    assert trainer.model.training and not updates.old_from_first_update
    old = [updates.frozen_logprobs(trainer.policy, ro) for _ in range(2)]
    ref = [updates.frozen_logprobs(trainer.ref, ro) for _ in range(2)]
    assert torch.equal(old[0], old[1]) and torch.equal(ref[0], ref[1])
    trainer.model.eval()
    with torch.no_grad():
        rows = slice(0, ro.completion_ids.shape[0])
        assert torch.equal(old[0], trainer.policy(*updates.logprob_inputs(ro, rows)))
    trainer.model.train()
    with torch.no_grad():  # the same forward with dropout on differs
        assert not torch.equal(old[0], trainer.policy(*updates.logprob_inputs(ro, rows)))
    assert all(m.training for m in trainer.model.modules())  # the passes left the policy in train mode
