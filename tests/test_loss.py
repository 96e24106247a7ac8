"""policy_loss and group_advantages against hand-computed values and the identities GRPO relies on."""

import math

import pytest
import torch

from grpo.advantages import group_advantages, zero_spread_share
from grpo.config.loss_table import VARIANTS
from grpo.loss import (
    REDUCTIONS,
    UpdateScale,
    policy_loss,
    reduce,
    reduced_by,
    rollout_gap,
    rollout_is_weights,
    rollout_mismatch_kl,
    token_terms,
)

MASK = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])  # 2 and 3 tokens
ADV = torch.tensor([1.0, -1.0])


def logps_leaf():
    return torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -1.0, -0.25]], requires_grad=True)


@pytest.mark.parametrize(
    "loss_type, kwargs, expected",
    [
        ("grpo", {}, 0.0),  # mean(-1) over seq 0 = -1, mean(+1) over seq 1 = +1, averaged: 0
        ("bnpo", {}, 0.2),  # (-1 * 2 + 1 * 3) / 5
        ("dr_grpo", {"max_completion_length": 4}, 0.125),  # 1 / (2 * 4)
        ("dapo", {"num_items_in_batch": 10}, 0.1),  # 1 / 10
        ("dapo", {}, 0.2),  # no global count: this call's 5 tokens
    ],
)
def test_on_policy_values(loss_type, kwargs, expected):
    loss, stats = policy_loss(logps_leaf(), None, None, ADV, MASK, loss_type=loss_type, **kwargs)
    assert loss.item() == pytest.approx(expected, abs=1e-7)
    assert stats["kl"].item() == 0.0 and stats["clip_ratio"].item() == 0.0


def test_on_policy_gradient_is_policy_gradient_estimator():
    """At num_iterations=1 the ratio is exactly 1, so d loss / d logp_t = -A_i / (|o_i| * B) for grpo."""
    logps = logps_leaf()
    loss, _ = policy_loss(logps, None, None, ADV, MASK, loss_type="grpo")
    loss.backward()
    lengths = MASK.sum(-1, keepdim=True)
    expected = -ADV[:, None] * MASK / lengths / 2
    torch.testing.assert_close(logps.grad, expected, rtol=0, atol=1e-7)
    # Same gradient as the REINFORCE-style surrogate with a detached ratio of 1.
    logps2 = logps_leaf()
    surrogate = -((ADV[:, None] * logps2 * MASK).sum(-1) / lengths.squeeze(-1)).mean()
    surrogate.backward()
    torch.testing.assert_close(logps.grad, logps2.grad, rtol=0, atol=1e-7)


def test_old_logps_equal_to_logps_gives_same_loss_as_none():
    a, _ = policy_loss(logps_leaf(), logps_leaf().detach(), None, ADV, MASK)
    b, _ = policy_loss(logps_leaf(), None, None, ADV, MASK)
    assert a.item() == b.item()


def test_clipping_values_gradients_and_stats():
    logps = logps_leaf()
    old = logps.detach() - math.log(1.5)  # ratio 1.5 on every token
    loss, stats = policy_loss(logps, old, None, ADV, MASK, loss_type="bnpo", epsilon=0.2)
    # A=+1: min(1.5, 1.2) = 1.2 -> -1.2 per token (clipped, no gradient); A=-1: min(-1.5, -1.2) = -1.5 -> +1.5.
    assert loss.item() == pytest.approx((-1.2 * 2 + 1.5 * 3) / 5, abs=1e-6)
    loss.backward()
    assert torch.all(logps.grad[0] == 0)
    torch.testing.assert_close(logps.grad[1], torch.full((3,), 1.5 / 5), rtol=0, atol=1e-6)
    assert stats["clip_ratio_high"].item() == pytest.approx(2 / 5)
    assert stats["clip_ratio_low"].item() == 0.0
    assert stats["clip_ratio"].item() == pytest.approx(2 / 5)


def test_epsilon_high_and_low_clipping():
    logps = logps_leaf()
    old = logps.detach() - math.log(1.25)  # ratio 1.25: inside [0.8, 1.28] with epsilon_high 0.28
    loss, stats = policy_loss(logps, old, None, ADV, MASK, loss_type="bnpo", epsilon=0.2, epsilon_high=0.28)
    assert loss.item() == pytest.approx((-1.25 * 2 + 1.25 * 3) / 5, abs=1e-6)
    assert stats["clip_ratio_high"].item() == 0.0
    old_low = logps.detach() + math.log(2.0)  # ratio 0.5 < 0.8: clipped where A < 0
    _, stats = policy_loss(logps, old_low, None, ADV, MASK, loss_type="bnpo", epsilon=0.2)
    assert stats["clip_ratio_low"].item() == pytest.approx(3 / 5)
    assert stats["clip_ratio_high"].item() == 0.0


def test_k3_kl_value_and_weight():
    logps = logps_leaf()
    ref = logps.detach() + math.log(2.0)  # ref - logp = log 2 -> kl = 2 - log 2 - 1
    kl = 1.0 - math.log(2.0)
    loss, stats = policy_loss(logps, None, ref, ADV, MASK, loss_type="bnpo", beta=0.5)
    assert stats["kl"].item() == pytest.approx(kl, abs=1e-6)
    assert loss.item() == pytest.approx(0.2 + 0.5 * kl, abs=1e-6)
    with pytest.raises(ValueError, match="ref_logps is required when beta > 0."):
        policy_loss(logps, None, None, ADV, MASK, beta=0.1)


def test_sequence_level_importance_sampling_gspo():
    logps = logps_leaf()
    # Per-token log-ratios of seq 0: log 1.5 and log 1.1 (third token masked): one ratio exp(mean) for all.
    shift = torch.tensor([[math.log(1.5), math.log(1.1), 5.0], [0.0, 0.0, 0.0]])
    old = logps.detach() - shift
    loss, _ = policy_loss(
        logps, old, None, ADV, MASK, loss_type="grpo", importance_sampling_level="sequence", epsilon=0.5
    )
    seq_ratio = math.exp((math.log(1.5) + math.log(1.1)) / 2)
    assert loss.item() == pytest.approx((-seq_ratio + 1.0) / 2, abs=1e-6)


def test_bad_names():
    with pytest.raises(
        ValueError, match="loss_type = 'ppo' is not allowed: use one of grpo, bnpo, dr_grpo, dapo, cispo."
    ):
        policy_loss(logps_leaf(), None, None, ADV, MASK, loss_type="ppo")
    with pytest.raises(ValueError, match="importance_sampling_level = 'batch': use token or sequence."):
        policy_loss(logps_leaf(), None, None, ADV, MASK, importance_sampling_level="batch")


def test_fully_masked_row_contributes_nothing():
    logps = logps_leaf()
    mask = torch.tensor([[0.0, 0.0, 0.0], [1.0, 1.0, 1.0]])
    loss, _ = policy_loss(logps, None, None, ADV, mask, loss_type="bnpo")
    loss.backward()
    assert loss.item() == pytest.approx(1.0)
    assert torch.all(logps.grad[0] == 0)


def scale_for(reduction, mask, ranks_masks, rank):
    return UpdateScale(
        reduction=reduction,
        rows=mask.shape[0],
        tokens=mask.sum(),
        global_tokens=sum(m.sum() for m in ranks_masks),
        world_size=len(ranks_masks),
        max_completion_length=4,
    )


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("as_scalar", [False, True])
def test_micro_batch_shares_add_up_to_the_reduction_of_the_update_on_every_rank(reduction, as_scalar):
    # 4 sequences on 2 ranks, each rank in micro-batches of 1: sum over micro-batches, mean over ranks (what
    # backward's rank average does) must give the reduction of all 4 sequences at once
    torch.manual_seed(0)
    terms = torch.randn(4, 3)
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0], [1.0, 1.0, 1.0], [0.0, 0.0, 0.0]])
    ranks = [slice(0, 2), slice(2, 4)]
    per_rank = []
    for r in ranks:
        scale = scale_for(reduction, mask[r], [mask[q] for q in ranks], r)
        shares = []
        for i in range(r.start, r.stop):
            t, m = terms[i : i + 1], mask[i : i + 1]
            if as_scalar:  # a user loss that reduces its micro-batch itself, as it declared
                own = reduce(t, m, reduction, max_completion_length=4, num_items_in_batch=scale.global_tokens)
                shares.append(scale.of_scalar(own, m))
            else:
                shares.append(scale.of_terms(t, m))
        per_rank.append(sum(shares))
    got = sum(per_rank) / len(ranks)
    if reduction == "batch_token_mean":  # per rank by definition: the mean of the ranks' token means
        want = sum(reduce(terms[r], mask[r], reduction) for r in ranks) / len(ranks)
    else:
        want = reduce(terms, mask, reduction, max_completion_length=4)
    assert got.item() == pytest.approx(want.item(), rel=1e-6)


def test_presets_are_a_per_token_objective_and_a_reduction():
    logps = logps_leaf()
    for loss_type, variant in VARIANTS.items():
        loss, _ = policy_loss(logps, None, None, ADV, MASK, loss_type=loss_type, max_completion_length=4)
        terms, _ = token_terms(logps, None, None, ADV, MASK, objective=variant.objective.name)
        assert loss.item() == reduce(terms, MASK, variant.reduction, max_completion_length=4).item(), (
            loss_type
        )
    with pytest.raises(ValueError, match="reduction = 'mean' is not allowed: use one of sequence_mean, "):
        reduced_by("mean")


# ---------------------------------------------------------------- advantages
def test_group_advantages_values():
    rewards = torch.tensor([1.0, 0.0, 2.0, 2.0])  # two groups of G=2
    adv = group_advantages(rewards, 2, scale="group", eps=0.0)
    std = math.sqrt(0.5)  # unbiased std of (1, 0)
    torch.testing.assert_close(adv, torch.tensor([0.5 / std, -0.5 / std, 0.0, 0.0]))
    adv = group_advantages(rewards, 2, scale="none")
    torch.testing.assert_close(adv, torch.tensor([0.5, -0.5, 0.0, 0.0]))
    batch_std = rewards.std().item()
    adv = group_advantages(rewards, 2, scale="batch", eps=1e-4)
    torch.testing.assert_close(adv, torch.tensor([0.5, -0.5, 0.0, 0.0]) / (batch_std + 1e-4))
    # one rank's half of a larger batch: centred within its groups, scaled by the whole batch's std
    everyone = torch.tensor([1.0, 0.0, 2.0, 2.0, 5.0, 9.0])
    adv = group_advantages(rewards[:2], 2, scale="batch", eps=0.0, batch_rewards=everyone)
    torch.testing.assert_close(adv, torch.tensor([0.5, -0.5]) / everyone.std())


def test_group_advantages_zero_spread_and_errors():
    rewards = torch.tensor([1.0, 1.0, 1.0, 0.0, 1.0, 2.0])
    adv = group_advantages(rewards, 3)
    assert torch.all(adv[:3] == 0)
    assert zero_spread_share(rewards, 3) == 0.5
    with pytest.raises(ValueError, match="multiple of num_generations=4"):
        group_advantages(rewards, 4)
    with pytest.raises(ValueError, match="scale = 'rank' is not allowed: use group, batch or none."):
        group_advantages(rewards, 3, scale="rank")


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
@pytest.mark.parametrize("eps", [1e-4, 0.0])
def test_a_group_of_equal_rewards_gets_exactly_zero_advantage(scale, eps):
    # float32: the mean of eight 0.733s is not 0.733, and the residue / (0 + eps) used to be +6e-4 for all 8
    rewards = torch.cat([torch.full((8,), 0.733), torch.tensor([0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.9])])
    adv = group_advantages(rewards, 8, scale=scale, eps=eps)
    assert torch.equal(adv[:8], torch.zeros(8))
    assert adv[8:].abs().min() > 0.01  # the group with spread keeps its signal
    assert torch.equal(group_advantages(torch.full((8,), 0.733), 8, scale=scale, eps=eps), torch.zeros(8))


def test_token_mask_drops_the_policy_term_but_keeps_kl_and_normalisers():
    # dapo over 5 tokens with beta 0.5: token (1, 0) leaves the policy term, its KL term stays.
    token_mask = MASK.clone()
    token_mask[1, 0] = 0.0
    ref = torch.tensor([[-1.0, -2.0, -3.0], [-1.5, -1.0, -0.25]])  # KL only at (1, 0): delta = -1
    kl = math.exp(-1.0) + 1.0 - 1.0
    kwargs = {"loss_type": "dapo", "beta": 0.5}
    loss, _ = policy_loss(logps_leaf(), None, ref, ADV, MASK, token_mask=token_mask, **kwargs)
    # policy terms: -1 (seq 0: 2 tokens of A=+1), +1 x 2 (seq 1: 2 kept tokens of A=-1); KL 0.5 * kl; / 5
    assert loss.item() == pytest.approx((-2.0 + 2.0 + 0.5 * kl) / 5, abs=1e-7)
    full, _ = policy_loss(logps_leaf(), None, ref, ADV, MASK, token_mask=MASK, **kwargs)
    none, _ = policy_loss(logps_leaf(), None, ref, ADV, MASK, **kwargs)
    assert full.item() == none.item() == pytest.approx((-2.0 + 3.0 + 0.5 * kl) / 5, abs=1e-7)
    logps = logps_leaf()
    policy_loss(logps, None, ref, ADV, MASK, token_mask=token_mask, **kwargs)[0].backward()
    # d/d logp at (1, 0): the policy term is gone, the KL gradient beta * (1 - exp(delta)) / 5 remains
    assert logps.grad[1, 0].item() == pytest.approx(0.5 * (1 - math.exp(-1.0)) / 5, abs=1e-7)


def test_cispo_caps_the_ratio_as_a_constant_and_keeps_every_gradient():
    logps = logps_leaf()
    # ratio 1.5 on row 0 (A=+1), 0.5 on row 1 (A=-1): PPO clipping would zero row 0's gradient at epsilon 0.2
    old = logps.detach() - torch.tensor([[math.log(1.5)] * 3, [math.log(0.5)] * 3])
    loss, stats = policy_loss(logps, old, None, ADV, MASK, loss_type="cispo", epsilon_high=0.2, epsilon=0.0)
    lp = logps.detach()
    # -sg(min(r, 1.2)) A logp, summed over the 5 tokens / 5 (no lower cap: row 1 keeps its 0.5)
    want = (-(1.2 * 1.0) * (lp[0, 0] + lp[0, 1]) - (0.5 * -1.0) * lp[1].sum()) / 5
    assert loss.item() == pytest.approx(want.item(), abs=1e-6)
    loss.backward()
    expected = torch.tensor([[-1.2 / 5, -1.2 / 5, 0.0], [0.5 / 5] * 3])
    torch.testing.assert_close(logps.grad, expected, rtol=0, atol=1e-7)
    assert stats["clip_ratio_high"].item() == pytest.approx(2 / 5) and stats["clip_ratio_low"].item() == 0.0


def test_cispo_on_policy_gradient_equals_dapo():
    grads = []
    for loss_type in ("cispo", "dapo"):
        logps = logps_leaf()
        policy_loss(logps, None, None, ADV, MASK, loss_type=loss_type, num_items_in_batch=8)[0].backward()
        grads.append(logps.grad)
    torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=1e-7)
    assert VARIANTS["cispo"].reduction == VARIANTS["dapo"].reduction == "global_token_mean"


def test_token_weights_scale_the_policy_term_only():
    ref = torch.tensor([[-1.0, -2.0, -3.0], [-1.5, -1.0, -0.25]])  # KL only at (1, 0)
    weights = torch.tensor([[2.0, 0.5, 7.0], [1.5, 1.0, 1.0]])  # (0, 2) is padding: its weight counts nowhere
    kl = math.exp(-1.0) + 1.0 - 1.0
    kwargs = {"loss_type": "bnpo", "beta": 0.5}
    loss, _ = policy_loss(logps_leaf(), None, ref, ADV, MASK, token_weights=weights, **kwargs)
    # policy terms: -(2 + 0.5) for seq 0 (A=+1), +(1.5 + 1 + 1) for seq 1 (A=-1); KL 0.5 * kl; / 5 tokens
    assert loss.item() == pytest.approx((-2.5 + 3.5 + 0.5 * kl) / 5, abs=1e-7)
    ones, _ = policy_loss(logps_leaf(), None, ref, ADV, MASK, token_weights=torch.ones(2, 3), **kwargs)
    none, _ = policy_loss(logps_leaf(), None, ref, ADV, MASK, **kwargs)
    assert ones.item() == none.item()
    logps = logps_leaf()
    policy_loss(logps, None, ref, ADV, MASK, token_weights=weights, **kwargs)[0].backward()
    assert logps.grad[0, 0].item() == pytest.approx(-2.0 / 5, abs=1e-7)  # -A * w / tokens


def test_rollout_gap_mismatch_and_truncated_weights():
    train = torch.tensor([[-1.0, -2.0, -9.0], [-0.5, -1.0, -0.25]], requires_grad=True)
    rollout = torch.tensor([[-1.0, -2.5, 0.0], [-0.25, -2.0, -0.25]])
    gap = rollout_gap(train, rollout, MASK)
    assert not gap.requires_grad
    assert gap.tolist() == [[0.0, 0.5, 0.0], [-0.25, 1.0, 0.0]]  # padding: 0 whatever the inputs
    k3 = sum(math.exp(g) - 1 - g for g in (0.5, -0.25, 1.0))
    assert rollout_mismatch_kl(gap).item() == pytest.approx(k3, abs=1e-6)
    weights = rollout_is_weights(gap, cap=2.0)
    expected = [[1.0, math.exp(0.5), 1.0], [math.exp(-0.25), 2.0, 1.0]]  # e^1 = 2.72 capped at 2
    torch.testing.assert_close(weights, torch.tensor(expected), rtol=0, atol=1e-6)


def test_k2_kl_value_and_gradient():
    logps = logps_leaf()
    ref = logps.detach() + math.log(2.0)  # logp - ref = -log 2 -> k2 = (log 2)^2 / 2
    loss, stats = policy_loss(logps, None, ref, ADV, MASK, loss_type="bnpo", beta=0.5, kl_estimator="k2")
    assert stats["kl"].item() == pytest.approx(math.log(2.0) ** 2 / 2, abs=1e-6)
    loss.backward()
    # policy term: -A / 5 per token; k2 term: beta * (logp - ref) / 5 = -0.5 * log 2 / 5
    assert logps.grad[0, 0].item() == pytest.approx((-1.0 - 0.5 * math.log(2.0)) / 5, abs=1e-7)
    assert logps.grad[1, 0].item() == pytest.approx((1.0 - 0.5 * math.log(2.0)) / 5, abs=1e-7)
    k3 = logps_leaf()
    policy_loss(k3, None, ref, ADV, MASK, loss_type="bnpo", beta=0.5)[0].backward()
    # k3 term: beta * (1 - exp(ref - logp)) / 5 = 0.5 * (1 - 2) / 5
    assert k3.grad[0, 0].item() == pytest.approx((-1.0 - 0.5) / 5, abs=1e-7)
    with pytest.raises(ValueError, match=r"^kl_estimator = 'k1' is not allowed: use k3 or k2.$"):
        policy_loss(logps_leaf(), None, ref, ADV, MASK, beta=0.5, kl_estimator="k1")


def test_delta_caps_the_unclipped_ratio_of_negative_advantages():
    # one token, A = -1, ratio 3: the plain objective keeps -3 (and a gradient), delta = 2 caps it at -2
    logps = torch.zeros(1, 1, requires_grad=True)
    old = torch.tensor([[-math.log(3.0)]])
    kwargs = {"loss_type": "bnpo", "epsilon": 0.2}
    plain, _ = policy_loss(logps, old, None, torch.tensor([-1.0]), torch.ones(1, 1), **kwargs)
    plain.backward()
    assert plain.item() == pytest.approx(3.0, abs=1e-6) and logps.grad.item() == pytest.approx(3.0, abs=1e-6)
    logps.grad = None
    capped, _ = policy_loss(logps, old, None, torch.tensor([-1.0]), torch.ones(1, 1), delta=2.0, **kwargs)
    capped.backward()
    assert capped.item() == pytest.approx(2.0, abs=1e-6) and logps.grad.item() == 0.0
    # a positive advantage is clipped at 1 + epsilon as before: delta >= 1 + epsilon leaves it alone
    logps.grad = None
    pos, _ = policy_loss(logps, old, None, torch.tensor([1.0]), torch.ones(1, 1), delta=2.0, **kwargs)
    assert pos.item() == pytest.approx(-1.2, abs=1e-6)
