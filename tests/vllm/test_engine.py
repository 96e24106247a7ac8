"""rollout_engine: vllm, against a real engine (no mock): the weights it samples from, its sampling settings, its
end tokens, resume, and the one-line refusals. The engine tests need vLLM, which lives in a venv of its own
(.ci/vllm.sh, docs/vllm.md); the main test venv runs only the refusals that need no engine."""

from __future__ import annotations

import json
import sys

import pytest
import torch

from grpo.config import ConfigError, template_from_dict
from grpo.rollout.engines.vllm_engine import NO_PACKAGE, SEVERAL_PROCESSES, SLEEP_ON_CPU, colocate_problem
from grpo.rollout.engines.vllm_server import SLEEP_IN_SERVER_MODE
from grpo.rollout.generate import SamplingSettings
from grpo.rollout.registry import sampler_class, sampler_name
from tests.conftest import VOLATILE, tiny_template, write_template
from tests.vllm.conftest import (
    CPU,
    HAS_VLLM,
    PROMPTS,
    forward_logprobs,
    needs_vllm,
    rows,
    run_repo,
    sample,
    train,
)


def config(**fields):
    return template_from_dict({"config": {"rollout_engine": "vllm", **fields}}).config


@pytest.mark.parametrize(
    "fields, world_size, has_package, problem",
    [
        ({}, 1, False, NO_PACKAGE),
        ({"rollout_engine": "torch"}, 1, False, None),
        ({}, 1, True, None),
        ({"vllm_mode": "server", "vllm_server_url": "http://127.0.0.1:8000"}, 2, False, None),  # HTTP only
        (
            {
                "vllm_mode": "server",
                "vllm_server_url": "http://127.0.0.1:8000",
                "vllm_enable_sleep_mode": True,
            },
            1,
            True,
            SLEEP_IN_SERVER_MODE,
        ),
        (
            {"vllm_tensor_parallel_size": 2},
            1,
            True,
            "config.vllm_tensor_parallel_size = 2 is above the 1 cpu device(s) this process sees: use at most 1.",
        ),
        ({}, 2, True, SEVERAL_PROCESSES),
        ({"vllm_enable_sleep_mode": True}, 1, True, SLEEP_ON_CPU),
    ],
)
def test_engine_problems(fields, world_size, has_package, problem):
    c = config(**fields)
    if sampler_name(c) == "vllm/colocate":  # the one sampler that needs the package here
        found = colocate_problem(c, device=CPU, world_size=world_size, has_package=has_package)
    else:
        found = sampler_class(c).problem(c, device=CPU, world_size=world_size)
    assert found == problem


@pytest.mark.parametrize(
    "fields, message",
    [
        (
            {"vllm_mode": "server"},
            "config.vllm_server_url = None is not allowed: vllm_mode: server needs the URL of a running "
            "`grpo vllm-serve`, e.g. http://127.0.0.1:8000.",
        ),
        (
            {"backend": "unsloth"},
            "config.rollout_engine = 'vllm' is not allowed: unsloth patches the model in ways vLLM does not "
            "load; use backend: torch or rollout_engine: torch.",
        ),
        (
            {"vllm_max_model_length": 100, "maximum_sequence_length": 160, "maximum_completion_length": 8},
            "config.vllm_max_model_length = 100 is not allowed: it must be null or at least "
            "maximum_sequence_length (160).",
        ),
        (
            {"vllm_server_url": "127.0.0.1:8000"},
            "config.vllm_server_url = '127.0.0.1:8000' is not allowed: use null or an http:// or https:// URL.",
        ),
    ],
)
def test_template_refusals(fields, message):
    with pytest.raises(ConfigError) as e:
        config(**fields)
    assert str(e.value) == message


@pytest.mark.skipif(HAS_VLLM, reason="shows the line a machine without vllm gets")
def test_missing_package_is_one_line(tiny_model_dir, tmp_path):
    path = write_template(tmp_path / "t.yaml", tiny_template(tiny_model_dir, tmp_path / "run"))
    result = train(path, "rollout_engine=vllm")
    assert result.returncode == 2 and result.stderr == f"error: {NO_PACKAGE}\n"
    assert not (tmp_path / "run").exists()


@needs_vllm
@pytest.mark.parametrize(
    "override, message",
    [
        (
            "vllm_tensor_parallel_size=2",
            "config.vllm_tensor_parallel_size = 2 is above the 1 cpu device(s) this process sees: use at most 1.",
        ),
        ("vllm_enable_sleep_mode=true", SLEEP_ON_CPU),
        ("vllm_mode=server", "config.vllm_server_url = None is not allowed:"),
    ],
)
def test_bad_settings_are_one_line(tiny_model_dir, tmp_path, override, message):
    path = write_template(tmp_path / "t.yaml", tiny_template(tiny_model_dir, tmp_path / "run"))
    result = train(path, "rollout_engine=vllm", override)
    assert result.returncode == 2 and result.stderr.startswith(f"error: {message}")
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr


# ---------------------------------------------------------------- a real engine
@needs_vllm
@pytest.mark.parametrize("temperature", [0.5, 1.0])
def test_sampling_logprobs_are_those_of_our_forward(engine, policy, temperature):
    ro = sample(engine, policy, temperature=temperature)
    assert ro.completion_ids.shape == (9, 8) and ro.prompt_ids.shape == (9, 5) and ro.group_size == 3
    assert ro.prompt_mask.sum(-1).tolist() == [5] * 3 + [2] * 3 + [4] * 3  # left-padded, G rows per prompt
    ours = forward_logprobs(policy, ro, temperature)  # [N, T]
    assert (ours - ro.sampling_logps).abs().max() < 1e-4
    other = forward_logprobs(policy, ro, 1.5 - temperature)  # the log-probs follow the temperature
    assert (other - ro.sampling_logps).abs().max() > 0.05


@needs_vllm
def test_seeds_come_from_our_generator(engine, policy):
    a, b, c = sample(engine, policy, seed=3), sample(engine, policy, seed=3), sample(engine, policy, seed=4)
    assert torch.equal(a.completion_ids, b.completion_ids) and torch.equal(a.sampling_logps, b.sampling_logps)
    assert not torch.equal(a.completion_ids, c.completion_ids)
    assert len({tuple(row) for row in a.completion_ids.tolist()}) == 9  # every sample its own draw


@needs_vllm
def test_top_k_one_is_greedy(engine, policy):
    greedy = sample(engine, policy, greedy=True)
    top1 = sample(engine, policy, top_k=1, temperature=0.7)
    assert greedy.sampling_logps is None and torch.equal(greedy.completion_ids, top1.completion_ids)
    # processed log-probs: after the top_k filter the one kept token has probability 1
    assert top1.sampling_logps.abs().max() == 0.0
    logits = policy(input_ids=torch.tensor([PROMPTS[1]])).logits[0, -1]
    assert greedy.completion_ids[3, 0] == logits.argmax()


@needs_vllm
def test_the_eos_set_stops_each_completion(engine, policy):
    eos = list(range(0, 49152, 3))  # a third of the vocabulary ends a reply: most stop within a few tokens
    ro = sample(engine, policy, eos_ids=eos, pad_id=0, max_new_tokens=12, temperature=1.0)
    ended = 0
    for ids, mask, truncated in zip(ro.completion_ids.tolist(), ro.completion_mask.tolist(), ro.truncated):
        length = sum(mask)
        stops = [i for i, t in enumerate(ids[:length]) if t % 3 == 0]
        assert mask == [1] * length + [0] * (len(mask) - length)
        assert ids[length:] == [0] * (len(ids) - length)
        if truncated:
            assert stops == [] and length == 12
        else:
            assert stops == [length - 1]  # the first end token is the last one kept
            ended += 1
    assert ended >= 6


@needs_vllm
def test_the_reload_warning_stays_quiet_after_the_engine_starts(engine, caplog):
    """With the embedded model every push warned "RotaryEmbedding: Failed to load weights" (its cos/sin cache is
    computed, never in a checkpoint). vLLM configures its loggers again when an engine starts, which resets a
    level set before; the engine's filter survives that, so only errors of that logger get through."""
    import logging

    logger = logging.getLogger("vllm.model_executor.model_loader.reload.layerwise")
    with caplog.at_level(logging.WARNING):
        logger.warning("%s: Failed to load weights", "RotaryEmbedding")
        logger.error("a real failure")
    assert [r.getMessage() for r in caplog.records if r.name == logger.name] == ["a real failure"]


@needs_vllm
def test_pushed_weights_are_sampled_and_stale_ones_refused(engine, policy):
    version = engine.version
    with pytest.raises(RuntimeError) as e:
        engine.sample([[1]], SamplingSettings(1, ()), num_generations=1, generator=None, version=version + 1)
    assert str(e.value) == (
        f"the vLLM engine holds the weights of step {version}, not those of step {version + 1}: update its "
        "weights after every optimizer step"
    )
    original = {k: v.clone() for k, v in policy.state_dict().items()}
    try:
        with torch.no_grad():
            policy.model.embed_tokens.weight.add_(torch.randn_like(policy.model.embed_tokens.weight) * 0.3)
        stale = sample(engine, policy, temperature=1.0)  # the engine still has the old weights
        assert (forward_logprobs(policy, stale, 1.0) - stale.sampling_logps).abs().max() > 0.1
        engine.update_weights(policy, version=version + 1)
        fresh = sample(engine, policy, temperature=1.0)
        assert (forward_logprobs(policy, fresh, 1.0) - fresh.sampling_logps).abs().max() < 1e-4
    finally:
        policy.load_state_dict(original)
        engine.update_weights(policy, version=version)


# ---------------------------------------------------------------- training with the engine
SKIPPED_PUSH = """
import runpy, sys
from grpo.rollout.engines import vllm_engine
push = vllm_engine.VLLMEngine.update_weights
def skipped(self, model, *, version):  # the defect the test must catch: the counter moves, the weights stay
    if self.version < 0:
        return push(self, model, version=version)
    self.version = version
vllm_engine.VLLMEngine.update_weights = skipped
sys.argv = ["scripts/train.py", *sys.argv[1:]]
runpy.run_path("scripts/train.py", run_name="__main__")
"""


@pytest.fixture(scope="module")
def template(vllm_model_dir, tmp_path_factory):
    # lr 0.05 moves the tiny policy far in one step: a push that did not happen shows as a large gap.
    data = tiny_template(
        vllm_model_dir,
        "unused",
        rollout_engine="vllm",
        max_steps=4,
        learning_rate=0.05,
        rewards=["tests.user_rewards:length"],
        eval_steps=2,  # evaluation samples greedily on the engine, at the step it was just pushed
        eval_limit=4,
    )
    return write_template(tmp_path_factory.mktemp("t") / "t.yaml", data)


@pytest.fixture(scope="module")
def full_run(template, tmp_path_factory):
    out = tmp_path_factory.mktemp("full") / "run"
    result = train(template, f"output_dir={out}")
    assert result.returncode == 0, result.stderr[-3000:]
    return out


@needs_vllm
@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_weights_are_pushed_after_every_step(full_run, template, tmp_path, lora):
    pushed = full_run
    # LoRA pushes the merged weights. Without dropout: with it the training forward (where the gap is measured
    # when num_iterations is 1) is a random draw of its own, 0.08 to 0.35 away after one step at this rate.
    overrides = ["use_lora=true", "lora_dropout=0"] if lora else []
    if lora:
        pushed = tmp_path / "pushed"
        result = train(template, f"output_dir={pushed}", *overrides)
        assert result.returncode == 0, result.stderr[-3000:]
    gaps = [r["rollout/mismatch_max"] for r in rows(pushed)]
    assert [r["step"] for r in rows(pushed) if "eval/accuracy" in r] == [2, 4]
    assert len(gaps) == 4 and max(gaps) < 1e-3  # the engine samples from the policy of every step
    result = train(template, f"output_dir={tmp_path / 'stale'}", *overrides, driver=SKIPPED_PUSH)
    assert result.returncode == 0, result.stderr[-3000:]
    stale = [r["rollout/mismatch_max"] for r in rows(tmp_path / "stale")]
    assert stale[0] < 1e-3 and min(stale[1:]) > 0.05  # step 1 samples the pushed start; then the policy moved


@needs_vllm
def test_resume_rebuilds_the_engine_from_the_restored_weights(full_run, template, tmp_path):
    out = tmp_path / "run"
    killed = train(
        template, f"output_dir={out}", "save_steps=2", env_extra={"GRPO_TEST_KILL_AT": "after_commit_step2"}
    )
    assert killed.returncode == -9
    result = train(template, f"output_dir={out}", "save_steps=2", "resume=latest")
    assert result.returncode == 0, result.stderr[-3000:]

    def kept(run):
        return [{k: v for k, v in r.items() if not k.startswith(VOLATILE)} for r in rows(run)]

    # the same samples and updates as the run that was never stopped: the engine that restarted holds
    # the step-2 weights and draws from the restored generator
    assert kept(out) == kept(full_run)


@needs_vllm
def test_bench_prints_both_engines_side_by_side(vllm_model_dir):
    args = ["--systems", "ours", "--engine", "vllm", "--steps", "2", "--model", str(vllm_model_dir)]
    result = run_repo([sys.executable, "scripts/bench.py", "cpu", *args], one_thread=True)
    assert result.returncode == 0, result.stderr[-3000:]
    ours, engine = [json.loads(line) for line in result.stdout.strip().splitlines()]
    assert ours["system"] == "ours" and engine["system"] == "ours-vllm"
    assert engine["settings"]["rollout_engine"] == "vllm" and engine["engine_start_s"] > 0
    assert set(engine["phase_median_s"]) == {"rollout", "reward", "logprob", "fwd_bwd", "optimizer", "push"}
    assert "engine_start_s" not in ours and ours["rollout_tokens_per_s"] > 0 < engine["rollout_tokens_per_s"]


@pytest.mark.skipif(HAS_VLLM, reason="shows the line a machine without vllm gets")
def test_bench_without_vllm_is_one_line():
    result = run_repo([sys.executable, "scripts/bench.py", "cpu", "--systems", "ours", "--engine", "vllm"])
    assert result.returncode == 1
    assert (
        result.stderr == "error: --engine vllm needs the vllm package: docs/vllm.md says how to install it.\n"
    )


@needs_vllm
def test_an_environment_plays_its_turns_on_the_engine(vllm_model_dir, tmp_path):
    from transformers import LlamaForCausalLM

    from grpo.model.loading import load_tokenizer, save_model

    model = LlamaForCausalLM.from_pretrained(vllm_model_dir)
    tokenizer = load_tokenizer(str(vllm_model_dir))
    with torch.no_grad():  # a model that often ends its reply, so a game has room for several turns
        row = torch.randn(64, generator=torch.Generator().manual_seed(0)) * 4
        model.get_output_embeddings().weight[tokenizer.eos_token_id] = row
    save_model(model, tokenizer, tmp_path / "ending")
    data = tiny_template(
        tmp_path / "ending",
        tmp_path / "run",
        rollout_engine="vllm",
        environment="number_guess",
        max_tool_calling_iterations=3,
        maximum_completion_length=24,
        maximum_sequence_length=400,
        rewards=["tests.user_rewards:length"],
    )
    result = train(write_template(tmp_path / "t.yaml", data))
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = rows(tmp_path / "run")
    assert len(metrics) == 2 and all(r["turns/mean"] > 1 for r in metrics)  # every turn sampled on the engine
    # each later turn is sampled from the whole conversation so far, as the training forward sees it
    assert max(r["rollout/mismatch_max"] for r in metrics) < 1e-3
