"""The updates of one step on its samples: each micro-batch's forward, loss and backward (`micro_step`), the
optimizer step with its finiteness check and clipping (`optimizer_step`), and the no-grad log-prob passes
(reference, old policy) the loss compares against.

A step's rows are split into `mini_batches` (one optimizer update each, `num_iterations` passes over them), and
each mini-batch into micro-batches of `micro_batch_size` rows (one forward and backward each, the gradients
summed). `PolicyUpdate` runs the math on samples already drawn, with the parts the trainer built handed to it:
the config, the (wrapped) policy and its model, the optimizer and schedule, the loss, the ranks and the device.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch

from grpo.config import TrainConfig
from grpo.errors import NonFiniteError
from grpo.loss import (
    UpdateScale,
    adaptive_entropy_coef,
    rollout_gap,
    rollout_is_weights,
    rollout_mismatch_kl,
)
from grpo.loss_choice import LossChoice, loss_options
from grpo.model.logprobs import CompletionLogprobs
from grpo.off_policy import off_policy_sequence_mask, rollout_correction_weights
from grpo.parallel.collectives import any_over_ranks, gather_over_ranks, sum_over_ranks
from grpo.parallel.launch import DistEnv
from grpo.parallel.wrapping import grad_sync
from grpo.rollout.generate import Rollout
from grpo.run.logger import finish_queued
from grpo.run.update_totals import UpdateTotals


@dataclass(frozen=True)
class MicroBatch:
    """One micro-batch of an update, sliced once: b rows, T completion tokens."""

    inputs: tuple[torch.Tensor, ...]  # CompletionLogprobs' arguments (PolicyUpdate.logprob_inputs)
    advantages: torch.Tensor  # [b]
    loss_mask: torch.Tensor  # [b, T] the tokens the loss trains
    trained_mask: torch.Tensor  # [b, T] the tokens the model wrote: the token metrics count these
    old: torch.Tensor | None  # [b, T] the policy before this step's updates; None: this forward is it
    ref: torch.Tensor | None  # [b, T] the reference policy (beta > 0)
    sampling_logps: torch.Tensor | None  # [b, T] the decode path's own log-probs of the tokens it drew

    @property
    def rows(self) -> int:
        return self.advantages.shape[0]


class OldLogprobs:
    """The policy's log-probs before this step's updates, per mini-batch: what the ratio pi / pi_old divides by.

    This is the one place that decides where they come from. A single on-policy update (num_iterations 1,
    mini_batches 1) needs none: its ratio is 1 by construction. Otherwise the step's first update runs before
    any weight changes, so its own forward gives mini-batch 0's log-probs, unless dropout makes training
    forwards random (LoRA dropout); every other mini-batch's come from one no-grad pass before the updates."""

    def __init__(self, values: list[torch.Tensor | None], *, from_first_forward: bool):
        self.values, self.from_first_forward = values, from_first_forward

    def of(self, mini: int) -> torch.Tensor | None:
        return self.values[mini]

    def keeps(self, iteration: int, mini: int) -> bool:
        """Whether this update's forward is mini-batch 0's old policy, to keep for the later passes."""
        return self.from_first_forward and iteration == 0 and mini == 0

    def keep(self, mini: int, logps: torch.Tensor | None) -> None:
        if logps is not None:
            self.values[mini] = logps


class PolicyUpdate:
    """Optimizer updates on sampled rollouts, and the no-grad log-prob passes they compare against."""

    def __init__(
        self,
        config: TrainConfig,
        *,
        env: DistEnv,
        device: torch.device,
        policy: Any,  # CompletionLogprobs, possibly wrapped by DDP / FSDP
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler,
        loss: LossChoice,
        shared_prefix: bool,
        old_from_first_update: bool,
    ):
        self.config, self.env, self.device = config, env, device
        self.policy, self.model = policy, model
        self.optimizer, self.scheduler = optimizer, scheduler
        self.loss = loss
        self.loss_options = loss_options(config)  # fixed for the run: read once, not per micro-batch
        self.shared_prefix = shared_prefix  # each distinct prompt runs once in the log-prob passes
        self.old_from_first_update = old_from_first_update  # no dropout: the first forward is the old policy
        self.skipped_steps = 0  # non-finite steps skipped (skip_nonfinite_steps)
        self.optimizer_seconds = 0.0  # grad clipping + optimizer step, summed until the trainer resets it
        # steered towards entropy_target after each update (use_adaptive_entropy)
        self.entropy_coef = config.entropy_coef

    def mini_batches(self, n: int) -> list[slice]:
        """The rows of each optimizer update: whole prompt groups, as mini_batches divides batch_size."""
        size = n // self.config.mini_batches
        return [slice(j, j + size) for j in range(0, n, size)]

    def micro_batches(self, n: int) -> list[slice]:
        size = self.config.micro_batch_size or n
        return [slice(i, min(i + size, n)) for i in range(0, n, size)]

    def logprob_inputs(self, ro: Rollout, s: slice) -> tuple[torch.Tensor, ...]:
        """CompletionLogprobs arguments for rows s: each distinct prompt once, unless the backend opts out."""
        if not self.shared_prefix:
            return ro.prompt_ids[s], ro.prompt_mask[s], ro.completion_ids[s], ro.completion_mask[s]
        prompt_ids, prompt_mask, index = ro.prompt_groups(s)
        return prompt_ids, prompt_mask, ro.completion_ids[s], ro.completion_mask[s], index

    def frozen_logprobs(self, module: CompletionLogprobs, ro: Rollout) -> torch.Tensor:
        """Reference / old-policy log-probs [N, T]: no graph, no dropout (a dropout forward is a random sample,
        not the policy's log-prob). inference_mode also skips version counters, but FSDP's parameter
        all-gathers must stay ordinary tensors, so it gets plain no_grad."""
        modes = [(m, m.training) for m in module.modules()]  # a LoRA reference wraps the policy itself
        module.eval()
        try:
            with torch.no_grad() if self.env.fsdp else torch.inference_mode():
                rows = self.micro_batches(ro.completion_ids.shape[0])
                out = torch.cat([module(*self.logprob_inputs(ro, s)) for s in rows])
        finally:
            for m, mode in modes:
                m.training = mode
        return out.clone()  # an ordinary tensor that the loss may save for backward

    def old_logprobs(self, ro: Rollout, minis: list[slice]) -> OldLogprobs:
        """The old policy's log-probs of each mini-batch, as `OldLogprobs` states: the no-grad pass it needs
        runs here, once, over the rows of every mini-batch that does not take them from the first forward."""
        if self.config.num_iterations == 1 and len(minis) == 1:
            return OldLogprobs([None], from_first_forward=False)
        reuse = self.old_from_first_update
        frozen = minis[1:] if reuse else minis
        olds: list[torch.Tensor | None] = [None] * (len(minis) - len(frozen))
        if frozen:  # one pass over the rows of those mini-batches, split back
            start = frozen[0].start
            later = self.frozen_logprobs(self.policy, ro.rows(slice(start, minis[-1].stop)))
            olds += [later[m.start - start : m.stop - start] for m in frozen]
        return OldLogprobs(olds, from_first_forward=reuse)

    def run(
        self,
        ro: Rollout,
        advantages: torch.Tensor,
        loss_mask: torch.Tensor,
        ref: torch.Tensor | None,
        olds: OldLogprobs,
        minis: list[slice],
        *,
        step: int,
    ) -> dict[str, float]:
        """num_iterations passes over the step's samples, one update per mini-batch; the metrics of the last
        pass."""
        for i in range(self.config.num_iterations):
            totals = UpdateTotals(self.device)  # the step reports its last pass over the samples
            for j, m in enumerate(minis):
                batch = (ro.rows(m), advantages[m], loss_mask[m], olds.of(j), None if ref is None else ref[m])
                olds.keep(j, self.update(*batch, totals, step=step, keep_logps=olds.keeps(i, j)))
        return totals.result()

    def micro_slices(
        self,
        ro: Rollout,
        advantages: torch.Tensor,
        loss_mask: torch.Tensor,
        old: torch.Tensor | None,
        ref: torch.Tensor | None,
    ) -> list[MicroBatch]:
        """An update's rows as its micro-batches."""
        sampled, trained = ro.sampling_logps, ro.trained_mask
        return [
            MicroBatch(
                inputs=self.logprob_inputs(ro, s),
                advantages=advantages[s],
                loss_mask=loss_mask[s],
                trained_mask=trained[s],
                old=None if old is None else old[s],
                ref=None if ref is None else ref[s],
                sampling_logps=None if sampled is None else sampled[s],
            )
            for s in self.micro_batches(ro.completion_ids.shape[0])
        ]

    def update(
        self,
        ro: Rollout,
        advantages: torch.Tensor,
        loss_mask: torch.Tensor,
        old: torch.Tensor | None,
        ref: torch.Tensor | None,
        totals: UpdateTotals,
        *,
        step: int,
        keep_logps: bool = False,
    ) -> torch.Tensor | None:
        """One optimizer update over the rows of `ro` (a step's samples or one mini-batch of them); its metrics
        are added to `totals`. Returns, with keep_logps, the log-probs its forward computed [N, T] (detached)."""
        c, n = self.config, ro.completion_ids.shape[0]
        self.optimizer.zero_grad(set_to_none=True)
        scale = UpdateScale(
            reduction=self.loss.reduction,
            rows=n,
            tokens=loss_mask.sum(),
            global_tokens=sum_over_ranks(loss_mask.sum(), self.env),  # dapo: the token count of all ranks
            world_size=self.env.world_size if self.env.enabled else 1,
            max_completion_length=c.maximum_completion_length,
        )
        micro = self.micro_slices(ro, advantages, loss_mask, old, ref)
        finite = torch.ones((), dtype=torch.bool, device=self.device)
        kept, entropy_sum = [], torch.zeros((), device=self.device)
        for mb in micro:
            with grad_sync(self.policy, last=mb is micro[-1]):
                loss, stats, logps, entropy = self.micro_step(mb, scale, totals)
            kept += [logps] if keep_logps else []
            entropy_sum = entropy_sum + entropy
            finite &= torch.isfinite(
                torch.stack([torch.as_tensor(v, device=self.device).float() for v in (loss, *stats.values())])
            ).all()
        totals.count_tokens(ro.trained_mask, n)
        if c.use_adaptive_entropy:
            self.steer_entropy(entropy_sum, ro.trained_mask, totals, n)
        self.optimizer_step(totals, finite, step=step)
        return torch.cat(kept) if kept else None

    def micro_step(
        self, mb: MicroBatch, scale: UpdateScale, totals: UpdateTotals
    ) -> tuple[torch.Tensor, dict[str, Any], torch.Tensor, torch.Tensor]:
        """One micro-batch's forward, loss and backward: (its share of the policy loss, the loss's stats, the
        detached log-probs [b, T], the entropy summed over the tokens the model wrote); metrics go to totals."""
        coef = self.entropy_coef
        logps, entropy = self.policy(*mb.inputs, return_entropy=True, entropy_grad=coef > 0)
        # passed only when set, so user losses written for the base signature need not take them
        extra, mask = dict(self.loss_options), mb.loss_mask.bool()
        entropy_sum = (entropy.detach() * mb.trained_mask).sum()
        totals.add_tokens({"entropy": entropy_sum})
        weights = self.sample_weights(mb, logps, totals)
        if weights is not None:
            extra["token_weights"] = weights
        if self.config.top_entropy_quantile < 1:
            extra["token_mask"], threshold = self.high_entropy_tokens(entropy.detach(), mask)
            totals.thresholds.append(threshold)
        loss, stats = self.loss.terms(logps, mb.old, mb.ref, mb.advantages, mb.loss_mask, scale, extra)
        objective = loss
        if coef > 0:  # a token mean over this update's loss tokens of all ranks
            objective = objective - coef * scale.token_mean(entropy, mb.loss_mask)
        objective.backward()
        # the logged loss is the policy loss this update minimises (without any entropy bonus): its
        # micro-batches' shares summed, as one process would compute it
        totals.add_rows({"loss": loss.detach() * scale.rows / mb.rows}, mb.rows)
        totals.add_rows(stats, mb.rows)
        return loss, stats, logps.detach(), entropy_sum

    def optimizer_step(self, totals: UpdateTotals, finite: torch.Tensor, *, step: int) -> None:
        """The finiteness check over every rank (a non-finite step stops the run, or is skipped with
        skip_nonfinite_steps), gradient clipping, the optimizer step and the schedule."""
        c = self.config
        if any_over_ranks(not bool(finite), self.env) and not self._skip_nonfinite(
            f"Non-finite loss at step {step}: {totals.result()}."
        ):
            return
        t_opt = time.perf_counter()
        params = [p for p in self.model.parameters() if p.requires_grad]
        max_norm = c.max_grad_norm if c.max_grad_norm > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        if hasattr(grad_norm, "full_tensor"):  # FSDP: a DTensor over the shards
            grad_norm = grad_norm.full_tensor()
        totals.grad_norms.append(grad_norm)
        if not torch.isfinite(grad_norm) and not self._skip_nonfinite(
            f"Non-finite gradient norm at step {step}."
        ):
            return
        self.optimizer.step()
        # Free the gradients now, so the next rollout runs without a model's worth of them.
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        finish_queued(self.device)
        self.optimizer_seconds += time.perf_counter() - t_opt

    def sample_weights(
        self, mb: MicroBatch, logps: torch.Tensor, totals: UpdateTotals
    ) -> torch.Tensor | None:
        """The factor [b, T] on the micro-batch's policy term (grpo/off_policy.py), or None: rollout correction
        and off-policy sequence masking, multiplied; their metrics are added to totals."""
        c, weights = self.config, None
        before = logps.detach() if mb.old is None else mb.old  # the policy before this step's updates
        if mb.sampling_logps is not None:
            # the policy before this step's updates against the decode path that drew the tokens
            gap = rollout_gap(before, mb.sampling_logps, mb.trained_mask)
            totals.add_tokens({"rollout/mismatch_kl": rollout_mismatch_kl(gap)})
            totals.add_max("rollout/mismatch_max", gap.abs().max())
            if c.rollout_is_cap > 0:
                weights = rollout_is_weights(gap, c.rollout_is_cap)
            elif c.vllm_importance_sampling_correction:
                completion = mb.trained_mask  # the metrics are means over completion tokens, like entropy
                weights, masked = rollout_correction_weights(
                    gap,
                    completion,
                    mode=c.vllm_importance_sampling_mode,
                    high=c.vllm_importance_sampling_clip_max,
                    low=c.vllm_importance_sampling_clip_min,
                )
                counted = completion.to(weights.dtype)
                totals.add_tokens(
                    {"rollout/is_masked": masked.sum(), "rollout/is_weight_mean": (weights * counted).sum()}
                )
                outside = ~completion.bool()
                totals.add_max("rollout/is_weight_max", weights.masked_fill(outside, 0.0).max())
                totals.add_min("rollout/is_weight_min", weights.masked_fill(outside, float("inf")).min())
        if c.off_policy_mask_threshold is not None:
            sampler = mb.sampling_logps if mb.sampling_logps is not None else before
            keep = off_policy_sequence_mask(
                logps.detach(), sampler, mb.advantages, mb.loss_mask, c.off_policy_mask_threshold
            )  # [b, 1]
            totals.add_rows({"off_policy/masked": 1.0 - keep.mean()}, mb.rows)
            weights = keep.expand_as(logps) if weights is None else weights * keep
        return weights

    def steer_entropy(
        self, entropy_sum: torch.Tensor, completion_mask: torch.Tensor, totals: UpdateTotals, n: int
    ) -> None:
        """Adaptive entropy control: the coefficient the next update uses, from this update's mean entropy over
        every rank's completion tokens (grpo/loss.py adaptive_entropy_coef); logs the one this update used."""
        c = self.config
        totals.add_rows({"entropy_coef": self.entropy_coef, "entropy_target": c.entropy_target}, n)
        total = sum_over_ranks(torch.stack([entropy_sum, completion_mask.sum().to(entropy_sum)]), self.env)
        entropy = (total[0] / total[1].clamp(min=1.0)).item()
        self.entropy_coef = adaptive_entropy_coef(
            self.entropy_coef,
            entropy,
            target=c.entropy_target,
            delta=c.entropy_coef_delta,
            low=c.entropy_coef_min,
            high=c.entropy_coef_max,
        )

    def high_entropy_tokens(
        self, entropy: torch.Tensor, mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The tokens of this micro-batch whose entropy reaches the top_entropy_quantile share of its tokens on
        all ranks (micro-batch k of every rank together, so the split over ranks does not move the threshold).
        Returns the [B, T] token mask and the threshold (a device scalar, read back with the step's metrics)."""
        values = gather_over_ranks(entropy[mask].float(), self.env)  # every rank's unmasked tokens
        if values.numel() == 0:
            return mask, entropy.new_zeros(())
        threshold = torch.quantile(values, 1.0 - self.config.top_entropy_quantile)
        return mask & (entropy >= threshold), threshold

    def _skip_nonfinite(self, message: str) -> bool:
        """Raise (the run stops, the last checkpoint stays) unless skip_nonfinite_steps; False = skip it."""
        if not self.config.skip_nonfinite_steps:
            raise NonFiniteError(message)
        self.optimizer.zero_grad(set_to_none=True)
        self.skipped_steps += 1
        return False
