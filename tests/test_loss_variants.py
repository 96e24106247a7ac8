"""The research menu (docs/loss-variants.md): each variant against hand-computed values on small tensors, the
identities it must keep, and the default settings leaving today's loss untouched."""

import math
import threading

import pytest
import torch

from grpo.advantages import group_advantages, reward_advantages
from grpo.config import ConfigError, Template, TrainConfig, template_from_dict
from grpo.config.checks import config_warnings
from grpo.loss import (
    adaptive_entropy_coef,
    kl_term,
    policy_loss,
    reduce,
    sapo_objective,
    vespo_objective,
    vespo_weight,
)
from grpo.loss_choice import loss_keywords, loss_options, weighs_samples
from grpo.off_policy import off_policy_sequence_mask, rollout_correction_weights

MASK = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])  # 2 and 3 tokens
ADV = torch.tensor([1.0, -1.0])


def logps_leaf():
    return torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -1.0, -0.25]], requires_grad=True)


# ------------------------------------------------------------------ defaults
def test_the_default_config_passes_no_variant_to_the_loss():
    """Every variant is off by default: the loss is called exactly as before the menu existed."""
    c = TrainConfig()
    assert loss_options(c) == {}
    assert not weighs_samples(c)
    assert loss_keywords(c) == [
        "loss_type",
        "max_completion_length",
        "num_items_in_batch",
        "epsilon",
        "epsilon_high",
        "beta",
        "importance_sampling_level",
    ]
    assert c.multi_objective_aggregation == "sum_then_normalize" and not c.use_adaptive_entropy
    assert not (c.vllm_importance_sampling_correction or c.use_bias_correction_kl or c.cast_lm_head_to_fp32)
    assert c.off_policy_mask_threshold is None


def test_default_loss_and_gradient_on_a_fixed_batch_are_the_clipped_sequence_mean():
    """grpo's loss and gradient, bitwise, against the formula written out: -min(r A, clip(r) A), mean over each
    sequence's tokens, mean over sequences."""
    torch.manual_seed(0)
    mask = (torch.rand(4, 5) > 0.2).float()
    adv, old = torch.randn(4), torch.randn(4, 5) - 2
    logps = (old + 0.3 * torch.randn(4, 5)).requires_grad_()
    loss, _ = policy_loss(logps, old, None, adv, mask)
    loss.backward()
    x = logps.detach().clone().requires_grad_()
    ratio = torch.exp(x - old)
    a = adv.unsqueeze(-1)
    terms = -torch.min(ratio * a, torch.clamp(ratio, 0.8, 1.2) * a)
    expected = ((terms * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    expected.backward()
    assert torch.equal(loss.detach(), expected.detach())
    assert torch.equal(logps.grad, x.grad)


def test_default_advantages_are_todays_group_advantages():
    scores = torch.tensor([[0.0, 2.0], [1.0, 0.5], [3.0, 1.0], [1.0, 1.0]])
    weights = torch.tensor([1.0, 0.5])
    total = (scores * weights).sum(1)
    assert torch.equal(reward_advantages(scores, weights, 2, total=total), group_advantages(total, 2))
    assert torch.equal(reward_advantages(scores, weights, 2), group_advantages(total, 2))


# ------------------------------------------------------------------ SAPO
def test_sapo_hand_values():
    ratio = torch.tensor([[1.0, 1.5], [1.0, 0.5]])
    adv = torch.tensor([[1.0], [-1.0]])
    out, _ = sapo_objective(ratio, adv, temperature_pos=1.0, temperature_neg=1.05)
    sig = 1 / (1 + math.exp(-0.5))
    expected = torch.tensor(
        [
            [-4.0 * 0.5, -4.0 * sig],  # A > 0, tau 1: -(4 / 1) sigmoid(r - 1)
            [(4 / 1.05) * 0.5, (4 / 1.05) / (1 + math.exp(1.05 * 0.5))],  # A < 0, tau 1.05
        ]
    )
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)


def test_sapo_gradient_at_ratio_one_is_the_plain_policy_gradient():
    """On-policy (r = 1) SAPO's gate has slope exactly A, so its gradient equals dapo's: -A m / N."""
    a, b = logps_leaf(), logps_leaf()
    policy_loss(a, None, None, ADV, MASK, loss_type="sapo", num_items_in_batch=5)[0].backward()
    policy_loss(b, None, None, ADV, MASK, loss_type="dapo", num_items_in_batch=5)[0].backward()
    torch.testing.assert_close(a.grad, -ADV[:, None] * MASK / 5, rtol=0, atol=1e-7)
    torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=1e-7)


def test_sapo_gradient_off_policy_is_the_gate_slope():
    """d l / d logp = -4 sigmoid'(tau (r - 1)) r A: at r = e^0.5, A = 1, tau = 1 it is -4 s (1 - s) r."""
    logps = torch.tensor([[0.5]], requires_grad=True)
    loss, stats = policy_loss(
        logps, torch.zeros(1, 1), None, torch.ones(1), torch.ones(1, 1), loss_type="sapo"
    )
    loss.backward()
    r = math.exp(0.5)
    s = 1 / (1 + math.exp(-(r - 1)))
    assert logps.grad.item() == pytest.approx(-4 * s * (1 - s) * r, abs=1e-6)
    # no hard clip to count: the share of the plain gradient -r A kept is logged instead (1 on-policy)
    assert set(stats) == {"kl", "sapo/gradient_kept"}
    assert stats["sapo/gradient_kept"].item() == pytest.approx(4 * s * (1 - s), abs=1e-7)
    on_policy = policy_loss(logps, None, None, torch.ones(1), torch.ones(1, 1), loss_type="sapo")[1]
    assert on_policy["sapo/gradient_kept"].item() == 1.0


# ------------------------------------------------------------------ LUSPO
def test_luspo_sums_each_sequence_then_averages():
    ones = torch.ones(2, 3)
    assert reduce(ones, MASK, "sequence_sum").item() == 2.5  # (2 + 3) / 2
    loss, _ = policy_loss(logps_leaf(), None, None, ADV, MASK, loss_type="luspo")
    assert loss.item() == pytest.approx((-2.0 + 3.0) / 2, abs=1e-7)  # -A x length, averaged


# ------------------------------------------------------------------ VESPO
def test_vespo_hand_values():
    """Sequence 0 (A > 0, k 2, lambda 3) has W = e^0.4 x e^0.29 = 2 (its padding not counted): phi = 4 e^-3;
    sequence 1 (A < 0, k 3, lambda 2) has W = 1/2: phi = e^1 / 8. l = -phi A logp."""
    logps = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -1.0, -0.25]])
    old = logps - torch.tensor([[0.4, math.log(2) - 0.4, 5.0], [-math.log(2), 0.0, 0.0]])
    weight = vespo_weight(logps, old, ADV[:, None], MASK, k=(2.0, 3.0), lam=(3.0, 2.0))
    phi = torch.tensor([[4 * math.exp(-3)], [math.exp(1) / 8]])
    torch.testing.assert_close(weight, phi, rtol=1e-6, atol=0)
    out = vespo_objective(logps, weight, ADV[:, None])
    torch.testing.assert_close(out, -phi * ADV[:, None] * logps, rtol=1e-6, atol=0)
    _, stats = policy_loss(logps, old, None, ADV, MASK, loss_type="vespo")
    # the weight's mean over the 5 counted tokens: sequence 0 has 2, sequence 1 has 3
    assert stats["vespo/gradient_kept"].item() == pytest.approx(
        (2 * phi[0, 0] + 3 * phi[1, 0]).item() / 5, rel=1e-6
    )
    assert (
        policy_loss(logps, None, None, ADV, MASK, loss_type="vespo")[1]["vespo/gradient_kept"].item() == 1.0
    )


def test_vespo_on_policy_is_the_plain_policy_gradient():
    """phi(1) = 1 whatever k and lambda: on-policy vespo's gradient is dapo's."""
    a, b = logps_leaf(), logps_leaf()
    policy_loss(a, None, None, ADV, MASK, loss_type="vespo", num_items_in_batch=5, vespo_k_neg=7.0)[
        0
    ].backward()
    policy_loss(b, None, None, ADV, MASK, loss_type="dapo", num_items_in_batch=5)[0].backward()
    torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=1e-7)


def test_vespo_folds_the_token_weights_into_w_and_a_zero_weight_drops_the_sequence():
    """On-policy (r = 1), token weights 2 and 1 on sequence 0 (A > 0, k 2, lambda 3) make W = 2, so phi = 4 e^-3
    on both its tokens, not the weights 2 and 1 multiplied afterwards; sequence 1 (A < 0) has one weight 0 (a
    token_mask mode's drop), so its W = 0 and phi = 0: the whole sequence drops, its other tokens included. Its
    padding token's weight 0 counts nowhere. dapo over 5 tokens: loss = -(phi0 x 1 x (-1 - 2)) / 5."""
    logps = logps_leaf()
    weights = torch.tensor([[2.0, 1.0, 0.0], [1.0, 0.0, 1.0]])
    loss, stats = policy_loss(
        logps, None, None, ADV, MASK, loss_type="vespo", num_items_in_batch=5, token_weights=weights
    )
    phi0 = 4 * math.exp(-3)
    assert loss.item() == pytest.approx(3 * phi0 / 5, rel=1e-6)
    assert stats["vespo/gradient_kept"].item() == pytest.approx(2 * phi0 / 5, rel=1e-6)  # phi 0 on row 1
    loss.backward()
    expected = torch.tensor([[-phi0 / 5, -phi0 / 5, 0.0], [0.0, 0.0, 0.0]])
    torch.testing.assert_close(logps.grad, expected, rtol=1e-6, atol=0)
    w = vespo_weight(
        logps.detach(), None, ADV[:, None], MASK, k=(2.0, 3.0), lam=(3.0, 2.0), token_weights=weights
    )
    assert w[0, 0].item() == pytest.approx(phi0, rel=1e-6) and w[1, 0].item() == 0.0
    # a clipped objective still multiplies afterwards: grpo weighs token (0, 0) by 2 and drops only token (1, 1)
    a = logps_leaf()
    policy_loss(a, None, None, ADV, MASK, loss_type="grpo", token_weights=weights)[0].backward()
    torch.testing.assert_close(
        a.grad, torch.tensor([[-2 / 4, -1 / 4, 0.0], [1 / 6, 0.0, 1 / 6]]), rtol=0, atol=1e-7
    )


def test_vespo_with_weights_of_one_is_vespo_without_weights():
    """Folding weights of 1 changes nothing, bitwise: off-policy masking that keeps every sequence, or a
    rollout that matches the policy exactly."""
    torch.manual_seed(3)
    logps, old = -torch.rand(2, 3), -torch.rand(2, 3)
    plain, _ = policy_loss(logps, old, None, ADV, MASK, loss_type="vespo")
    ones, _ = policy_loss(logps, old, None, ADV, MASK, loss_type="vespo", token_weights=torch.ones(2, 3))
    assert torch.equal(plain, ones)


# ------------------------------------------------------------------ bias-corrected KL
def test_bias_corrected_kl_on_policy_keeps_the_value_and_adds_the_score_term():
    """r = 1 on-policy, so the value is k3's; the gradient gains k3 x d log pi: per token k3 + 1 - e^d."""
    ref = torch.tensor([[-1.5, -1.0, -3.0], [-0.5, -2.0, -1.0]])
    a, b = logps_leaf(), logps_leaf()
    zero = torch.zeros(2)
    plain, s1 = policy_loss(a, None, ref, zero, MASK, loss_type="bnpo", beta=1.0)
    fixed, s2 = policy_loss(b, None, ref, zero, MASK, loss_type="bnpo", beta=1.0, use_bias_correction_kl=True)
    assert fixed.item() == pytest.approx(plain.item(), abs=1e-7)
    plain.backward()
    fixed.backward()
    d = ref - b.detach()
    k3 = torch.exp(d) - d - 1
    torch.testing.assert_close(a.grad, (1 - torch.exp(d)) * MASK / 5, rtol=0, atol=1e-7)
    torch.testing.assert_close(b.grad, (k3 + 1 - torch.exp(d)) * MASK / 5, rtol=0, atol=1e-7)


def test_bias_corrected_kl_off_policy_weighs_each_token_by_its_ratio():
    logps = torch.tensor([[-1.0, -2.0]])
    old = torch.tensor([[-1.5, -2.0]])  # ratios e^0.5 and 1
    ref = torch.tensor([[-1.2, -2.5]])
    _, stats = policy_loss(
        logps, old, ref, torch.zeros(1), torch.ones(1, 2), beta=0.1, use_bias_correction_kl=True
    )
    k3 = kl_term(logps, ref)
    expected = (math.exp(0.5) * k3[0, 0] + k3[0, 1]) / 2
    assert stats["kl"].item() == pytest.approx(expected.item(), abs=1e-7)


# ------------------------------------------------------------------ GDPO
def test_normalize_then_sum_by_hand():
    """Group 1: both rewards prefer sample 2; group 2: they disagree. Summed first, the reward on the scale of
    100 decides group 2 alone; normalised first, the two cancel there."""
    scores = torch.tensor([[0.0, 0.0], [1.0, 100.0], [1.0, 0.0], [0.0, 100.0]])
    weights = torch.tensor([1.0, 1.0])
    summed = reward_advantages(scores, weights, 2, eps=0.0)
    torch.testing.assert_close(summed, torch.tensor([-1.0, 1.0, -1.0, 1.0]) / math.sqrt(2), rtol=0, atol=1e-6)
    gdpo = reward_advantages(scores, weights, 2, aggregation="normalize_then_sum", eps=0.0)
    # per reward: +-1/sqrt(2) in each group; summed [-sqrt2, sqrt2, 0, 0]; batch std sqrt(4/3)
    c = math.sqrt(1.5)
    torch.testing.assert_close(gdpo, torch.tensor([-c, c, 0.0, 0.0]), rtol=0, atol=1e-6)


def test_normalize_then_sum_with_one_reward_is_todays_advantages_at_unit_batch_std():
    torch.manual_seed(1)
    scores = torch.randn(12, 1)
    today = group_advantages(scores[:, 0], 4, eps=0.0)
    gdpo = reward_advantages(scores, torch.tensor([3.0]), 4, aggregation="normalize_then_sum", eps=0.0)
    torch.testing.assert_close(gdpo, today / today.std(), rtol=0, atol=1e-6)
    # the scale of a reward no longer matters, only the weights between rewards
    rescaled = reward_advantages(
        scores * 100, torch.tensor([1.0]), 4, aggregation="normalize_then_sum", eps=0.0
    )
    torch.testing.assert_close(rescaled, gdpo, rtol=0, atol=1e-5)


def test_normalize_then_sum_does_not_depend_on_the_split_over_ranks():
    """Two ranks with two groups each, their batch statistics gathered (an all-gather between two threads), give
    the one-process advantages."""
    torch.manual_seed(2)
    scores, weights = torch.randn(8, 3) * torch.tensor([1.0, 10.0, 0.1]), torch.tensor([1.0, 0.5, 2.0])
    whole = reward_advantages(scores, weights, 2, aggregation="normalize_then_sum", scale="batch")
    barrier, slots, out = threading.Barrier(2), [None, None], [None, None]

    def rank(r: int) -> None:
        def gather(x):
            slots[r] = x
            barrier.wait()
            both = torch.cat(slots)
            barrier.wait()  # nobody overwrites a slot before both have read
            return both

        mine = scores[4 * r : 4 * r + 4]
        out[r] = reward_advantages(
            mine, weights, 2, aggregation="normalize_then_sum", scale="batch", gather=gather
        )

    threads = [threading.Thread(target=rank, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    torch.testing.assert_close(torch.cat(out), whole, rtol=0, atol=1e-6)
    assert whole.abs().min() > 0.01  # every sample carries a signal: the comparison is not of zeros


# ------------------------------------------------------------------ rollout correction
GAP = torch.log(torch.tensor([[2.0, 0.5, 1.0], [4.0, 1.0, 1.0]])) * MASK  # token ratios 2, 0.5 | 4, 1, 1


@pytest.mark.parametrize(
    "mode, low, weights, masked",
    [
        ("token_truncate", None, [[2.0, 0.5, 1.0], [3.0, 1.0, 1.0]], [[0, 0, 0], [0, 0, 0]]),
        ("token_truncate", 0.6, [[2.0, 0.6, 1.0], [3.0, 1.0, 1.0]], [[0, 0, 0], [0, 0, 0]]),
        ("token_mask", 0.6, [[2.0, 0.0, 1.0], [0.0, 1.0, 1.0]], [[0, 1, 0], [1, 0, 0]]),
        ("sequence_truncate", None, [[1.0, 1.0, 1.0], [3.0, 3.0, 3.0]], [[0, 0, 0], [0, 0, 0]]),
        ("sequence_mask", None, [[1.0, 1.0, 1.0], [0.0, 0.0, 0.0]], [[0, 0, 0], [1, 1, 1]]),
    ],
)
def test_rollout_correction_modes_by_hand(mode, low, weights, masked):
    """clip_max 3: sequence 0's ratio is 2 x 0.5 = 1, sequence 1's is 4; the padding token is never counted masked."""
    w, m = rollout_correction_weights(GAP, MASK, mode=mode, high=3.0, low=low)
    torch.testing.assert_close(w * MASK, torch.tensor(weights) * MASK, rtol=0, atol=1e-6)
    assert m.int().tolist() == masked


def test_token_truncate_is_rollout_is_cap():
    from grpo.loss import rollout_is_weights

    w, _ = rollout_correction_weights(GAP, MASK, mode="token_truncate", high=2.0)
    torch.testing.assert_close(w, rollout_is_weights(GAP, 2.0), rtol=0, atol=1e-7)


def test_rollout_correction_with_bounds_that_hold_everything_changes_nothing():
    w, m = rollout_correction_weights(torch.zeros(2, 3), MASK, mode="sequence_mask", high=3.0, low=0.5)
    assert torch.equal(w, torch.ones(2, 3)) and not m.any()


# ------------------------------------------------------------------ off-policy sequence masking
def test_off_policy_mask_drops_exactly_the_stale_negative_sequences():
    logps = torch.tensor([[-1.0, -1.0], [-3.0, -3.0], [-3.0, -3.0], [-2.0, -9.0]])
    sampling = torch.tensor([[-1.0, -1.0], [-1.0, -1.0], [-1.0, -1.0], [-1.0, -1.0]])
    mask = torch.tensor([[1.0, 1.0], [1.0, 1.0], [1.0, 1.0], [1.0, 0.0]])
    adv = torch.tensor([-1.0, -1.0, 1.0, -1.0])
    # divergences 0, 2, 2, 1 (the padding token is not counted)
    keep = off_policy_sequence_mask(logps, sampling, adv, mask, threshold=1.5)
    assert keep.squeeze(-1).tolist() == [1.0, 0.0, 1.0, 1.0]  # row 2 has A > 0; row 3 is at 1 < 1.5
    keep = off_policy_sequence_mask(logps, sampling, adv, mask, threshold=0.5)
    assert keep.squeeze(-1).tolist() == [1.0, 0.0, 1.0, 0.0]
    everything = off_policy_sequence_mask(logps, sampling, adv, mask, threshold=math.inf)
    assert torch.equal(everything, torch.ones(4, 1))


def test_off_policy_mask_with_an_infinite_threshold_leaves_the_loss_unchanged():
    logps = logps_leaf()
    keep = off_policy_sequence_mask(logps.detach(), logps.detach() + 5, ADV, MASK, threshold=math.inf)
    a, b = logps_leaf(), logps_leaf()
    masked, _ = policy_loss(a, None, None, ADV, MASK, token_weights=keep.expand_as(MASK))
    plain, _ = policy_loss(b, None, None, ADV, MASK)
    masked.backward()
    plain.backward()
    assert torch.equal(masked, plain) and torch.equal(a.grad, b.grad)


# ------------------------------------------------------------------ adaptive entropy
def test_adaptive_entropy_coefficient_steps_towards_the_target_within_its_bounds():
    assert adaptive_entropy_coef(0.01, 0.1, target=0.2, delta=0.005) == pytest.approx(0.015)
    assert adaptive_entropy_coef(0.01, 0.3, target=0.2, delta=0.005) == pytest.approx(0.005)
    assert adaptive_entropy_coef(0.003, 0.3, target=0.2, delta=0.005) == 0.0
    assert adaptive_entropy_coef(0.003, 0.3, target=0.2, delta=0.005, low=0.001) == 0.001
    assert adaptive_entropy_coef(0.099, 0.1, target=0.2, delta=0.005, high=0.1) == 0.1


# ------------------------------------------------------------------ cispo and luspo warnings
def test_cispo_with_a_trl_sized_epsilon_high_warns_with_the_equivalent_setting():
    t = Template()
    t.config.loss_type, t.config.epsilon_high = "cispo", 5.0
    (note,) = config_warnings(t)
    assert "1 + epsilon_high = 6" in note and "set epsilon_high: 4" in note
    t.config.epsilon_high = 0.28  # MiniMax-M1's own size: nothing to say
    assert config_warnings(t) == []


def test_luspo_at_token_level_warns():
    t = Template()
    t.config.loss_type = "luspo"
    assert any("luspo" in n for n in config_warnings(t))
    t.config.importance_sampling_level, t.config.epsilon, t.config.epsilon_high = "sequence", 3e-4, 4e-4
    assert config_warnings(t) == []


@pytest.mark.parametrize(
    "config, message",
    [
        (
            {"rollout_is_cap": 2.0, "vllm_importance_sampling_correction": True},
            "config.rollout_is_cap = 2.0 is not allowed: it is the token_truncate form of "
            "vllm_importance_sampling_correction; use one of the two.",
        ),
        (
            {"use_bias_correction_kl": True},
            "config.use_bias_correction_kl = True is not allowed: it corrects the KL term, and beta = 0 has none; "
            "set beta > 0.",
        ),
        (
            {"loss_type": "sapo", "delta": 2.0},
            "config.delta = 2.0 is not allowed: it caps the unclipped ratio of the clipped objective, and sapo's "
            "objective is SAPO's soft gate on the ratio.",
        ),
        (
            {"loss_type": "vespo", "delta": 2.0},
            "config.delta = 2.0 is not allowed: it caps the unclipped ratio of the clipped objective, and vespo's "
            "objective is VESPO's kernel on the sequence weight W.",
        ),
        (
            {"loss_type": "vespo", "vllm_importance_sampling_correction": True},
            "config.vllm_importance_sampling_mode = 'sequence_mask' is not allowed: with loss_type vespo use "
            "token_truncate or token_mask: vespo folds each token's correction ratio into its sequence weight W, "
            "where a sequence mode's one weight per sequence would count once per token.",
        ),
        (
            {
                "loss_type": "vespo",
                "vllm_importance_sampling_correction": True,
                "vllm_importance_sampling_mode": "sequence_truncate",
            },
            "config.vllm_importance_sampling_mode = 'sequence_truncate' is not allowed: with loss_type vespo use "
            "token_truncate or token_mask: vespo folds each token's correction ratio into its sequence weight W, "
            "where a sequence mode's one weight per sequence would count once per token.",
        ),
        (
            {"vllm_importance_sampling_mode": "sequence"},
            "config.vllm_importance_sampling_mode = 'sequence' is not allowed: expected one of 'token_truncate', "
            "'token_mask', 'sequence_truncate', 'sequence_mask'.",
        ),
        (
            {"off_policy_mask_threshold": 0},
            "config.off_policy_mask_threshold = 0.0 is not allowed: it must be null (off) or positive.",
        ),
    ],
)
def test_variant_settings_that_cannot_work_are_refused_in_one_line(config, message):
    with pytest.raises(ConfigError) as e:
        template_from_dict({"config": config})
    assert str(e.value) == message


@pytest.mark.parametrize(
    "config",
    [
        {
            "loss_type": "vespo",
            "vllm_importance_sampling_correction": True,
            "vllm_importance_sampling_mode": mode,
        }
        for mode in ("token_truncate", "token_mask")
    ]
    + [
        {"loss_type": "vespo"},  # the mode is read only with the correction on
        {"loss_type": "vespo", "rollout_is_cap": 2.0},  # token_truncate's own form
        {"loss_type": "grpo", "vllm_importance_sampling_correction": True},  # a multiplied weight: any mode
        {
            "loss_type": "tests.user_losses:terms_global_token_mean",
            "delta": 2.0,
        },  # a user loss takes any option
    ],
)
def test_variant_settings_that_work_are_accepted(config):
    assert template_from_dict({"config": config}).config.loss_type == config["loss_type"]
