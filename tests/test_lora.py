"""LoRA: our layers, PEFT-format files that PEFT loads (logits compared, not just loaded), merge, disable,
the trainer's LoRA path (only adapters train, the KL reference shares the model), and the unsloth errors."""

from __future__ import annotations

import json
import logging
import sys
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from grpo.config import ConfigError, template_from_dict
from grpo.model.loading import load_model
from grpo.model.logprobs import CompletionLogprobs
from grpo.model.lora import (
    AdaptersDisabled,
    LoRALinear,
    disabled_adapters,
    inject_lora,
    load_adapter,
    lora_layers,
    merge_lora,
    unmerge_lora,
)
from grpo.trainer import GRPOTrainer
from tests.conftest import tiny_template, train_cli

CPU, F32 = torch.device("cpu"), torch.float32
ATTN_MLP = ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]


def length_reward(completions: list[str], references: list[str], **_) -> list[float]:
    """Spread within every group even for a random model, so the adapters get a gradient from step 1."""
    return [float(len(c)) / 10 for c in completions]


def _template(model_dir: Path, out: Path, **config):
    base = {"use_lora": True, "learning_rate": 1e-2, "rewards": [f"{__name__}:length_reward"]}
    return template_from_dict(tiny_template(model_dir, out, **{**base, **config}))


def _ids(vocab: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (2, 13), generator=g)  # [B, T]


@torch.no_grad()
def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    was = model.training
    model.eval()
    try:
        return model(input_ids=ids).logits.float()  # [B, T, V]
    finally:
        model.train(was)


@pytest.fixture(scope="module")
def trained(tiny_model_dir, tmp_path_factory):
    """A real 2-step LoRA run of the trainer, with the merged export."""
    out = tmp_path_factory.mktemp("lora-run")
    trainer = GRPOTrainer(_template(tiny_model_dir, out, export_merged=True))
    final = trainer.train()
    return trainer, final


def test_injection_starts_at_base_and_only_adapters_train(tiny_model_dir):
    base = load_model(str(tiny_model_dir), device=CPU, dtype=F32)
    model = load_model(str(tiny_model_dir), device=CPU, dtype=F32)
    paths = inject_lora(model, r=4, alpha=8, dropout=0.1)
    assert len(paths) == 2 * 7  # 2 layers x (4 attention + 3 MLP projections)
    assert sorted({p.rsplit(".", 1)[-1] for p in paths}) == ATTN_MLP
    layer = model.model.layers[0].self_attn.q_proj
    assert isinstance(layer, LoRALinear) and layer.scaling == 2.0
    assert layer.lora_A.weight.shape == (4, 32) and layer.lora_B.weight.shape == (32, 4)
    assert torch.count_nonzero(layer.lora_B.weight) == 0 and torch.count_nonzero(layer.lora_A.weight) > 0
    bound = 1 / 32**0.5  # kaiming_uniform(a=sqrt(5)) on fan_in 32
    assert layer.lora_A.weight.abs().max() <= bound
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(n.endswith((".lora_A.weight", ".lora_B.weight")) for n in trainable)
    assert len(trainable) == 2 * len(paths)
    ids = _ids(model.config.vocab_size)
    assert torch.equal(_logits(model, ids), _logits(base, ids))  # B = 0: exactly the base model
    keys = set(model.state_dict())
    assert set(base.state_dict()) <= keys  # base key names unchanged
    assert "model.layers.0.self_attn.q_proj.lora_A.weight" in keys


def test_bad_target_modules_error(tiny_model_dir):
    model = load_model(str(tiny_model_dir), device=CPU, dtype=F32)
    with pytest.raises(ConfigError) as e:
        inject_lora(model, r=4, alpha=8, target_modules=["q_proj", "qkv"])
    assert str(e.value) == (
        "config.lora_target_modules = ['q_proj', 'qkv']: qkv matched no nn.Linear layer of the model; "
        "its Linear layer names are down_proj, gate_proj, k_proj, lm_head, o_proj, q_proj, up_proj, v_proj."
    )
    assert not lora_layers(model)  # nothing half-injected
    assert all(p.requires_grad for p in model.parameters())


def test_trainer_rejects_bad_targets(tiny_model_dir, tmp_path):
    with pytest.raises(ConfigError, match=r"^config.lora_target_modules = \['c_attn'\]: c_attn matched no"):
        GRPOTrainer(_template(tiny_model_dir, tmp_path, lora_target_modules=["c_attn"]))


def test_peft_loads_our_adapter_with_same_logits(trained, tiny_model_dir, caplog):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    trainer, final = trained
    config = json.loads((final / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM"
    assert (config["r"], config["lora_alpha"], config["lora_dropout"]) == (16, 32, 0.05)
    assert config["target_modules"] == ATTN_MLP and config["bias"] == "none"
    state = load_file(str(final / "adapter_model.safetensors"))
    assert len(state) == 2 * 2 * 7
    assert state["base_model.model.model.layers.1.mlp.down_proj.lora_A.weight"].shape == (16, 64)
    assert state["base_model.model.model.layers.1.mlp.down_proj.lora_B.weight"].shape == (32, 16)

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=F32)
    ids = _ids(base.config.vocab_size)
    base_logits = _logits(base, ids)
    with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.WARNING):
        warnings.simplefilter("always")
        peft_model = PeftModel.from_pretrained(base, str(final))
    messages = [str(w.message) for w in caught] + [r.getMessage() for r in caplog.records]
    bad = [m for m in messages if "missing" in m.lower() or "unexpected" in m.lower()]
    assert not bad, bad
    ours = _logits(trainer.model, ids)
    theirs = _logits(peft_model, ids)
    assert (ours - theirs).abs().max().item() <= 1e-5
    assert (ours - base_logits).abs().max().item() > 1e-3  # the adapter really changes the model


def test_auto_peft_opens_a_real_runs_adapter_by_its_config_alone(tmp_path):
    """A LoRA run of the embedded model: adapter_config.json names a folder PEFT can open (the converted model),
    so AutoPeftModelForCausalLM needs nothing but the adapter folder. It computes what our loader does, exactly
    (both add B A x beside W x), and the merged export's logits up to the rounding of W + B A (at lr 0.01 that
    reaches 1.9e-4 on logits of about 30; the step is kept small so the adapter stays in the 1e-4 band)."""
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoModelForCausalLM

    out = tmp_path / "run"
    args = ["max_steps=1", "batch_size=2", "num_generations=2", "maximum_completion_length=8"]
    args += ["learning_rate=5e-5", f"rewards=[{__name__}:length_reward]", f"output_dir={out}"]
    proc = train_cli("configs/lora.yaml", *args)
    assert proc.returncode == 0, proc.stderr[-2000:]
    adapter = out / "arithmetic-lora"
    base = Path(json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"])
    assert base.is_absolute() and (base / "config.json").is_file()
    peft_model = AutoPeftModelForCausalLM.from_pretrained(str(adapter), dtype=F32)
    merged = AutoModelForCausalLM.from_pretrained(out / "arithmetic-lora-merged", dtype=F32)
    plain = AutoModelForCausalLM.from_pretrained(base, dtype=F32)
    ids = _ids(merged.config.vocab_size, seed=4)
    theirs = _logits(peft_model, ids)
    assert (theirs - _logits(merged, ids)).abs().max().item() <= 1e-4
    assert (theirs - _logits(plain, ids)).abs().max().item() > 1e-2  # the adapter is there and changes it
    load_adapter(plain, adapter)
    assert (theirs - _logits(plain, ids)).abs().max().item() <= 1e-5


def test_merged_export_is_plain_and_equal(trained, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    trainer, final = trained
    merged_dir = final.with_name(final.name + "-merged")
    keys = set(load_file(str(merged_dir / "model.safetensors")))
    base_keys = set(load_file(str(tiny_model_dir / "model.safetensors")))
    assert keys == base_keys and not any("lora" in k for k in keys)
    merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=F32)
    ids = _ids(merged.config.vocab_size, seed=2)
    assert (_logits(merged, ids) - _logits(trainer.model, ids)).abs().max().item() <= 1e-5
    assert all(isinstance(m, LoRALinear) for m in lora_layers(trainer.model).values())  # swapped back


def test_disabled_adapters_equal_base_exactly(trained, tiny_model_dir):
    trainer, _ = trained
    base = load_model(str(tiny_model_dir), device=CPU, dtype=F32)
    ids = _ids(base.config.vocab_size, seed=3)
    adapted = _logits(trainer.model, ids)
    with disabled_adapters(trainer.model):
        assert torch.equal(_logits(trainer.model, ids), _logits(base, ids))
    assert torch.equal(_logits(trainer.model, ids), adapted)  # back on after the block


def test_base_frozen_adapters_moved_only_adapters_optimized(trained, tiny_model_dir):
    trainer, _ = trained
    saved = load_file(str(tiny_model_dir / "model.safetensors"))
    state = trainer.model.state_dict()
    for key, value in saved.items():
        assert torch.equal(state[key], value), key
    # The trainer's exact start: seed, load, inject.
    torch.manual_seed(trainer.config.seed)
    start = load_model(str(tiny_model_dir), device=CPU, dtype=F32)
    inject_lora(start, r=16, alpha=32, dropout=0.05)
    start_state = start.state_dict()
    lora_keys = [k for k in state if ".lora_" in k]
    assert len(lora_keys) == 28
    for key in lora_keys:
        assert not torch.equal(state[key], start_state[key]), key
    opt_params = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    lora_params = {id(p) for n, p in trainer.model.named_parameters() if ".lora_" in n}
    assert opt_params == lora_params
    assert all(p.requires_grad == (".lora_" in n) for n, p in trainer.model.named_parameters())


def test_our_loader_reads_our_adapter(trained, tiny_model_dir, tmp_path):
    trainer, final = trained
    model = load_model(str(tiny_model_dir), device=CPU, dtype=F32)
    paths = load_adapter(model, final)
    assert paths == list(lora_layers(trainer.model))
    ids = _ids(model.config.vocab_size, seed=4)
    assert torch.equal(_logits(model, ids), _logits(trainer.model, ids))
    with pytest.raises(ConfigError) as e:
        load_adapter(model, tmp_path)
    assert str(e.value) == (
        f"LoRA adapter folder {str(tmp_path)!r} has no adapter_config.json or adapter_model.safetensors."
    )


def test_our_loader_reads_a_peft_adapter(tiny_model_dir, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=F32)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    peft_model = get_peft_model(base, config)
    torch.manual_seed(5)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    peft_model.save_pretrained(tmp_path)
    ours = load_model(str(tiny_model_dir), device=CPU, dtype=F32)
    assert len(load_adapter(ours, tmp_path)) == 4
    ids = _ids(ours.config.vocab_size, seed=5)
    diff = (_logits(ours, ids) - _logits(peft_model, ids)).abs().max().item()
    assert diff <= 1e-5
    with disabled_adapters(peft_model):
        assert (_logits(peft_model, ids) - _logits(ours, ids)).abs().max().item() > 1e-3


def test_merge_unmerge(tiny_model_dir):
    model = load_model(str(tiny_model_dir), device=CPU, dtype=F32)
    inject_lora(model, r=4, alpha=8)
    torch.manual_seed(6)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B.weight.normal_(0, 0.1)
    w0 = model.model.layers[0].mlp.down_proj.weight.clone()
    ids = _ids(model.config.vocab_size, seed=6)
    adapted = _logits(model, ids)
    merge_lora(model)
    assert (_logits(model, ids) - adapted).abs().max().item() <= 1e-5
    assert not torch.allclose(model.model.layers[0].mlp.down_proj.weight, w0)
    with pytest.raises(RuntimeError, match="unmerge the adapters first"):
        with disabled_adapters(model):
            pass
    unmerge_lora(model)
    assert (model.model.layers[0].mlp.down_proj.weight - w0).abs().max().item() <= 1e-6
    assert (_logits(model, ids) - adapted).abs().max().item() <= 1e-5


def test_kl_reference_shares_the_model(tiny_model_dir, tmp_path):
    trainer = GRPOTrainer(_template(tiny_model_dir, tmp_path, beta=0.1, max_steps=2))
    assert isinstance(trainer.ref, AdaptersDisabled)
    assert trainer.ref.inner is trainer.policy and trainer.policy.model is trainer.model
    n_params = sum(p.numel() for p in trainer.model.parameters())
    assert sum(p.numel() for p in trainer.ref.parameters()) == n_params  # the same tensors, not a copy
    assert {id(p) for p in trainer.ref.parameters()} == {id(p) for p in trainer.model.parameters()}
    final = trainer.train()
    assert final == tmp_path / trainer.config.adaptor_name
    assert (final / "adapter_model.safetensors").is_file() and not (final / "model.safetensors").exists()
    assert not final.with_name(final.name + "-merged").exists()
    # After training, the reference still equals the base model exactly.
    base = CompletionLogprobs(load_model(str(tiny_model_dir), device=CPU, dtype=F32))
    ids = _ids(trainer.model.config.vocab_size, seed=7)
    mask = torch.ones_like(ids)
    args = (ids[:, :5], mask[:, :5], ids[:, 5:], mask[:, 5:])
    with torch.no_grad():
        trainer.model.eval()
        assert torch.equal(trainer.ref(*args), base(*args))
        assert not torch.equal(trainer.policy(*args), base(*args))


UNSLOTH_NEITHER = (
    "config.backend = 'unsloth' needs a CUDA GPU and the unsloth package, and this run has neither: "
    "use backend: torch here, or run on a CUDA machine after pip install .[unsloth]."
)
UNSLOTH_NO_CUDA = (
    "config.backend = 'unsloth' needs a CUDA GPU and none is visible to this run: "
    "use backend: torch here, or run on a CUDA machine after pip install .[unsloth]."
)
UNSLOTH_NO_PACKAGE = (
    "config.backend = 'unsloth' needs the unsloth package, which is not installed: "
    "pip install .[unsloth] (it needs a CUDA GPU), or use backend: torch."
)


def test_unsloth_backend_stops_before_loading_on_cpu(tiny_model_dir, tmp_path, monkeypatch):
    import importlib.util

    import grpo.model.build as build_module
    import grpo.trainer as trainer_module

    def must_not_load(*args, **kwargs):
        raise AssertionError("loaded something before the unsloth check")

    monkeypatch.setattr(trainer_module, "load_tokenizer", must_not_load)
    monkeypatch.setattr(build_module, "load_model", must_not_load)
    expected = UNSLOTH_NEITHER if importlib.util.find_spec("unsloth") is None else UNSLOTH_NO_CUDA
    with pytest.raises(ConfigError) as e:
        GRPOTrainer(_template(tiny_model_dir, tmp_path, backend="unsloth"))
    assert str(e.value) == expected
    assert "unsloth" not in sys.modules


def test_unsloth_errors_name_what_is_missing(monkeypatch):
    import grpo.model.unsloth_backend as ub

    assert ub.unsloth_problem(has_cuda=False, has_package=False) == UNSLOTH_NEITHER
    assert ub.unsloth_problem(has_cuda=False, has_package=True) == UNSLOTH_NO_CUDA
    assert ub.unsloth_problem(has_cuda=True, has_package=False) == UNSLOTH_NO_PACKAGE
    assert ub.unsloth_problem(has_cuda=True, has_package=True) is None
    monkeypatch.setattr(ub.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(ub.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ConfigError) as e:
        ub.require_unsloth(torch.device("cuda", 0))
    assert str(e.value) == UNSLOTH_NO_PACKAGE


def test_load_in_4bit_needs_unsloth(tiny_model_dir, tmp_path):
    with pytest.raises(ConfigError) as e:
        _template(tiny_model_dir, tmp_path, load_in_4bit=True)
    assert str(e.value) == (
        "config.load_in_4bit = True is not allowed: 4-bit loading needs backend: unsloth."
    )


def test_bf16_base_keeps_fp32_adapters(tiny_model_dir):
    model = load_model(str(tiny_model_dir), device=CPU, dtype=torch.bfloat16)
    inject_lora(model, r=4, alpha=8, target_modules=["q_proj"])
    layer = model.model.layers[0].self_attn.q_proj
    assert layer.weight.dtype == torch.bfloat16 and layer.lora_A.weight.dtype == torch.float32
    with torch.no_grad():
        layer.lora_B.weight.fill_(0.01)
    out = model(input_ids=_ids(model.config.vocab_size)).logits  # [B, T, V]
    assert out.dtype == torch.bfloat16
    out.float().square().mean().backward()
    assert layer.lora_A.weight.grad is not None and layer.lora_A.weight.grad.abs().sum() > 0
    assert layer.weight.grad is None
