"""docs/grpo-explained.md: every number on the page is recomputed here with the trainer's own functions."""

import math

import torch

from grpo.advantages import group_advantages
from grpo.loss import policy_loss
from tests.conftest import REPO

PAGE = (REPO / "docs" / "grpo-explained.md").read_text()


def shown(value: float) -> str:
    text = f"{value:.3f}"
    assert text in PAGE, f"{text} is not on the page"
    return text


def test_the_worked_step_matches_the_code():
    rewards = torch.tensor([3.0, 1.0, 0.5, 0.5])
    shown(float(rewards.mean())), shown(float(rewards.std()))
    advantages = group_advantages(rewards, 4)
    assert "**" + ", ".join(shown(float(a)) for a in advantages) + "**" in PAGE
    # four completions of different lengths, on-policy: the grpo loss is 0, its gradient is A_i / (4 T_i)
    lengths = [3, 5, 2, 4]
    mask = torch.tensor([[1.0] * n + [0.0] * (5 - n) for n in lengths])
    logps = torch.full((4, 5), -1.0, requires_grad=True)
    loss, _ = policy_loss(logps, None, None, advantages, mask, loss_type="grpo")
    value = abs(loss.item())
    assert f"**{shown(value)}**" in PAGE and value < 5e-8
    loss.backward()
    for i, n in enumerate(lengths):
        assert math.isclose(-float(logps.grad[i, 0]), float(advantages[i]) / (4 * n), rel_tol=1e-6)
    # a token whose ratio reached 1.3 with A > 0: min(1.3 A, 1.2 A) is a constant, no gradient
    one = torch.tensor([[0.0]], requires_grad=True)
    old = torch.tensor([[-math.log(1.3)]])
    _, stats = policy_loss(one, old, None, torch.tensor([1.0]), torch.ones(1, 1), epsilon=0.2)
    policy_loss(one, old, None, torch.tensor([1.0]), torch.ones(1, 1), epsilon=0.2)[0].backward()
    assert one.grad.item() == 0.0 and stats["clip_ratio_high"].item() == 1.0
    # k3 with d = log 2
    ref = torch.tensor([[math.log(2.0)]])
    _, stats = policy_loss(torch.zeros(1, 1), None, ref, torch.zeros(1), torch.ones(1, 1), beta=0.1)
    assert f"**{shown(stats['kl'].item())}**" in PAGE
