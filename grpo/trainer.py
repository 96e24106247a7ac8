"""The GRPO loop: sample -> score -> advantages -> num_iterations x mini-batch updates -> log / save.

Everything a step needs is built once in `GRPOTrainer.__init__` (cheap checks first, then the heavy loads), so
`train()` reads as the algorithm; the updates themselves are in grpo/update.py. One step = one batch of
prompts sampled G times; each step makes `num_iterations` passes over those samples, each pass one optimizer
update per mini-batch.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import signal
import time
from pathlib import Path
from typing import Any

import torch

from grpo import rewards as rw
from grpo.advantages import reward_advantages
from grpo.config import Template
from grpo.config.checks import config_warnings
from grpo.data import PromptSampler, build_prompts, complete_rows, load_rows
from grpo.eval.evaluate import load_eval_prompts
from grpo.eval.train_eval import TrainingEval, best_accuracy_so_far
from grpo.model.loading import (
    enable_checkpointing,
    has_dropout,
    load_model,
    load_tokenizer,
    resolve_device,
    stop_token_ids,
)
from grpo.model.logprobs import CompletionLogprobs
from grpo.model.lora import AdaptersDisabled, inject_lora
from grpo.model.precision import SamplingWeights, resolve_precision
from grpo.model.reference_sync import mix_into_reference, sync_due
from grpo.parallel.collectives import any_over_ranks, gather_over_ranks, reduce_over_ranks
from grpo.parallel.launch import DistEnv, init_distributed
from grpo.parallel.wrapping import full_params, full_state_dict, wrap_models
from grpo.rollout.decoders import require_decode_impl
from grpo.rollout.dynamic_sampling import fill_batch
from grpo.rollout.generate import Rollout, generate, sample_as_configured
from grpo.rollout.multi_turn import MultiTurn
from grpo.rollout.vllm_engine import connect_server, require_engine, start_engine
from grpo.run import checkpoint as ckpt
from grpo.run.cli_common import say_line
from grpo.run.cpu_memory import keep_freed_memory
from grpo.run.logger import finish_queued, peak_memory_metric
from grpo.run.run_dir import claim_run_dir, naming_full_disk, open_run_log
from grpo.run.step_report import sample_metrics, sample_records
from grpo.run.update_totals import UpdateTotals
from grpo.samples import Samples
from grpo.schedule import build_optimizer
from grpo.update import PolicyUpdate, resolve_loss


class GRPOTrainer:
    def __init__(self, template: Template, *, env: DistEnv | None = None):
        self.template, self.config = template, template.config
        c = self.config
        # Cheap checks first: everything a user can get wrong fails here, before a model loads.
        self.rewards = rw.resolve_rewards(
            c.rewards, max_completion_length=c.maximum_completion_length, timeout=c.reward_timeout
        )
        self.loss = resolve_loss(c)
        self.turns = MultiTurn.from_config(c, template.template.response_prefix)  # tools or an environment
        self.tags = rw.Tags.from_config(c)
        # torchrun: check gpu_ids against the processes, pin this rank's GPU, start the process group.
        self.env = env or init_distributed(c, resolve_device(c).type)
        self.device = resolve_device(c)
        self.precision = resolve_precision(c.dtype, self.device)
        require_engine(c, self.device, self.env.world_size)  # rollout_engine vllm: the package, devices
        self.server = connect_server(template, Path(c.output_dir), self.env)  # vllm_mode server: up and free
        if self.device.type == "cpu":
            keep_freed_memory()  # no page faults on memory the last step freed (grpo/run/cpu_memory.py)
        if c.backend == "unsloth":
            from grpo.model.unsloth_backend import require_unsloth

            require_unsloth(self.device)  # no CUDA or no package: stop before anything loads
        self.output_dir = Path(c.output_dir)
        claim_run_dir(self.output_dir, is_main=self.env.is_main)  # writable, and no other run in it
        resume_paths = ckpt.resume_candidates(c.resume_from_checkpoint, self.output_dir)
        if resume_paths:  # a template that changes the math is refused before anything loads
            with contextlib.suppress(ckpt.UnreadableCheckpoint):  # a damaged one is skipped when resuming
                ckpt.check_compatible(
                    resume_paths[0], template, force=c.force_resume, world_size=self.env.world_size
                )
        self.tokenizer = load_tokenizer(template.model)
        rows, self.rows_note = complete_rows(load_rows(template.dataset), template.template, template.dataset)
        self.prompts = build_prompts(
            rows,
            template.template,
            self.tokenizer,
            max_prompt_tokens=c.maximum_sequence_length - c.maximum_completion_length,
            drop_long=c.long_prompts == "drop",
            tools=self.turns.schemas if self.turns else None,
            system_text=self.turns.system_text(self.tokenizer) if self.turns else "",
        )
        self.dropped_prompts = len(rows) - len(self.prompts)
        self.sampler = PromptSampler(
            len(self.prompts),
            batch_size=c.batch_size,
            seed=c.seed,
            rank=self.env.rank,
            world_size=self.env.world_size,
        )
        per_run = self.sampler.steps_per_epoch * c.num_train_epochs
        self.total_steps = c.max_steps if c.max_steps > 0 else per_run
        # Held-out prompts, built once; only rank 0 evaluates (the others wait at a barrier).
        self.evaluation = TrainingEval(
            template,
            self.env,
            self.output_dir,
            self.tokenizer,
            prompts=(
                load_eval_prompts(template, self.tokenizer, limit=c.eval_limit)
                if c.eval_steps > 0 and self.env.is_main
                else []
            ),
            rewards=self.rewards,
            tags=self.tags,
            turns=self.turns,
        )
        self._build_models()
        self.step = 0
        self.eos_ids = stop_token_ids(self.model, self.tokenizer)
        self.stop_requested = False
        self.resumed_from, self.resume_notes = None, []
        if resume_paths:
            progress, self.resumed_from, self.resume_notes = ckpt.resume_newest_loadable(
                self.checkpoint_parts(),
                resume_paths,
                force=c.force_resume,
                explicit=c.resume_from_checkpoint != "latest",
            )
            self.step, self.updates.skipped_steps = progress.step, progress.skipped_steps
            if c.use_adaptive_entropy and progress.entropy_coef is not None:
                self.updates.entropy_coef = progress.entropy_coef  # where the interrupted run had steered it
            # save_best: a resumed run must beat what the interrupted one already kept
            self.evaluation.best_accuracy = best_accuracy_so_far(self.output_dir)
        # rollout_engine vllm: an engine holding this step's weights (the restored ones on a resume); else None
        dtype = self.precision.compute
        self.engine = start_engine(template, self.model, self.device, dtype, self.step, self.server)
        self.evaluation.engine = self.engine

    def _build_models(self) -> None:
        """The heavy part: policy (+ LoRA), reference, DDP/FSDP wrapping, optimizer, sampling generator."""
        c, template = self.config, self.template
        torch.manual_seed(c.seed)
        # unsloth always trains a LoRA adapter (its own PEFT layers); ours is injected after loading.
        self.lora = c.use_lora or c.backend == "unsloth"
        if c.backend == "unsloth":
            from grpo.model.unsloth_backend import load_unsloth_model

            self.model = load_unsloth_model(template, dtype=self.precision.compute)
        else:
            # LoRA trains fp32 adapters (grpo/model/lora.py) over a frozen base, which needs only the compute dtype.
            dtype = self.precision.compute if self.lora else self.precision.weights
            self.model = load_model(template.model, device=self.device, dtype=dtype)
            if c.use_lora:
                inject_lora(
                    self.model,
                    r=c.lora_r,
                    alpha=c.lora_alpha,
                    dropout=c.lora_dropout,
                    target_modules=c.lora_target_modules,
                )
        if self.lora or c.gradient_checkpointing:
            # from_pretrained returns eval mode; LoRA dropout acts only in training forwards, and
            # transformers recomputes (checkpoints) layers only in training mode.
            self.model.train()
        # The shared-prefix pass writes each layer's keys/values into a cache during forward, which a
        # recomputing (checkpointed) layer would write twice; unsloth patches the forward in ways it may not
        # survive. Both take the concatenated pass instead.
        shared_prefix = c.backend != "unsloth" and not c.gradient_checkpointing
        if c.gradient_checkpointing and c.backend != "unsloth":  # unsloth turns on its own variant
            enable_checkpointing(self.model)
        # bf16-mixed (grpo/model/precision.py): the passes autocast, except under FSDP, which gathers bf16 weights.
        mixed = self.precision.mixed and c.backend != "unsloth"
        autocast = self.precision.compute if mixed and not self.env.fsdp else None
        head = {"temperature": c.temperature, "impl": c.logprob_impl, "fp32_head": c.cast_lm_head_to_fp32}
        self.policy = CompletionLogprobs(self.model, autocast=autocast, **head)
        # With dropout active in training forwards, the old-policy log-probs need their own no-grad pass.
        old_from_first_update = not (self.model.training and has_dropout(self.model))
        self.ref = None
        if c.beta > 0 and not self.lora:
            # frozen: the compute dtype is all it needs
            ref_model = copy.deepcopy(self.model).to(self.precision.compute).eval().requires_grad_(False)
            self.ref = CompletionLogprobs(ref_model, autocast=autocast, **head)
        # torchrun: DDP around the policy, or FSDP2 around policy and reference (grpo/parallel/wrapping.py).
        self.policy, self.ref = wrap_models(
            self.policy, self.ref, self.env, device=self.device, compute_dtype=self.precision.compute
        )
        # Sampling reads every weight per token: from a bf16 copy, not the fp32 master weights. FSDP gathers
        # bf16 weights for the rollout anyway, and a LoRA base is bf16 already.
        self.sampling_weights = (
            SamplingWeights(self.model, self.precision.compute)
            if mixed and not self.lora and not self.env.fsdp
            else None
        )
        if c.beta > 0 and self.lora:
            # The KL reference is the base model: the (wrapped) policy with its adapters off, no second copy.
            self.ref = AdaptersDisabled(self.policy, self.model)
        require_decode_impl(
            c.decode_impl, self.model, self.device, self.precision.compute, c.maximum_sequence_length
        )
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer, self.scheduler = build_optimizer(
            params, c, total_updates=self.total_steps * c.num_iterations * c.mini_batches
        )
        self.generator = torch.Generator(device=self.device).manual_seed(c.seed + 1000 * self.env.rank)
        self.updates = PolicyUpdate(
            c,
            env=self.env,
            device=self.device,
            policy=self.policy,
            model=self.model,
            optimizer=self.optimizer,
            scheduler=self.scheduler,
            loss=self.loss,
            shared_prefix=shared_prefix,
            old_from_first_update=old_from_first_update,
        )

    def sampling_model(self) -> torch.nn.Module:
        """The model the rollout and evaluation decode with: the policy, or its bf16 copy under bf16-mixed."""
        return self.model if self.sampling_weights is None else self.sampling_weights.refresh()

    # ---------------------------------------------------------------- one step
    def rollout(self, batch: list[int]) -> tuple[Rollout, list[str], list[str], list[dict[str, Any]]]:
        c = self.config
        prompts = [self.prompts[i] for i in batch]
        engine = None if self.engine is None else self.engine.sampler(version=self.step)  # else our decoder
        with full_params(self.policy):  # FSDP: gather the sharded weights for sampling
            model = self.sampling_model()
            if self.turns is not None:  # tools or an environment: grpo/rollout/multi_turn.py
                ro = self.turns.rollout(
                    model, prompts, c, self.tokenizer, self.eos_ids, self.generator, engine
                )
            else:
                ids, pad = [p.ids for p in prompts], self.tokenizer.pad_token_id
                ro = sample_as_configured(
                    engine or generate, model, ids, c, self.eos_ids, pad, self.generator
                )
        ids = ro.completion_ids.masked_fill(ro.completion_mask == 0, self.tokenizer.pad_token_id)
        prefix = self.template.template.response_prefix  # prefilled in the prompt, but part of the reply
        texts = [prefix + text for text in self.tokenizer.batch_decode(ids, skip_special_tokens=True)]
        if ro.conversations is not None:  # the model's own replies; tool output is in the messages
            texts = [conv.text for conv in ro.conversations]
        refs = [p.reference for p in prompts for _ in range(c.num_generations)]
        rows = [p.row for p in prompts for _ in range(c.num_generations)]
        return ro, texts, refs, rows

    def sample_round(self, timings: dict[str, float]) -> Samples:
        """One batch of prompts: rollout, decoding, rewards."""
        t0 = time.perf_counter()
        batch = self.sampler.next_batch()
        ro, texts, refs, rows = self.rollout(batch)
        t1 = time.perf_counter()
        expanded = [self.prompts[i] for i in batch for _ in range(self.config.num_generations)]
        inputs = rw.RewardInputs.of(
            expanded,
            ro.trained_mask.sum(-1).tolist(),  # the tokens the model wrote
            tags=self.tags,
            max_completion_length=self.config.maximum_completion_length,
            completions=texts,
            conversations=ro.conversations,
        )
        scores = rw.score(self.rewards, texts, refs, **inputs.as_kwargs())  # [N, R]
        total = (scores * torch.tensor([r.weight for r in self.rewards])).sum(dim=1)  # [N]
        timings["time/rollout_s"] += t1 - t0
        timings["time/reward_s"] += time.perf_counter() - t1
        return Samples(batch, ro, texts, refs, rows, scores, total)

    def sample_step(self, timings: dict[str, float]) -> tuple[Samples, Samples, dict[str, float]]:
        """(the first round, the batch to train on, sampling metrics). Without dynamic_sampling both are the
        same single round; with it, see grpo/rollout/dynamic_sampling.py."""
        c = self.config
        if not c.dynamic_sampling:
            first = self.sample_round(timings)
            return first, first, {"tokens": first.rollout.num_completion_tokens}
        return fill_batch(
            lambda: self.sample_round(timings),
            batch_size=c.batch_size,
            max_rounds=c.dynamic_sampling_max_rounds,
            pad_id=self.tokenizer.pad_token_id,
            any_rank=lambda flag: any_over_ranks(flag, self.env),
            mini_batches=c.mini_batches,
        )

    def train_step(self) -> tuple[dict[str, float], list[dict[str, Any]]]:
        c, timings = self.config, {"time/rollout_s": 0.0, "time/reward_s": 0.0}
        t0 = time.perf_counter()
        first, step, sampling = self.sample_step(timings)
        ro = step.rollout
        # batch statistics are taken over the samples of all ranks, so they do not depend on the split
        advantages = reward_advantages(
            step.scores,
            torch.tensor([r.weight for r in self.rewards]),
            c.num_generations,
            scale=c.scale_rewards,
            aggregation=c.multi_objective_aggregation,
            total=step.total,
            gather=lambda x: gather_over_ranks(x, self.env),
        ).to(self.device)
        loss_mask = ro.trained_mask.clone()  # tool results and observations are not trained
        if c.mask_truncated_completions:
            loss_mask = loss_mask * (~ro.truncated).long().unsqueeze(-1)
        t2 = time.perf_counter()
        updates = self.updates
        ref = updates.frozen_logprobs(self.ref, ro) if self.ref is not None else None
        n = ro.completion_ids.shape[0]
        size = n // c.mini_batches  # whole prompt groups: mini_batches divides batch_size
        minis = [slice(j, j + size) for j in range(0, n, size)]
        olds, reuse = updates.old_logprobs(ro, minis)
        finish_queued(self.device)
        timings["time/logprob_s"] = time.perf_counter() - t2
        t3, updates.optimizer_seconds = time.perf_counter(), 0.0
        for i in range(c.num_iterations):
            totals = UpdateTotals(self.device)  # the step reports its last pass over the samples
            for j, m in enumerate(minis):
                kept = updates.update(
                    ro.rows(m),
                    advantages[m],
                    loss_mask[m],
                    olds[j],
                    None if ref is None else ref[m],
                    totals,
                    step=self.step + 1,
                    keep_logps=reuse and i == 0 and j == 0,
                )
                olds[j] = kept if kept is not None else olds[j]
        stats = totals.result()
        timings["time/update_s"] = time.perf_counter() - t3
        timings["time/optimizer_s"] = updates.optimizer_seconds  # grad clip + step; the rest is fwd/bwd
        timings["time/fwd_bwd_s"] = timings["time/update_s"] - updates.optimizer_seconds
        step_time = time.perf_counter() - t0
        metrics = {
            **sample_metrics(
                first, self.rewards, c.num_generations, gather_over_ranks(first.total, self.env)
            ),
            **stats,
            "prompt/truncated": float(sum(self.prompts[i].truncated for i in step.prompts)),
            "learning_rate": self.scheduler.get_last_lr()[0],
            "skipped_steps": float(updates.skipped_steps),
            "tokens_per_s": sampling.pop("tokens") / max(timings["time/rollout_s"], 1e-9),
            **sampling,
            "time/step_s": step_time,
            **timings,
            **peak_memory_metric(self.device),
        }
        samples = sample_records(step, self.prompts, self.rewards, c.num_generations)
        return metrics, samples

    # ---------------------------------------------------------------- the run
    def train(self) -> Path:
        c, env = self.config, self.env
        logger = None
        if env.is_main:
            notes = [f"warning: {note}" for note in self.resume_notes + config_warnings(self.template)]
            if self.resumed_from is not None:
                notes.append(f"Resumed from {self.resumed_from} at step {self.step}")
            notes += [n for n in (self.rows_note, self.turns and self.turns.note) if n]  # dropped rows; tools
            if self.dropped_prompts:
                limit = c.maximum_sequence_length - c.maximum_completion_length
                notes.append(
                    f"Dropped {self.dropped_prompts} of {self.dropped_prompts + len(self.prompts)} prompts "
                    f"longer than {limit} tokens (long_prompts: drop)"
                )
            logger = open_run_log(self.output_dir, self.template, self.total_steps, self.step, notes)
        handlers = {signal.SIGTERM: self._request_stop, signal.SIGINT: self._interrupt}
        previous = {sig: signal.signal(sig, handler) for sig, handler in handlers.items()}
        try:
            while self.step < self.total_steps and not self.stop_requested:
                metrics, samples = self.train_step()
                self.step += 1
                if sync_due(self.step, c.ref_model_sync_steps):  # TR-DPO: the reference follows the policy
                    mix_into_reference(self.model, self.synced_reference(), c.ref_model_mixup_alpha)
                if self.engine is not None:  # the next rollout samples from the weights this step made
                    self.engine.push(self.model, version=self.step)
                metrics = reduce_over_ranks(metrics, env)
                self.stop_requested = any_over_ranks(self.stop_requested, env)  # all ranks stop together
                if c.eval_steps > 0 and (self.step % c.eval_steps == 0 or self.step == self.total_steps):
                    result = self.evaluation.run(self.step, self.sampling_model(), self.policy)
                    if result is not None:
                        metrics.update(result.metrics())  # logged with this step under eval/
                    if c.save_best:
                        self.evaluation.keep_best(self.step, result, self.model)
                if logger is not None:
                    metrics["epoch"] = (
                        self.sampler.epoch + self.sampler.position / self.sampler.steps_per_epoch
                    )
                    logger.log(self.step, metrics)
                    if self.step % c.logging_steps == 0:
                        logger.log_samples(self.step, samples)
                if c.save_steps > 0 and (self.step % c.save_steps == 0 or self.stop_requested):
                    progress = ckpt.Progress(self.step, self.updates.skipped_steps, self.updates.entropy_coef)
                    ckpt.save_checkpoint(self.checkpoint_parts(), progress)  # a stopped run can resume too
            final = self.output_dir / c.adaptor_name
            state = full_state_dict(self.model, env)  # FSDP: gathered to rank 0 (every rank takes part)
            if env.is_main:
                with naming_full_disk("the final model", self.output_dir):
                    ckpt.write_model(self.template, self.model, self.tokenizer, final, state)
                if logger is not None:
                    logger.write(
                        f"{'Stopped' if self.stop_requested else 'Finished'} at step {self.step}; "
                        f"model saved to {final}"
                    )
            if c.eval_steps > 0:
                self.evaluation.write_final(
                    self.step,
                    final,
                    logger,
                    evaluate_now=not self.stop_requested,
                    sampling_model=self.sampling_model(),
                    policy=self.policy,
                )
            return final
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            if self.engine is not None:  # a vLLM server is free for the next run
                self.engine.close()
            if logger is not None:
                logger.close()

    def checkpoint_parts(self) -> ckpt.RunParts:
        """What a checkpoint saves: the trainer's attributes of the same names, and the synced reference."""
        names = [f.name for f in dataclasses.fields(ckpt.RunParts) if f.name != "reference"]
        return ckpt.RunParts(
            **{name: getattr(self, name) for name in names}, reference=self.synced_reference()
        )

    def synced_reference(self) -> torch.nn.Module | None:
        """The reference model when it follows the policy (ref_model_sync_steps > 0), else None."""
        return self.ref.model if self.config.ref_model_sync_steps > 0 and self.ref is not None else None

    def _request_stop(self, signum: int, frame: Any) -> None:
        self.stop_requested = True  # finish the step in flight, then save and leave

    def _interrupt(self, signum: int, frame: Any) -> None:
        """Ctrl-C: the first press stops like SIGTERM (finish the step, save, leave); a second one aborts."""
        if self.stop_requested:
            raise KeyboardInterrupt
        self.stop_requested = True
        if self.env.is_main:
            say_line("\nCtrl-C: stopping after this step and saving the model; press Ctrl-C again to abort.")
