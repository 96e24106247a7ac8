"""The template fields of the loss: the settings every loss is called with (loss_type, epsilon, beta, ...),
the sample weights on its policy term (rollout correction, off-policy masking), the entropy bonus, and, inherited
from the loss table (grpo/config/loss_table.py), each variant's options. TrainConfig in schema.py inherits them,
so they are config.<name> like every other training field; they live here to keep schema.py readable."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from grpo.config.fields import OFF_OR_MORE, POSITIVE, ZERO_OR_MORE, Check, doc, within
from grpo.config.loss_table import ALLOWED_LOSS_TYPES, VARIANTS, LossOptions


@dataclass
class LossSettings(LossOptions):
    beta: float = doc("KL weight; 0 = no reference model is loaded at all.", default=0.0, check=ZERO_OR_MORE)
    epsilon: float = doc("Lower clip range of the importance ratio.", default=0.2, check=ZERO_OR_MORE)
    epsilon_high: float | None = doc(
        "Upper clip range (null = epsilon).",
        default=None,
        check=Check(lambda v: v is None or v >= 0, "it must be null or 0 or more"),
    )
    loss_type: str = doc(
        f"{'|'.join(VARIANTS)} or package.module:function (grpo/config/loss_table.py, docs/losses.md).",
        default="grpo",
        check=Check(lambda v: v in VARIANTS or ":" in v, ALLOWED_LOSS_TYPES),
    )
    importance_sampling_level: Literal["token", "sequence"] = doc(
        "token (GRPO) or sequence (GSPO).", default="token"
    )
    top_entropy_quantile: float = doc(
        "Apply the policy term only to the tokens whose entropy is in this top share of the step's tokens "
        "(arXiv:2506.01939 kept 0.2); 1.0 = every token.",
        default=1.0,
        check=within(0, 1, low_open=True),
    )
    entropy_coef: float = doc(
        "Entropy bonus: subtract entropy_coef x the mean entropy of the loss tokens (of all ranks) from the loss, "
        "which slows the collapse of exploration; 0 = off (entropy is then only a metric, without gradient).",
        default=0.0,
        check=OFF_OR_MORE,
    )
    use_adaptive_entropy: bool = doc(
        "Adaptive entropy control (Skywork-OR1): after each update the entropy coefficient (from entropy_coef) "
        "moves by entropy_coef_delta, up while the entropy is below entropy_target, down while above.",
        default=False,
    )
    entropy_target: float = doc("use_adaptive_entropy: the entropy to steer to.", default=0.2, check=POSITIVE)
    entropy_coef_delta: float = doc(
        "use_adaptive_entropy: the move per update.", default=0.005, check=POSITIVE
    )
    entropy_coef_min: float = doc(
        "use_adaptive_entropy: the lowest coefficient.", default=0.0, check=ZERO_OR_MORE
    )
    entropy_coef_max: float = doc(
        "use_adaptive_entropy: the highest coefficient.", default=1.0, check=ZERO_OR_MORE
    )
    rollout_is_cap: float = doc(
        "Truncated importance sampling of the rollout: weight each token's policy term by min(pi_train / "
        "pi_rollout, cap), pi_rollout being the decode path's probability of the drawn token and pi_train the "
        "training forward's, which differ numerically (bf16, CUDA graphs, packed kernels); 0 = off (2 is usual).",
        default=0.0,
        check=Check(lambda v: v == 0 or v >= 1, "it must be 0 (off) or at least 1"),
    )
    vllm_importance_sampling_correction: bool = doc(
        "Weight the policy term by the importance ratio training / decode path, as the mode says (TRL's names; "
        "grpo/off_policy.py); rollout_is_cap is its token_truncate form.",
        default=False,
    )
    vllm_importance_sampling_mode: Literal[
        "token_truncate", "token_mask", "sequence_truncate", "sequence_mask"
    ] = doc(
        "Per token or per sequence; clamped to [clip_min, clip_max], or 0 outside it.",
        default="sequence_mask",
    )
    vllm_importance_sampling_clip_max: float = doc(
        "Upper bound of the ratio.", default=3.0, check=Check(lambda v: v >= 1, "it must be at least 1")
    )
    vllm_importance_sampling_clip_min: float | None = doc(
        "Lower bound of the ratio (null = none).",
        default=None,
        check=Check(lambda v: v is None or 0 <= v < 1, "it must be null or in [0, 1)"),
    )
    off_policy_mask_threshold: float | None = doc(
        "Mask sequences with A < 0 and mean log(pi_sampling / pi) above this (DeepSeek-V3.2); null = off.",
        default=None,
        check=Check(lambda v: v is None or v > 0, "it must be null (off) or positive"),
    )
    mask_truncated_completions: bool = doc(
        "Exclude completions cut at the length limit from the loss.", default=False
    )
