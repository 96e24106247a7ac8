"""One optimizer update on a step's samples: micro-batched log-probs -> policy loss -> backward -> clip ->
AdamW -> LR, and the no-grad log-prob passes (reference, old policy) the loss compares against.

`PolicyUpdate` runs the math on samples already drawn, with the parts the trainer built handed to it explicitly:
the config, the (wrapped) policy and its model, the optimizer and schedule, the loss, the ranks and the device.
"""

from __future__ import annotations

import inspect
import time
from dataclasses import dataclass
from typing import Any

import torch

from grpo.config import TrainConfig
from grpo.errors import ConfigError, NonFiniteError
from grpo.loss import (
    LOSS_TYPES,
    PRESETS,
    REDUCTIONS,
    UpdateScale,
    adaptive_entropy_coef,
    rollout_gap,
    rollout_is_weights,
    rollout_mismatch_kl,
    token_terms,
)
from grpo.model.logprobs import CompletionLogprobs
from grpo.off_policy import off_policy_sequence_mask, rollout_correction_weights
from grpo.parallel.collectives import any_over_ranks, gather_over_ranks, sum_over_ranks
from grpo.parallel.launch import DistEnv
from grpo.parallel.wrapping import grad_sync
from grpo.rewards.scoring import resolve_function
from grpo.rollout.generate import Rollout
from grpo.run.logger import finish_queued
from grpo.run.update_totals import UpdateTotals


@dataclass(frozen=True)
class LossChoice:
    """The loss a template names: a built-in's per-token objective or a user function, and its reduction
    (grpo/loss.py)."""

    fn: Any  # the user function; None for a built-in
    objective: str | None  # the built-in's per-token objective; None for a user function
    reduction: str


def loss_keywords(c: TrainConfig) -> list[str]:
    """The keyword arguments a user loss is called with under this config (see PolicyUpdate.loss_terms)."""
    names = ["loss_type", "max_completion_length", "num_items_in_batch", *fixed_loss_settings(c)]
    names += [*loss_options(c), *(["token_weights"] if weighs_samples(c) else [])]
    return names + (["token_mask"] if c.top_entropy_quantile < 1 else [])


def weighs_samples(c: TrainConfig) -> bool:
    """Whether the policy term gets token_weights: rollout correction or off-policy sequence masking."""
    correction = c.rollout_is_cap > 0 or c.vllm_importance_sampling_correction
    return correction or c.off_policy_mask_threshold is not None


# Variant settings a loss is called with only when set away from their defaults (grpo/loss.py token_terms).
VARIANT_OPTIONS = {
    "sapo_temperature_pos": 1.0,
    "sapo_temperature_neg": 1.05,
    "use_bias_correction_kl": False,
    **{"vespo_k_pos": 2.0, "vespo_lambda_pos": 3.0, "vespo_k_neg": 3.0, "vespo_lambda_neg": 2.0},
}


def fixed_loss_settings(c: TrainConfig) -> dict[str, Any]:
    return {
        "epsilon": c.epsilon,
        "epsilon_high": c.epsilon_high,
        "beta": c.beta,
        "importance_sampling_level": c.importance_sampling_level,
    }


def loss_options(c: TrainConfig) -> dict[str, Any]:
    """Settings passed only when they differ from the default, so a user loss need not know them."""
    options: dict[str, Any] = {"kl_estimator": c.kl_estimator} if c.kl_estimator != "k3" else {}
    if c.delta is not None:
        options["delta"] = c.delta
    for name, default in VARIANT_OPTIONS.items():
        if getattr(c, name) != default:
            options[name] = getattr(c, name)
    return options


def resolve_loss(c: TrainConfig) -> LossChoice:
    """The loss config.loss_type names: a built-in preset, or a user function with its declared reduction
    whose signature takes what the trainer passes (checked now, not after the first rollout)."""
    loss_type = c.loss_type
    if ":" in loss_type:
        fn = resolve_function(loss_type, field="config.loss_type")
        reduction = getattr(fn, "reduction", None)
        if reduction not in REDUCTIONS:
            raise ConfigError(
                f"config.loss_type = {loss_type!r} does not declare its reduction: decorate it with "
                f"@grpo.loss.reduced_by(NAME), NAME one of {', '.join(REDUCTIONS)} (docs/losses.md)."
            )
        try:
            inspect.signature(fn).bind(*[None] * 5, **dict.fromkeys(loss_keywords(c)))
        except TypeError as e:
            raise ConfigError(
                f"config.loss_type = {loss_type!r} cannot be called as a loss ({e}): it must take (logps, "
                "old_logps, ref_logps, advantages, mask, **kwargs) (docs/losses.md)."
            ) from None
        return LossChoice(fn, None, reduction)
    if loss_type not in LOSS_TYPES:
        raise ConfigError(
            f"config.loss_type = {loss_type!r} is not allowed: use one of "
            f"{', '.join(LOSS_TYPES)} or package.module:function."
        )
    objective, reduction = PRESETS[loss_type]
    return LossChoice(None, objective, reduction)


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
        self.shared_prefix = shared_prefix  # each distinct prompt runs once in the log-prob passes
        self.old_from_first_update = old_from_first_update  # no dropout: the first forward is the old policy
        self.skipped_steps = 0  # non-finite steps skipped (skip_nonfinite_steps)
        self.optimizer_seconds = 0.0  # grad clipping + optimizer step, summed until the trainer resets it
        self.entropy_coef = (
            config.entropy_coef
        )  # steered towards entropy_target after each update (use_adaptive_entropy)

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

    def old_logprobs(self, ro: Rollout, minis: list[slice]) -> tuple[list[torch.Tensor | None], bool]:
        """The sampling policy's log-probs per mini-batch (None: not needed, or still to come) and whether the
        first update's forward provides mini-batch 0's. Only the first update runs before any weight changes,
        so its forward gives those log-probs, unless dropout makes that forward random; the other mini-batches
        need one no-grad pass before the updates."""
        c = self.config
        if c.num_iterations == 1 and len(minis) == 1:
            return [None], False  # a single on-policy update: the ratio is 1 by construction
        reuse = self.old_from_first_update
        frozen = minis[1:] if reuse else minis
        olds: list[torch.Tensor | None] = [None] * (len(minis) - len(frozen))
        if frozen:  # one pass over the rows of those mini-batches, split back
            start = frozen[0].start
            later = self.frozen_logprobs(self.policy, ro.rows(slice(start, minis[-1].stop)))
            olds += [later[m.start - start : m.stop - start] for m in frozen]
        return olds, reuse

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
        """One optimizer update over all micro-batches of the rows in `ro` (a step's samples or one mini-batch
        of them); its metrics are added to `totals`. Returns, with keep_logps, the log-probs its forward
        computed [N, T] (detached), else None."""
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
        slices, kept = self.micro_batches(n), []
        finite = torch.ones((), dtype=torch.bool, device=self.device)
        # passed only when set, so user losses written for the base signature need not take them
        options = loss_options(c)
        coef, entropy_sum = self.entropy_coef, torch.zeros((), device=self.device)
        for s in slices:
            with grad_sync(self.policy, last=s is slices[-1]):
                logps, entropy = self.policy(
                    *self.logprob_inputs(ro, s), return_entropy=True, entropy_grad=coef > 0
                )
                if keep_logps:
                    kept.append(logps.detach())
                extra, mask = dict(options), loss_mask[s].bool()
                entropy_sum = entropy_sum + (entropy.detach() * ro.trained_mask[s]).sum()
                totals.add_tokens({"entropy": (entropy.detach() * ro.trained_mask[s]).sum()})
                weights = self.sample_weights(ro, s, logps, old, advantages[s], loss_mask[s], totals)
                if weights is not None:
                    extra["token_weights"] = weights
                if c.top_entropy_quantile < 1:
                    extra["token_mask"], threshold = self.high_entropy_tokens(entropy.detach(), mask)
                    totals.thresholds.append(threshold)
                loss, stats = self.loss_terms(logps, old, ref, advantages, loss_mask, s, scale, extra)
                objective = loss
                if coef > 0:  # a token mean over this update's loss tokens of all ranks
                    objective = objective - coef * scale.token_mean(entropy, loss_mask[s])
                objective.backward()
            # the logged loss is the policy loss this update minimises (without any entropy bonus): its
            # micro-batches' shares summed, as one process would compute it
            totals.add_rows({"loss": loss.detach() * n / (s.stop - s.start)}, s.stop - s.start)
            totals.add_rows(stats, s.stop - s.start)
            finite &= torch.isfinite(
                torch.stack([torch.as_tensor(v, device=self.device).float() for v in (loss, *stats.values())])
            ).all()
        totals.count_tokens(ro.trained_mask, n)
        if c.use_adaptive_entropy:
            self.steer_entropy(entropy_sum, ro.trained_mask, totals, n)
        first_logps = torch.cat(kept) if kept else None
        if any_over_ranks(not bool(finite), self.env) and not self._skip_nonfinite(
            f"Non-finite loss at step {step}: {totals.result()}."
        ):
            return first_logps
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
            return first_logps
        self.optimizer.step()
        # Free the gradients now, so the next rollout runs without a model's worth of them.
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        finish_queued(self.device)
        self.optimizer_seconds += time.perf_counter() - t_opt
        return first_logps

    def sample_weights(
        self,
        ro: Rollout,
        s: slice,
        logps: torch.Tensor,
        old: torch.Tensor | None,
        advantages: torch.Tensor,
        loss_mask: torch.Tensor,
        totals: UpdateTotals,
    ) -> torch.Tensor | None:
        """The factor [b, T] on micro-batch s's policy term (grpo/off_policy.py), or None: rollout correction
        and off-policy sequence masking, multiplied; their metrics are added to totals."""
        c, weights = self.config, None
        before = logps.detach() if old is None else old[s]  # the policy before this step's updates
        if ro.sampling_logps is not None:
            # the policy before this step's updates against the decode path that drew the tokens
            gap = rollout_gap(before, ro.sampling_logps[s], ro.trained_mask[s])
            totals.add_tokens({"rollout/mismatch_kl": rollout_mismatch_kl(gap)})
            totals.add_max("rollout/mismatch_max", gap.abs().max())
            if c.rollout_is_cap > 0:
                weights = rollout_is_weights(gap, c.rollout_is_cap)
            elif c.vllm_importance_sampling_correction:
                completion = ro.trained_mask[s]  # the metrics are means over completion tokens, like entropy
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
            sampler = ro.sampling_logps[s] if ro.sampling_logps is not None else before
            keep = off_policy_sequence_mask(
                logps.detach(), sampler, advantages, loss_mask, c.off_policy_mask_threshold
            )  # [b, 1]
            totals.add_rows({"off_policy/masked": 1.0 - keep.mean()}, s.stop - s.start)
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

    def loss_terms(
        self,
        logps: torch.Tensor,
        old: torch.Tensor | None,
        ref: torch.Tensor | None,
        advantages: torch.Tensor,
        loss_mask: torch.Tensor,
        s: slice,
        scale: UpdateScale,
        extra: dict[str, Any],
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        """Micro-batch s's share of the rank's loss, and its stats. A built-in runs its per-token objective; a
        user function returns per-token terms [b, T] or a scalar of its declared reduction."""
        c = self.config
        args = (
            logps,
            None if old is None else old[s],
            None if ref is None else ref[s],
            advantages[s],
            loss_mask[s],
        )
        settings = {**fixed_loss_settings(c), **extra}
        if self.loss.objective is not None:
            terms, stats = token_terms(*args, objective=self.loss.objective, **settings)
            return scale.of_terms(terms, loss_mask[s]), stats
        out, stats = self.loss.fn(
            *args,
            loss_type=c.loss_type,
            max_completion_length=c.maximum_completion_length,
            num_items_in_batch=scale.global_tokens,
            **settings,
        )
        if out.dim() == 2:
            return scale.of_terms(out, loss_mask[s]), stats
        return scale.of_scalar(out, loss_mask[s]), stats

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
