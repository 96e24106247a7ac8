"""The reference that follows the policy (TR-DPO soft update): the mix itself, when it happens, what a checkpoint
keeps of it, exact resume, and the same under 2-process FSDP."""

import pytest
import torch
from safetensors.torch import load_file

from grpo.config import ConfigError, template_from_dict
from grpo.model.reference_sync import REFERENCE_FILE, mix_into_reference, sync_due
from grpo.trainer import GRPOTrainer
from tests.conftest import build_tiny_model, tiny_template, write_template
from tests.test_checkpoint import torchrun, train


def tiny_llama(tokenizer, folder, seed):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(build_tiny_model(tokenizer, folder, seed=seed))


def test_mix_moves_every_parameter_and_leaves_the_policy(tokenizer, tmp_path):
    policy, ref = tiny_llama(tokenizer, tmp_path / "a", 1), tiny_llama(tokenizer, tmp_path / "b", 2)
    with torch.no_grad():  # the norms start as ones in both: make every parameter differ
        for p in policy.parameters():
            p.add_(torch.randn_like(p))
    p0 = {n: p.clone() for n, p in policy.named_parameters()}
    r0 = {n: p.clone() for n, p in ref.named_parameters()}
    mix_into_reference(policy, ref, 0.25)
    for name, r in ref.named_parameters():
        expected = 0.25 * p0[name] + 0.75 * r0[name]
        torch.testing.assert_close(r, expected, rtol=0, atol=1e-6)  # 1e-6: a few ulps at |w| ~ 2
        assert not torch.equal(r, r0[name]), name
    assert all(torch.equal(p, p0[n]) for n, p in policy.named_parameters())
    # tied weights stay tied: the head is the mixed embedding, not a second copy
    assert ref.lm_head.weight.data_ptr() == ref.model.embed_tokens.weight.data_ptr()
    mix_into_reference(policy, ref, 1.0)  # a hard update is an exact copy
    assert all(torch.equal(r, p0[n]) for n, r in ref.named_parameters())


def test_sync_due():
    assert [s for s in range(1, 10) if sync_due(s, 3)] == [3, 6, 9]
    assert not any(sync_due(s, 0) for s in range(1, 10))


@pytest.mark.parametrize(
    ("config", "message"),
    [
        (
            {"ref_model_sync_steps": 2},
            r"^config.ref_model_sync_steps = 2 is not allowed: it updates the KL reference, and beta = 0 loads "
            r"none; set beta > 0 or ref_model_sync_steps: 0.$",
        ),
        (
            {"ref_model_sync_steps": 2, "beta": 0.1, "use_lora": True},
            r"^config.ref_model_sync_steps = 2 is not allowed: with LoRA the reference is the base model with the "
            r"adapters off, which cannot follow the policy; use full fine-tuning or ref_model_sync_steps: 0.$",
        ),
        (
            {"ref_model_sync_steps": -1},
            r"^config.ref_model_sync_steps = -1 is not allowed: it must be 0 \(off\) or more.$",
        ),
        (
            {"ref_model_mixup_alpha": 0},
            r"^config.ref_model_mixup_alpha = 0.0 is not allowed: it must be in \(0, 1\].$",
        ),
        (
            {"ref_model_mixup_alpha": 1.5},
            r"^config.ref_model_mixup_alpha = 1.5 is not allowed: it must be in \(0, 1\].$",
        ),
    ],
)
def test_bad_sync_settings_are_refused(config, message):
    with pytest.raises(ConfigError, match=message):
        template_from_dict({"config": config})


def saved(out, step):
    folder = out / "checkpoints" / f"step-{step:06d}"
    return load_file(str(folder / "model" / "model.safetensors")), load_file(str(folder / REFERENCE_FILE))


def assert_mixed(ref, start, policy, alpha):
    """ref == alpha * policy + (1 - alpha) * start for every saved parameter."""
    assert set(ref) == set(start) and set(policy) == set(start)
    for name in start:
        expected = alpha * policy[name] + (1 - alpha) * start[name]
        torch.testing.assert_close(ref[name], expected, rtol=0, atol=1e-6, msg=name)


def test_the_reference_follows_the_policy_every_n_steps(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    data = tiny_template(
        tiny_model_dir,
        out,
        max_steps=3,
        beta=0.1,
        ref_model_sync_steps=2,
        ref_model_mixup_alpha=0.25,
        save_steps=1,
        rewards=["tests.user_rewards:length"],
    )
    trainer = GRPOTrainer(template_from_dict(data))
    trainer.train()
    start = load_file(str(tiny_model_dir / "model.safetensors"))
    policy1, ref1 = saved(out, 1)
    policy2, ref2 = saved(out, 2)
    _, ref3 = saved(out, 3)
    assert all(torch.equal(ref1[n], start[n]) for n in start)  # not due yet: still the starting model
    assert not all(torch.equal(policy1[n], start[n]) for n in start)
    assert_mixed(ref2, start, policy2, 0.25)  # step 2 mixes the policy after step 2 in
    assert all(torch.equal(ref3[n], ref2[n]) for n in ref2)  # and it holds until step 4
    live = dict(trainer.ref.model.named_parameters())
    assert all(torch.equal(live[n], ref3[n]) for n in ref3)
    assert not (out / "model" / REFERENCE_FILE).exists()  # the final model folder is the policy alone


def test_a_resumed_run_continues_with_the_synced_reference(tiny_model_dir, tmp_path):
    data = tiny_template(
        tiny_model_dir,
        tmp_path / "unused",
        max_steps=4,
        beta=0.5,
        ref_model_sync_steps=2,
        ref_model_mixup_alpha=0.5,
        rewards=["tests.user_rewards:length"],
    )
    path = write_template(tmp_path / "t.yaml", data)
    full, split = tmp_path / "full", tmp_path / "split"
    assert train(path, f"output_dir={full}").returncode == 0
    assert train(path, f"output_dir={split}", "max_steps=2", "save_steps=2").returncode == 0
    result = train(path, f"output_dir={split}", "save_steps=2", "resume=latest")
    assert result.returncode == 0, result.stderr[-2000:]
    weights = [(out / "model" / "model.safetensors").read_bytes() for out in (full, split)]
    assert weights[0] == weights[1]
    # without the saved reference the resumed steps would pull towards the starting model instead
    (split / "checkpoints" / "step-000002" / REFERENCE_FILE).unlink()
    other = tmp_path / "other"
    (split / "checkpoints").rename(other)
    (split / "checkpoints").mkdir()
    (other / "step-000002").rename(split / "checkpoints" / "step-000002")
    result = train(path, f"output_dir={split}", "save_steps=0", "resume=latest")
    assert result.returncode == 0, result.stderr[-2000:]
    assert (split / "model" / "model.safetensors").read_bytes() != weights[0]


def test_two_process_fsdp_mixes_each_shard(tiny_model_dir, tmp_path):
    data = tiny_template(
        tiny_model_dir,
        tmp_path / "run",
        max_steps=1,
        batch_size=1,
        beta=0.1,
        ref_model_sync_steps=1,
        ref_model_mixup_alpha=0.5,
        save_steps=1,
        distributed_strategy="fsdp",
        rewards=["tests.user_rewards:length"],
    )
    result = torchrun(write_template(tmp_path / "t.yaml", data))
    assert result.returncode == 0, result.stderr[-2000:]
    policy, ref = saved(tmp_path / "run", 1)
    assert_mixed(ref, load_file(str(tiny_model_dir / "model.safetensors")), policy, 0.5)
