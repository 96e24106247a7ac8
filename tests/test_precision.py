"""config.dtype: bf16-mixed keeps fp32 weights that take small AdamW steps; pure bf16 weights lose them."""

import json

import pytest
import torch
from safetensors.torch import load_file

from grpo.config import ConfigError, template_from_dict
from grpo.model.precision import Precision, resolve_precision
from grpo.trainer import GRPOTrainer
from tests.conftest import tiny_template
from tests.dist_step import fixed_rollout

F32, BF16 = torch.float32, torch.bfloat16


@pytest.mark.parametrize(
    "dtype, device, want",
    [
        ("auto", "cpu", Precision(F32, F32)),
        ("auto", "cuda", Precision(F32, BF16)),  # only the device's type is read: no GPU needed
        ("bf16-mixed", "cpu", Precision(F32, BF16)),
        ("bfloat16", "cuda", Precision(BF16, BF16)),
        ("float16", "cuda", Precision(torch.float16, torch.float16)),
        ("float32", "cuda", Precision(F32, F32)),
    ],
)
def test_resolve_precision(dtype, device, want):
    got = resolve_precision(dtype, torch.device(device))
    assert got == want and got.mixed == (want.weights != want.compute)


def test_unknown_dtype_is_named():
    data = tiny_template("unused", "unused", dtype="bf16")
    with pytest.raises(ConfigError, match=r"config\.dtype.*'bf16'.*bf16-mixed"):
        template_from_dict(data)


def one_step(model_dir, out, dtype, **extra):
    data = tiny_template(
        model_dir,
        out,
        dtype=dtype,
        learning_rate=1e-6,
        batch_size=4,
        rewards=["tests.user_rewards:length"],  # random completions of random lengths: advantages != 0
        **extra,
    )
    trainer = GRPOTrainer(template_from_dict(data))
    trainer.sampling.rollout = lambda batch, version: fixed_rollout(trainer, batch)[0]
    projections = {k: p for k, p in trainer.model.named_parameters() if k.endswith("proj.weight")}
    before = {k: p.detach().clone() for k, p in projections.items()}
    metrics, _ = trainer.train_step()
    moved = sum(int((p.detach() != before[k]).sum()) for k, p in projections.items())
    return trainer, metrics, moved / sum(p.numel() for p in projections.values())


def test_bf16_mixed_takes_the_small_steps_that_bf16_weights_lose(tiny_model_dir, tmp_path):
    # Adam moves every weight with a gradient by about lr = 1e-6; a bf16 weight of size ~0.02 (this model's
    # init) changes only when the step exceeds half its spacing, ~6e-5: almost never.
    mixed, metrics, mixed_share = one_step(tiny_model_dir, tmp_path / "mixed", "bf16-mixed", beta=0.04)
    _, _, pure_share = one_step(tiny_model_dir, tmp_path / "pure", "bfloat16", beta=0.04)
    assert metrics["grad_norm"] > 0
    assert mixed_share > 0.99 and pure_share < 0.05, (mixed_share, pure_share)
    # fp32 master weights; the reference and the sampling copy need only the compute dtype
    assert {p.dtype for p in mixed.model.parameters()} == {F32}
    assert {p.dtype for p in mixed.ref.model.parameters()} == {BF16}
    sampler = mixed.rollout_sampler
    copy = sampler.decoding_model
    assert {p.dtype for p in copy.parameters()} == {BF16} and copy is sampler.sampling_weights.model
    sampler.update_weights(mixed.model, version=1)  # what train() calls after the step
    for (name, p), q in zip(mixed.model.named_parameters(), copy.parameters(), strict=True):
        assert torch.equal(q, p.detach().to(BF16)), name  # refreshed: the weights after the step


def test_bf16_mixed_lora_trains_fp32_adapters_over_a_bf16_base(tiny_model_dir, tmp_path):
    trainer, metrics, _ = one_step(tiny_model_dir, tmp_path / "lora", "bf16-mixed", use_lora=True)
    dtypes = {n: p.dtype for n, p in trainer.model.named_parameters()}
    assert {d for n, d in dtypes.items() if "lora_" in n} == {F32}
    assert {d for n, d in dtypes.items() if "lora_" not in n} == {BF16}
    assert trainer.rollout_sampler.decoding_model is trainer.model  # the base is bf16 already: no copy
    assert metrics["grad_norm"] > 0


def test_bf16_mixed_run_samples_from_the_bf16_copy(tiny_model_dir, tmp_path):
    data = tiny_template(
        tiny_model_dir, tmp_path, dtype="bf16-mixed", max_steps=2, maximum_completion_length=40
    )
    trainer = GRPOTrainer(template_from_dict(data))
    trainer.train()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    # the bf16 decode path (static: the packed one is fp32-only) against the autocast training forward
    assert all(0 < r["rollout/mismatch_max"] < 1 for r in rows), [r["rollout/mismatch_max"] for r in rows]
    state = load_file(tmp_path / "model" / "model.safetensors")
    assert {v.dtype for v in state.values()} == {F32}
