"""Checkpoints that a killed run resumes from exactly: same prompts, same samples, same updates.

Layout: <output_dir>/checkpoints/step-000012/ holding the model folder (or only the adapter under LoRA),
optimizer.pt, scheduler.pt, reference.safetensors (only when the reference follows the policy,
grpo/model/reference_sync.py), trainer_state.json (step, data position), rng-rank<R>.pt (every RNG of every rank),
rollouts-rank<R>.pt (async_level: the batches drawn ahead) and template.yaml. A checkpoint is written into step-N.tmp, fsynced, then renamed: a folder without the .tmp
suffix is always complete, and leftover .tmp folders from a killed save are removed on resume.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import shutil
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from grpo.config import ConfigError, Template
from grpo.data import PromptSampler
from grpo.errors import NonFiniteError, StorageError
from grpo.model.reference_sync import load_reference, save_reference
from grpo.parallel.collectives import first_text_over_ranks
from grpo.parallel.launch import DistEnv
from grpo.run.atomic_files import atomic_write_text, fresh_dir, fsync_tree
from grpo.run.resume_checks import UnreadableCheckpoint, check_compatible, read_trainer_state, reading
from grpo.run.run_dir import naming_full_disk

STEP_DIR = re.compile(r"^step-(\d+)$")


def checkpoint_root(output_dir: Path) -> Path:
    return Path(output_dir) / "checkpoints"


def list_checkpoints(output_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    root = checkpoint_root(output_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := STEP_DIR.match(p.name))]
    return [p for _, p in sorted(found)]


def remove_partial(output_dir: Path) -> list[Path]:
    root = checkpoint_root(output_dir)
    partial = [p for p in root.glob("*.tmp")] if root.is_dir() else []
    for p in partial:
        shutil.rmtree(p, ignore_errors=True)
    return partial


def resume_candidates(spec: str | None, output_dir: Path) -> list[Path]:
    """The checkpoints to try, newest first: for 'latest' every complete one in output_dir (none yet: an empty
    list), else the one folder named."""
    if spec in (None, "", "none"):
        return []
    if spec == "latest":
        remove_partial(output_dir)
        return list_checkpoints(output_dir)[::-1]
    path = Path(spec)
    if not (path / "trainer_state.json").is_file():
        raise ConfigError(
            f"config.resume_from_checkpoint = {spec!r} is not a checkpoint folder "
            f"(no trainer_state.json); use latest or a checkpoints/step-N folder."
        )
    return [path]


def checked_resume_paths(template: Template, output_dir: Path, world_size: int) -> list[Path]:
    """The checkpoints a run resumes from, newest first, with the newest checked against the template before
    anything loads: one that changes the math is refused now. A damaged one is skipped when resuming."""
    c = template.config
    paths = resume_candidates(c.resume_from_checkpoint, output_dir)
    if paths:
        with contextlib.suppress(UnreadableCheckpoint):
            check_compatible(paths[0], template, force=c.force_resume, world_size=world_size)
    return paths


# ---------------------------------------------------------------- RNG
def rng_state(generator: torch.Generator) -> dict[str, Any]:
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "generator": generator.get_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any], generator: torch.Generator) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    generator.set_state(state["generator"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---------------------------------------------------------------- write / read
def _test_kill_point(name: str) -> None:
    """Tests set GRPO_TEST_KILL_AT=<name> to SIGKILL the process between two file writes of a save."""
    if os.environ.get("GRPO_TEST_KILL_AT") == name:
        os.kill(os.getpid(), 9)


def staging_dir(output_dir: Path, step: int) -> Path:
    tmp = checkpoint_root(output_dir) / f"step-{step:06d}.tmp"
    return fresh_dir(tmp)


def commit(tmp: Path, output_dir: Path, step: int, save_total_limit: int) -> Path:
    """fsync, then the rename that makes the checkpoint visible; then prune the oldest beyond the limit."""
    fsync_tree(tmp)
    final = checkpoint_root(output_dir) / f"step-{step:06d}"
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    if save_total_limit > 0:
        for old in list_checkpoints(output_dir)[:-save_total_limit]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def load_rng(path: Path, rank: int, generator: torch.Generator) -> None:
    file = path / f"rng-rank{rank}.pt"
    if not file.is_file():  # resumed with more ranks than saved: reseed this rank deterministically instead
        generator.manual_seed(generator.initial_seed() + 7919 * rank)
        return
    set_rng_state(torch.load(file, weights_only=False), generator)


# ---------------------------------------------------------------- the trainer's side
@dataclass(frozen=True)
class RunParts:
    """What a checkpoint saves and a resume restores in place: the objects the trainer built for this run."""

    template: Template
    env: DistEnv
    output_dir: Path
    model: torch.nn.Module
    tokenizer: Any
    optimizer: torch.optim.Optimizer
    scheduler: Any
    sampler: PromptSampler
    generator: torch.Generator
    reference: torch.nn.Module | None  # only when the reference follows the policy (ref_model_sync_steps > 0)
    pipeline: Any = None  # async_level: the batches drawn ahead (grpo/rollout/pipeline.py)


@dataclass(frozen=True)
class Progress:
    """Where a run stands: the counters a checkpoint records beside the parts."""

    step: int
    skipped_steps: int = 0
    entropy_coef: float | None = None  # where use_adaptive_entropy has steered the coefficient to
    drawn: dict[str, Any] | None = None  # async_level: the batches drawn ahead and the engine's random state


def write_model(
    template: Template,
    model: torch.nn.Module,
    tokenizer: Any,
    folder: Path,
    state: dict[str, torch.Tensor] | None,
) -> None:
    """The model as users load it: the adapter under LoRA (plus the merged model if asked), else the full
    model. Rank 0 only; `state` is the full state dict FSDP gathered (None without FSDP)."""
    from grpo.model.loading import peft_base_model, save_model
    from grpo.model.lora import export_merged, save_adapter

    weights = model.state_dict() if state is None else state
    broken = next((k for k, v in weights.items() if v.is_floating_point() and not v.isfinite().all()), None)
    if broken is not None:  # skip_nonfinite_steps cannot catch a step that leaves finite losses, inf weights
        raise NonFiniteError(
            f"The weights are no longer finite ({broken} holds inf or NaN), so {folder} was not written; the "
            "last checkpoint stays. Lower learning_rate, or look at the run's last metrics."
        )
    c = template.config
    if c.backend == "unsloth":
        from grpo.model.unsloth_backend import save_unsloth

        save_unsloth(model, tokenizer, folder, export_merged=c.export_merged)
    elif c.use_lora:
        base = peft_base_model(template.model)
        save_adapter(model, folder, base_model_name_or_path=base, tokenizer=tokenizer, state=state)
        if c.export_merged:
            export_merged(model, tokenizer, folder.with_name(folder.name + "-merged"), state=state)
    else:
        save_model(model, tokenizer, folder, state=state)


def _barrier(env: DistEnv) -> None:
    if env.enabled and torch.distributed.is_initialized():
        torch.distributed.barrier()


def _optimizer_state(parts: RunParts) -> dict[str, Any]:
    if parts.env.fsdp:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return get_optimizer_state_dict(parts.model, parts.optimizer, options=options)
    return parts.optimizer.state_dict()


def save_checkpoint(parts: RunParts, progress: Progress) -> Path:
    """Every rank calls this at a step boundary; rank 0 writes the shared files, each rank its RNG. A disk
    that fills up stops the run with one line; the partial folder is removed, the earlier checkpoints stay."""
    tmp = checkpoint_root(parts.output_dir) / f"step-{progress.step:06d}.tmp"
    try:
        with naming_full_disk(f"checkpoint step-{progress.step:06d}", parts.output_dir):
            return _write_checkpoint(parts, progress)
    except StorageError:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _write_checkpoint(parts: RunParts, progress: Progress) -> Path:
    from grpo.parallel.wrapping import full_state_dict

    env, step, out = parts.env, progress.step, parts.output_dir
    state = full_state_dict(parts.model, env)
    ref_state = None if parts.reference is None else full_state_dict(parts.reference, env)
    optim = _optimizer_state(parts)
    # async_level: wait for the batches in flight first, so an engine that fails leaves no partial folder
    drawn = None if parts.pipeline is None else parts.pipeline.checkpoint_state()
    tmp = checkpoint_root(out) / f"step-{step:06d}.tmp"
    if env.is_main:
        tmp = staging_dir(out, step)
        write_model(parts.template, parts.model, parts.tokenizer, tmp / "model", state)
        if parts.reference is not None:
            save_reference(parts.reference, tmp, ref_state)
        torch.save(optim, tmp / "optimizer.pt")
        _test_kill_point(f"after_optimizer_step{step}")
        torch.save(parts.scheduler.state_dict(), tmp / "scheduler.pt")
        (tmp / "template.yaml").write_text(yaml.safe_dump(asdict(parts.template), sort_keys=False))
        info = {
            "step": step,
            "sampler": parts.sampler.state_dict(),
            "skipped_steps": progress.skipped_steps,
            "entropy_coef": progress.entropy_coef,
            "world_size": env.world_size,
        }
        (tmp / "trainer_state.json").write_text(json.dumps(info, indent=2))
    _barrier(env)
    if drawn is not None:
        torch.save(drawn, tmp / f"rollouts-rank{env.rank}.pt")
    torch.save(rng_state(parts.generator), tmp / f"rng-rank{env.rank}.pt")
    _barrier(env)
    final = tmp
    if env.is_main:
        final = commit(tmp, out, step, parts.template.config.save_total_limit)
        _test_kill_point(f"after_commit_step{step}")
    _barrier(env)
    return final


def resume_newest_loadable(
    parts: RunParts, paths: list[Path], *, force: bool, explicit: bool
) -> tuple[Progress, Path, list[str]]:
    """Resume from the first of `paths` (newest first) that loads on every rank; returns its Progress, its path
    and one note per checkpoint skipped. An explicitly named checkpoint that does not load is refused instead.
    The ranks decide together: one whose own file (rng-rankN.pt) is damaged takes them all to the previous
    checkpoint, so no two ranks continue from different steps."""
    skipped: list[str] = []
    for path in paths:
        check_compatible(path, parts.template, force=force, world_size=parts.env.world_size)
        progress, problem = None, None
        try:
            progress = resume(parts, path)
        except UnreadableCheckpoint as e:
            problem = str(e)
        problem = first_text_over_ranks(problem, parts.env)
        if problem is None and progress is not None:
            if parts.env.is_main:
                _truncate_logs(parts.output_dir, progress.step)
            return progress, path, skipped
        if explicit:
            raise ConfigError(f"config.resume_from_checkpoint = {str(path)!r}: {problem}.")
        skipped.append(f"skipped checkpoint {path.name}: {problem}")
    raise ConfigError(
        f"resume=latest: no checkpoint in {checkpoint_root(parts.output_dir)} loads ({'; '.join(skipped)}); "
        "remove the damaged ones or start without resume."
    )


def resume(parts: RunParts, path: Path) -> Progress:
    """Load a checkpoint (already checked with check_compatible) into freshly built parts; returns the
    counters it recorded. A file that does not load raises UnreadableCheckpoint naming it."""
    env = parts.env
    reading(path / "model", lambda: _load_weights(parts, path / "model"))
    ref_state = reading(path / "reference.safetensors", lambda: load_reference(path))
    if parts.reference is not None and ref_state is not None:  # none: saved before sync was on (force_resume)
        _load_full_state(env, parts.reference, ref_state)
    optim = reading(path / "optimizer.pt", lambda: torch.load(path / "optimizer.pt", weights_only=False))
    if env.fsdp:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(
            parts.model, parts.optimizer, optim, options=StateDictOptions(full_state_dict=True)
        )
    else:
        reading(path / "optimizer.pt", lambda: parts.optimizer.load_state_dict(optim))
    scheduler = reading(path / "scheduler.pt", lambda: torch.load(path / "scheduler.pt", weights_only=False))
    parts.scheduler.load_state_dict(scheduler)
    info = reading(path / "trainer_state.json", lambda: read_trainer_state(path))
    progress = Progress(
        step=int(info["step"]),
        skipped_steps=int(info.get("skipped_steps", 0)),
        entropy_coef=info.get("entropy_coef"),
    )
    parts.sampler.load_state_dict(info["sampler"])
    reading(path / f"rng-rank{env.rank}.pt", lambda: load_rng(path, env.rank, parts.generator))
    drawn = path / f"rollouts-rank{env.rank}.pt"
    if drawn.is_file():
        progress = replace(progress, drawn=reading(drawn, lambda: torch.load(drawn, weights_only=False)))
    return progress


def _load_weights(parts: RunParts, folder: Path) -> None:
    from safetensors.torch import load_file

    if parts.template.config.use_lora:
        from grpo.model.lora import load_adapter

        load_adapter(parts.model, folder)
        return
    _load_full_state(parts.env, parts.model, load_file(str(folder / "model.safetensors")))


def _load_full_state(env: DistEnv, model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """A full (unsharded) state dict into `model`: FSDP scatters it to the shards. Only a tied head may be
    missing from the file."""
    if env.fsdp:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True, strict=False))
        return
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {"lm_head.weight"} if getattr(model.config, "tie_word_embeddings", False) else set()
    assert not unexpected and set(missing) <= tied, (missing, unexpected)


def _truncate_logs(output_dir: Path, step: int) -> None:
    """Drop log lines of steps after the checkpoint: the resumed run writes them again."""
    for name in ("metrics.jsonl", "samples.jsonl"):
        path = output_dir / name
        if path.is_file():
            kept = [line for line in path.read_text().splitlines() if json.loads(line)["step"] <= step]
            atomic_write_text(path, "".join(line + "\n" for line in kept))
