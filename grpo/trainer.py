"""The GRPO loop: sample -> score -> advantages -> num_iterations x mini-batch updates -> log / save.

Everything a step needs is built once in `GRPOTrainer.__init__` (cheap checks first, then the heavy loads), so
`train()` reads as the algorithm; the updates themselves are in grpo/update.py. One step = one batch of
prompts sampled G times; each step makes `num_iterations` passes over those samples, each pass one optimizer
update per mini-batch.
"""

from __future__ import annotations

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
from grpo.data import PromptSampler, training_prompts
from grpo.eval.evaluate import load_eval_prompts
from grpo.eval.train_eval import TrainingEval, best_accuracy_so_far
from grpo.loss_choice import resolve_loss
from grpo.model.build import build_models, prepare_device
from grpo.model.loading import (
    load_tokenizer,
    resolve_device,
    stop_token_ids,
)
from grpo.model.precision import resolve_precision
from grpo.model.reference_sync import mix_into_reference, sync_due
from grpo.parallel.collectives import any_over_ranks, gather_over_ranks, reduce_over_ranks
from grpo.parallel.launch import DistEnv, init_distributed
from grpo.parallel.wrapping import full_state_dict
from grpo.rollout.generate import SamplingSettings
from grpo.rollout.pipeline import start_pipeline
from grpo.rollout.registry import check_sampler, connect_sampler, start_sampler
from grpo.rollout.step_sampling import StepSampling
from grpo.rollout.turns.multi_turn import MultiTurn
from grpo.run import checkpoint as ckpt
from grpo.run.cli_common import say_line
from grpo.run.logger import finish_queued, peak_memory_metric
from grpo.run.run_dir import claim_run_dir, naming_full_disk, open_run_log
from grpo.run.step_report import sample_metrics, sample_records
from grpo.update import PolicyUpdate


def training_eval(
    template: Template, env: DistEnv, tokenizer: Any, rewards: list[rw.Reward], tags: rw.Tags, turns: Any
) -> TrainingEval:
    """The run's held-out evaluations: the prompts built once, on rank 0 only (the others wait at a barrier)."""
    c = template.config
    evaluates = c.eval_steps > 0 and env.is_main
    prompts = load_eval_prompts(template, tokenizer, limit=c.eval_limit) if evaluates else []
    return TrainingEval(
        template, env, Path(c.output_dir), tokenizer, prompts, rewards=rewards, tags=tags, turns=turns
    )


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
        check_sampler(c, self.device, self.env.world_size)  # rollout_engine vllm: the package, devices
        self.server = connect_sampler(template, Path(c.output_dir), self.env)  # vllm_mode server: up and free
        prepare_device(c, self.device)
        self.output_dir = Path(c.output_dir)
        claim_run_dir(self.output_dir, is_main=self.env.is_main)  # writable, and no other run in it
        resume_paths = ckpt.checked_resume_paths(template, self.output_dir, self.env.world_size)
        self.tokenizer = load_tokenizer(template.model)
        turns = self.turns  # the tools go to the chat template, or into the system prompt
        tools = {"tools": turns.schemas, "system_text": turns.system_text(self.tokenizer)} if turns else {}
        self.prompts, self.dropped_prompts, self.rows_note = training_prompts(
            template, self.tokenizer, **tools
        )
        self.sampler = PromptSampler.for_run(len(self.prompts), c, self.env)
        self.total_steps = (
            c.max_steps if c.max_steps > 0 else self.sampler.steps_per_epoch * c.num_train_epochs
        )
        self.evaluation = training_eval(
            template, self.env, self.tokenizer, self.rewards, self.tags, self.turns
        )
        self._build_models()
        self.step, self.stop_requested, self.eos_ids = 0, False, stop_token_ids(self.model, self.tokenizer)
        self.resumed_from, self.resume_notes, self.pipeline, self.drawn_ahead = None, [], None, None
        if resume_paths:
            self._resume(resume_paths)
        self._start_sampling()  # the sampler holds this step's weights (the restored ones on a resume)

    def _resume(self, paths: list[Path]) -> None:
        """Restore the newest checkpoint that loads, in place, and the counters the updates keep."""
        c = self.config
        progress, self.resumed_from, self.resume_notes = ckpt.resume_newest_loadable(
            self.checkpoint_parts(),
            paths,
            force=c.force_resume,
            explicit=c.resume_from_checkpoint != "latest",
        )
        self.step, self.updates.skipped_steps = progress.step, progress.skipped_steps
        self.drawn_ahead = progress.drawn  # async_level: the batches the interrupted run had drawn ahead
        if c.use_adaptive_entropy and progress.entropy_coef is not None:
            self.updates.entropy_coef = progress.entropy_coef  # where the interrupted run had steered it
        # save_best: a resumed run must beat what the interrupted one already kept
        self.evaluation.best_accuracy = best_accuracy_so_far(self.output_dir)

    def _build_models(self) -> None:
        """The heavy part (grpo/model/build.py): policy (+ LoRA), reference, wrapping, optimizer; then the
        sampling generator and the updates."""
        c = self.config
        total_updates = self.total_steps * c.num_iterations * c.mini_batches
        built = build_models(
            self.template, self.env, self.device, self.precision, total_updates=total_updates
        )
        self.model, self.policy, self.ref = built.model, built.policy, built.ref
        self.optimizer, self.scheduler, self.lora = built.optimizer, built.scheduler, built.lora
        self.sampling_weights = built.sampling_weights
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
            shared_prefix=built.shared_prefix,
            old_from_first_update=built.old_from_first_update,
        )

    def _start_sampling(self) -> None:
        """The sampler the config names (grpo/rollout/registry.py), and what a step and an evaluation sample
        with: the same sampler and settings for both."""
        self.rollout_sampler = start_sampler(
            self.template,
            model=self.model,
            policy=self.policy,
            device=self.device,
            dtype=self.precision.compute,
            version=self.step,
            connected=self.server,
            pad_id=self.tokenizer.pad_token_id,
            sampling_weights=self.sampling_weights,
        )
        settings = SamplingSettings.from_config(self.config, self.eos_ids)
        self.evaluation.settings = settings
        parts = (self.env, self.prompts, self.sampler, self.tokenizer, self.rewards, self.tags, self.turns)
        self.sampling = StepSampling(self.template, *parts, self.rollout_sampler, settings, self.generator)
        self.pipeline = self.sampling.pipeline = start_pipeline(  # async_level, rollout_process
            self.template,
            model=self.model,
            sampler=self.rollout_sampler,
            generator=self.generator,
            version=self.step,
            rank=self.env.rank,
            pad_id=self.tokenizer.pad_token_id,
            dtype=self.precision.compute,
            restored=self.drawn_ahead,
            order=self.sampler,
            prompts=self.prompts,
            settings=settings,
            num_generations=self.config.num_generations,
            device=self.device,
            total_steps=self.total_steps,
        )

    # ---------------------------------------------------------------- one step
    def train_step(self) -> tuple[dict[str, float], list[dict[str, Any]]]:
        c, timings = self.config, {"time/rollout_s": 0.0, "time/reward_s": 0.0}
        t0 = time.perf_counter()
        first, step, sampling = self.sampling.sample_step(timings, version=self.step)
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
        minis = updates.mini_batches(ro.completion_ids.shape[0])
        olds = updates.old_logprobs(ro, minis)
        finish_queued(self.device)
        timings["time/logprob_s"] = time.perf_counter() - t2
        t3, updates.optimizer_seconds = time.perf_counter(), 0.0
        stats = updates.run(ro, advantages, loss_mask, ref, olds, minis, step=self.step + 1)
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
            "tokens_per_s": sampling.pop("tokens")
            / max(sampling.get("time/engine_busy_s", timings["time/rollout_s"]), 1e-9),
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
        started = time.perf_counter()
        try:
            while self.step < self.total_steps and not self.stop_requested:
                metrics, samples = self.train_step()
                self.step += 1
                if sync_due(self.step, c.ref_model_sync_steps):  # TR-DPO: the reference follows the policy
                    mix_into_reference(self.model, self.synced_reference(), c.ref_model_mixup_alpha)
                # the next rollout and evaluation sample from the weights this step made
                if self.pipeline is None:
                    self.rollout_sampler.update_weights(self.model, version=self.step)
                else:  # behind the batches it already asked for (grpo/rollout/pipeline.py)
                    self.pipeline.push(self.model, self.rollout_sampler, version=self.step)
                metrics = reduce_over_ranks(metrics, env)
                metrics["time/elapsed_s"] = (
                    time.perf_counter() - started
                )  # steps per second, weight pushes included
                self.stop_requested = any_over_ranks(self.stop_requested, env)  # all ranks stop together
                if c.eval_steps > 0 and (self.step % c.eval_steps == 0 or self.step == self.total_steps):
                    result = self.evaluation.run(self.step, self.rollout_sampler)
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
                    sampler=self.rollout_sampler,
                )
            return final
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            if self.pipeline is not None:
                self.pipeline.close()
            self.rollout_sampler.close()  # a vLLM server is free for the next run
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
