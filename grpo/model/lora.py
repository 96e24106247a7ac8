"""LoRA from scratch: `LoRALinear`, injection by module name, merge / disable, and PEFT-format save and load.

A LoRA layer computes y = x W^T + b + (alpha / r) * B(A(dropout(x))) with W, b frozen, A [r, in] and B [out, r]
trainable (Hu et al. 2021, arXiv:2106.09685). B starts at zero, so training starts exactly at the base model.
`LoRALinear` holds the base layer's own `weight` / `bias` Parameters (no copy), so the model's state-dict keys
stay the base model's (`...q_proj.weight`) and the adapter adds `...q_proj.lora_A.weight` / `.lora_B.weight`:
with the prefix `base_model.model.` these are exactly the keys PEFT reads (see DESIGN.md).
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from grpo.config import ConfigError
from grpo.run.atomic_files import fresh_dir, replace_dir

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
PEFT_PREFIX = "base_model.model."
CONFIG_FILE, WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors"


class LoRALinear(nn.Module):
    """An nn.Linear with a trainable low-rank update; the base weight and bias are shared, frozen Parameters."""

    def __init__(self, base: nn.Linear, *, r: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        assert r >= 1, r
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight.requires_grad_(False)  # [out, in]
        self.bias = None if base.bias is None else base.bias.requires_grad_(False)  # [out]
        # Adapters train in fp32 even on a bf16/fp16 base: tiny updates to a low-precision B would round away.
        dtype = base.weight.dtype if base.weight.dtype in (torch.float32, torch.float64) else torch.float32
        kw = {"bias": False, "device": base.weight.device, "dtype": dtype}
        self.lora_A = nn.Linear(self.in_features, r, **kw)  # weight [r, in]
        self.lora_B = nn.Linear(r, self.out_features, **kw)  # weight [out, r]
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.r, self.alpha, self.scaling = r, alpha, alpha / r
        self.merged = False  # W holds W + scaling * B A; the adapter path is then skipped
        self.disabled = False  # compute the base layer only
        self.reset_lora_parameters()

    @torch.no_grad()
    def reset_lora_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x, self.weight, self.bias)  # [..., out]: the base layer, bit for bit
        if self.disabled or self.merged:
            return out
        a = self.lora_A(self.dropout(x.to(self.lora_A.weight.dtype)))  # [..., r]
        return (out + self.lora_B(a) * self.scaling).to(out.dtype)

    def delta_weight(self) -> torch.Tensor:
        """scaling * B A in the base weight's dtype: [out, in]."""
        return (self.lora_B.weight @ self.lora_A.weight * self.scaling).to(self.weight.dtype)

    @torch.no_grad()
    def merge(self) -> None:
        if not self.merged:
            self.weight.add_(self.delta_weight())
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            self.weight.sub_(self.delta_weight())
            self.merged = False

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, "
            f"alpha={self.alpha}, merged={self.merged}"
        )


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    """Module path -> LoRALinear, in model order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def inject_lora(
    model: nn.Module,
    *,
    r: int,
    alpha: float,
    dropout: float = 0.0,
    target_modules: list[str] | tuple[str, ...] | None = None,
) -> list[str]:
    """Replace every nn.Linear whose leaf name is in target_modules by a LoRALinear; freeze everything else.

    Default targets are the attention and MLP projections of Llama / Qwen / Mistral-style models. Names given
    explicitly must each match at least one layer (a typo would otherwise silently train fewer layers).
    Returns the module paths that were adapted.
    """
    if lora_layers(model):
        raise RuntimeError("inject_lora: the model already has LoRA layers.")
    targets = list(target_modules) if target_modules is not None else list(DEFAULT_TARGETS)
    linear = {
        name: m
        for name, m in model.named_modules()
        if isinstance(m, nn.Linear) and not isinstance(m, LoRALinear)
    }
    chosen = [name for name in linear if name.rsplit(".", 1)[-1] in targets]
    found = {name.rsplit(".", 1)[-1] for name in chosen}
    unmatched = [t for t in targets if t not in found] if target_modules is not None else []
    if not chosen or unmatched:
        leaves = sorted({name.rsplit(".", 1)[-1] for name in linear})
        raise ConfigError(
            f"config.lora_target_modules = {targets!r}: {', '.join(unmatched or targets)} matched no "
            f"nn.Linear layer of the model; its Linear layer names are {', '.join(leaves)}."
        )
    model.requires_grad_(False)
    for name in chosen:
        _set_module(model, name, LoRALinear(linear[name], r=r, alpha=alpha, dropout=dropout))
    return chosen


def merge_lora(model: nn.Module) -> None:
    """Fold the adapters into the base weights (W += scaling * B A): inference without the extra matmuls."""
    for layer in lora_layers(model).values():
        layer.merge()


def unmerge_lora(model: nn.Module) -> None:
    """Undo merge_lora (exact up to floating-point rounding of W + D - D)."""
    for layer in lora_layers(model).values():
        layer.unmerge()


@contextlib.contextmanager
def disabled_adapters(model: nn.Module) -> Iterator[None]:
    """Inside the block the model computes exactly the base model: the reference policy of a LoRA run.

    A PEFT model (the unsloth backend) uses its own `disable_adapter()`.
    """
    layers = list(lora_layers(model).values())
    if not layers and hasattr(model, "disable_adapter"):
        with model.disable_adapter():
            yield
        return
    if any(layer.merged for layer in layers):
        raise RuntimeError("disabled_adapters: unmerge the adapters first (unmerge_lora).")
    before = [layer.disabled for layer in layers]
    for layer in layers:
        layer.disabled = True
    try:
        yield
    finally:
        for layer, was in zip(layers, before):
            layer.disabled = was


class AdaptersDisabled(nn.Module):
    """Calls `inner` (e.g. CompletionLogprobs of the policy model) with the model's adapters switched off.

    The KL reference of a LoRA run is the base model, which is already in memory: no second copy.
    """

    def __init__(self, inner: nn.Module, model: nn.Module):
        super().__init__()
        self.inner = inner
        self.base = [model]  # a list: not registered twice as a submodule

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        with disabled_adapters(self.base[0]):
            return self.inner(*args, **kwargs)


# ---------------------------------------------------------------- PEFT-format files
def adapter_state_dict(
    model: nn.Module, state: dict[str, torch.Tensor] | None = None
) -> dict[str, torch.Tensor]:
    """PEFT keys (`base_model.model.<path>.lora_A.weight`) -> CPU tensors, read from `state` (a full state
    dict with the model's own key names, e.g. the one FSDP gathered to rank 0) or from the model itself."""
    out = {}
    for path, layer in lora_layers(model).items():
        for part in ("lora_A", "lora_B"):
            key = f"{path}.{part}.weight"
            t = getattr(layer, part).weight.detach() if state is None else state[key]
            out[PEFT_PREFIX + key] = t.detach().to("cpu").contiguous()
    return out


def adapter_config(model: nn.Module, *, base_model_name_or_path: str) -> dict[str, Any]:
    layers = list(lora_layers(model).values())
    if not layers:
        raise RuntimeError("The model has no LoRA layers to save.")
    first = layers[0]
    dropout = first.dropout.p if isinstance(first.dropout, nn.Dropout) else 0.0
    assert all((layer.r, layer.alpha) == (first.r, first.alpha) for layer in layers), (
        "one r and alpha for all layers"
    )
    alpha = int(first.alpha) if float(first.alpha).is_integer() else first.alpha
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "r": first.r,
        "lora_alpha": alpha,
        "lora_dropout": dropout,
        # Leaf names actually adapted: without them PEFT would silently use its own defaults.
        "target_modules": sorted({path.rsplit(".", 1)[-1] for path in lora_layers(model)}),
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "modules_to_save": None,
        "inference_mode": True,
    }


def save_adapter(
    model: nn.Module,
    folder: str | Path,
    *,
    base_model_name_or_path: str,
    tokenizer: Any = None,
    state: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write adapter_config.json + adapter_model.safetensors that `peft.PeftModel.from_pretrained` loads.

    r, alpha, dropout and target modules are read from the injected layers; the weights from `state` when
    given (FSDP: the full state dict gathered to rank 0), else from the model. The folder is written as a
    temporary sibling and renamed into place, so a crash never leaves half an adapter.
    """
    folder = Path(folder)
    config = adapter_config(model, base_model_name_or_path=base_model_name_or_path)
    state = adapter_state_dict(model, state)
    tmp = folder.with_name(folder.name + ".tmp")
    fresh_dir(tmp)
    save_file(state, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
    (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2))
    if tokenizer is not None:
        from grpo.model.loading import save_tokenizer

        save_tokenizer(tokenizer, tmp)
    replace_dir(tmp, folder)
    return folder


def load_adapter(model: nn.Module, folder: str | Path) -> list[str]:
    """Read an adapter folder (ours or PEFT's) into `model`, injecting LoRA layers first if it has none.

    Returns the adapted module paths. Every adapter key must match a layer and vice versa.
    """
    folder = Path(folder)
    missing = [name for name in (CONFIG_FILE, WEIGHTS_FILE) if not (folder / name).is_file()]
    if missing:
        raise ConfigError(f"LoRA adapter folder {str(folder)!r} has no {' or '.join(missing)}.")
    config = json.loads((folder / CONFIG_FILE).read_text())
    targets = config.get("target_modules")
    if (
        config.get("peft_type") != "LORA"
        or config.get("use_dora")
        or config.get("use_rslora")
        or not isinstance(targets, list)
    ):
        raise ConfigError(
            f"LoRA adapter folder {str(folder)!r}: only plain LoRA with a list of target_modules is supported."
        )
    r, alpha = int(config["r"]), float(config["lora_alpha"])
    layers = lora_layers(model)
    if not layers:
        inject_lora(
            model, r=r, alpha=alpha, dropout=float(config.get("lora_dropout", 0.0)), target_modules=targets
        )
        layers = lora_layers(model)
    elif any((layer.r, layer.alpha) != (r, alpha) for layer in layers.values()):
        raise ConfigError(
            f"LoRA adapter folder {str(folder)!r} has r={r}, alpha={alpha}, unlike the model's LoRA layers."
        )
    state = {k.removeprefix(PEFT_PREFIX): v for k, v in load_file(str(folder / WEIGHTS_FILE)).items()}
    params = {
        f"{path}.{part}.weight": getattr(m, part).weight
        for path, m in layers.items()
        for part in ("lora_A", "lora_B")
    }
    if set(state) != set(params):
        extra, absent = sorted(set(state) - set(params)), sorted(set(params) - set(state))
        raise ConfigError(
            f"LoRA adapter folder {str(folder)!r} does not fit the model: unexpected keys {extra[:3]}, "
            f"missing keys {absent[:3]}."
        )
    with torch.no_grad():
        for key, param in params.items():
            if tuple(state[key].shape) != tuple(param.shape):
                raise ConfigError(
                    f"LoRA adapter folder {str(folder)!r}: {key} has shape {tuple(state[key].shape)}, "
                    f"the model expects {tuple(param.shape)}."
                )
            param.copy_(state[key])
    return list(layers)


def merged_state_dict(
    model: nn.Module, state: dict[str, torch.Tensor] | None = None
) -> dict[str, torch.Tensor]:
    """The base model's keys with W + scaling * B A for every adapted layer and no lora keys: a plain HF
    state dict. New tensors only for the adapted weights; the trained weights are never modified."""
    state = dict(model.state_dict() if state is None else state)
    for path, layer in lora_layers(model).items():
        a, b = state.pop(f"{path}.lora_A.weight"), state.pop(f"{path}.lora_B.weight")  # [r, in], [out, r]
        w = state[f"{path}.weight"].detach()  # [out, in]
        if not layer.merged:
            delta = b.to(w.device, torch.float32) @ a.to(w.device, torch.float32) * layer.scaling
            w = (w.float() + delta).to(w.dtype)
        state[f"{path}.weight"] = w
    return state


def export_merged(
    model: nn.Module, tokenizer: Any, folder: str | Path, *, state: dict[str, torch.Tensor] | None = None
) -> Path:
    """Write the adapted model as a plain HF folder (AutoModelForCausalLM loads it; no LoRA keys inside).
    `state`: a full state dict with the model's key names (FSDP), else the model's own."""
    from grpo.model.loading import save_model

    save_model(model, tokenizer, Path(folder), state=merged_state_dict(model, state))
    return Path(folder)


def _set_module(model: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, leaf = path.rpartition(".")
    setattr(model.get_submodule(parent), leaf, module)
