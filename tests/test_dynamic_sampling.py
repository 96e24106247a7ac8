"""DAPO's dynamic sampling: rollouts joined and cut exactly, and a run that keeps only informative prompts."""

import json

import pytest
import torch

from grpo.config import template_from_dict
from grpo.data import PromptSampler
from grpo.rollout.dynamic_sampling import fill_batch, informative_groups, spread_top_ups
from grpo.rollout.generate import Rollout
from grpo.samples import Samples, concat_rollouts, select_rows
from grpo.trainer import GRPOTrainer
from tests.conftest import tiny_template

PAD = 0


def rollout(prompt_rows: list[list[int]], completion_rows: list[list[int]], group_size: int = 1) -> Rollout:
    """Left-padded prompts and right-padded completions from plain lists (tokens are >= 1)."""
    p, t = max(map(len, prompt_rows)), max(map(len, completion_rows))
    ids = torch.tensor([[PAD] * (p - len(r)) + r for r in prompt_rows])
    comp = torch.tensor([r + [PAD] * (t - len(r)) for r in completion_rows])
    return Rollout(
        prompt_ids=ids,
        prompt_mask=(ids != PAD).long(),
        completion_ids=comp,
        completion_mask=(comp != PAD).long(),
        truncated=torch.tensor([len(r) == t for r in completion_rows]),
        group_size=group_size,
    )


def test_concat_pads_prompts_left_and_completions_right():
    a = rollout([[5, 6], [5, 6]], [[1, 2, 3], [4]], group_size=2)
    b = rollout([[7, 8, 9], [7, 8, 9]], [[1], [2, 3]], group_size=2)
    ro = concat_rollouts([a, b], PAD)
    assert ro.prompt_ids.tolist() == [[0, 5, 6], [0, 5, 6], [7, 8, 9], [7, 8, 9]]
    assert ro.prompt_mask.tolist() == [[0, 1, 1], [0, 1, 1], [1, 1, 1], [1, 1, 1]]
    assert ro.completion_ids.tolist() == [[1, 2, 3], [4, 0, 0], [1, 0, 0], [2, 3, 0]]
    assert ro.completion_mask.tolist() == [[1, 1, 1], [1, 0, 0], [1, 0, 0], [1, 1, 0]]
    assert ro.truncated.tolist() == [True, False, False, True] and ro.group_size == 2


def test_select_rows_trims_columns_that_became_padding():
    ro = rollout([[5], [5], [6, 7, 8], [6, 7, 8]], [[1], [2], [1, 2, 3, 4], [3]], group_size=2)
    picked = select_rows(ro, torch.tensor([0, 1]), PAD)
    assert picked.prompt_ids.tolist() == [[5], [5]] and picked.completion_ids.tolist() == [[1], [2]]
    assert picked.completion_mask.tolist() == [[1], [1]]


def test_sampling_logps_travel_with_their_rows():
    a = rollout([[5], [5]], [[1, 2, 3], [4]], group_size=2)
    b = rollout([[7], [7]], [[1], [2, 3]], group_size=2)
    a.sampling_logps = torch.tensor([[-1.0, -2.0, -3.0], [-4.0, 0.0, 0.0]])
    b.sampling_logps = torch.tensor([[-5.0, 0.0, 0.0], [-6.0, -7.0, 0.0]])
    ro = concat_rollouts([a, b], PAD)
    assert ro.sampling_logps.tolist() == [
        [-1.0, -2.0, -3.0],
        [-4.0, 0.0, 0.0],
        [-5.0, 0.0, 0.0],
        [-6.0, -7.0, 0.0],
    ]
    assert select_rows(ro, torch.tensor([2, 3]), PAD).sampling_logps.tolist() == [[-5.0, 0.0], [-6.0, -7.0]]
    b.sampling_logps = None  # greedy rollouts record none: the concatenation then has none either
    assert concat_rollouts([a, b], PAD).sampling_logps is None


def test_concat_refuses_mixed_group_sizes():
    with pytest.raises(ValueError, match="^concat_rollouts needs at least one rollout, all with the same"):
        concat_rollouts([rollout([[1]], [[1]], 1), rollout([[1], [1]], [[1], [1]], 2)], PAD)


def test_informative_groups():
    total = torch.tensor([1.0, 1.0, 0.0, 2.0, 3.0, 3.0])
    assert informative_groups(total, 2) == [False, True, False]


def fake_round(prompts: list[int], totals: list[float]) -> Samples:
    """G=2 samples per prompt; prompt p has p + 1 prompt tokens, its samples 1 and 2 completion tokens."""
    ro = rollout([[9] * (p + 1) for p in prompts for _ in range(2)], [[1], [1, 2]] * len(prompts), 2)
    n = 2 * len(prompts)
    return Samples(
        prompts=prompts,
        rollout=ro,
        texts=[f"{p}/{j}" for p in prompts for j in range(2)],
        references=[str(p) for p in prompts for _ in range(2)],
        rows=[{"p": p} for p in prompts for _ in range(2)],
        scores=torch.tensor(totals).view(n, 1),
        total=torch.tensor(totals),
    )


def test_fill_batch_keeps_informative_groups_in_order_and_tops_up():
    rounds = iter(
        [
            fake_round([0, 1, 2], [1, 1, 0, 1, 2, 2]),  # only prompt 1 disagrees
            fake_round([3, 4, 5], [0, 0, 0, 0, 0, 0]),  # nothing
            fake_round([6, 7, 8], [0, 1, 1, 0, 5, 5]),  # 6 and 7: one more than needed
        ]
    )
    first, batch, stats = fill_batch(lambda: next(rounds), batch_size=3, max_rounds=5, pad_id=PAD)
    assert first.prompts == [0, 1, 2]
    assert batch.prompts == [1, 6, 7] and batch.texts == ["1/0", "1/1", "6/0", "6/1", "7/0", "7/1"]
    assert batch.total.tolist() == [0.0, 1.0, 0.0, 1.0, 1.0, 0.0]
    assert batch.rollout.prompt_mask.sum(-1).tolist() == [2, 2, 7, 7, 8, 8]
    assert stats == {
        "tokens": 9 * 3,
        "dynamic_sampling/rounds": 3.0,
        "dynamic_sampling/informative_share": 1.0,
    }
    # Out of rounds: the short batch is topped up with dropped groups, oldest first.
    rounds = iter([fake_round([0, 1, 2], [1, 1, 0, 1, 2, 2]), fake_round([3, 4, 5], [0] * 6)])
    _, batch, stats = fill_batch(lambda: next(rounds), batch_size=3, max_rounds=2, pad_id=PAD)
    assert batch.prompts == [1, 0, 2] and stats["dynamic_sampling/informative_share"] == pytest.approx(1 / 3)


def test_top_ups_are_spread_over_the_mini_batches():
    # 4 prompts in 2 mini-batches, 2 informative: appended last, the second mini-batch would teach nothing
    rounds = iter([fake_round([0, 1, 2, 3], [1, 1, 0, 1, 2, 2, 0, 5])])  # 1 and 3 disagree
    _, batch, _ = fill_batch(lambda: next(rounds), batch_size=4, max_rounds=1, pad_id=PAD, mini_batches=2)
    halves = [batch.prompts[:2], batch.prompts[2:]]
    assert halves == [[0, 1], [2, 3]]  # a top-up and an informative group in each
    rounds = iter([fake_round([0, 1, 2, 3], [1, 1, 0, 1, 2, 2, 0, 5])])
    _, whole, _ = fill_batch(lambda: next(rounds), batch_size=4, max_rounds=1, pad_id=PAD)
    assert whole.prompts == [1, 3, 0, 2]  # one mini-batch: informative first, as before
    assert spread_top_ups(2, 2, 2) == [2, 0, 3, 1]
    assert spread_top_ups(5, 1, 3) == [0, 1, 2, 3, 5, 4]
    assert sorted(spread_top_ups(3, 5, 4)) == list(range(8))


def test_fill_batch_goes_on_while_another_rank_needs_groups():
    rounds = iter([fake_round([0, 1], [0, 1, 1, 0]), fake_round([2, 3], [0, 1, 0, 1])])
    asked = []
    _, batch, stats = fill_batch(
        lambda: next(rounds),
        batch_size=2,
        max_rounds=2,
        pad_id=PAD,
        any_rank=lambda f: asked.append(f) or True,
    )
    assert asked == [False]  # this rank was full after round 1, another rank was not
    assert stats["dynamic_sampling/rounds"] == 2.0 and batch.prompts == [0, 1]


def run_dynamic(tiny_model_dir, out, reward: str, rounds: int):
    data = tiny_template(
        tiny_model_dir,
        out,
        rewards=[f"tests.user_rewards:{reward}"],
        dynamic_sampling=True,
        dynamic_sampling_max_rounds=rounds,
        max_steps=2,
    )
    trainer = GRPOTrainer(template_from_dict(data))
    trainer.train()
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    return trainer, metrics, samples


def test_a_run_trains_only_on_prompts_whose_samples_disagree(tiny_model_dir, tmp_path):
    # The reward varies within a group only when the prompt's answer is even, so only those prompts are kept.
    trainer, metrics, samples = run_dynamic(tiny_model_dir, tmp_path / "d", "text_code_if_even_answer", 4)
    # What the rounds must be, from the data alone: batches of 2 prompts until 2 even answers are found.
    sampler = PromptSampler(len(trainer.prompts), batch_size=2, seed=0)
    expected_rounds = []
    for _ in range(2):
        found, rounds = 0, 0
        while found < 2 and rounds < 4:
            found += sum(int(trainer.prompts[i].reference) % 2 == 0 for i in sampler.next_batch())
            rounds += 1
        expected_rounds.append((rounds, min(found, 2) / 2))
    assert [(m["dynamic_sampling/rounds"], m["dynamic_sampling/informative_share"]) for m in metrics] == (
        expected_rounds
    )
    assert trainer.sampler.position == sum(r for r, _ in expected_rounds)
    trained = [s for s in samples if s["rewards"]]
    assert len(trained) == 4  # 2 prompts per step, one sample logged per prompt
    full = [m["dynamic_sampling/informative_share"] == 1.0 for m in metrics]
    for step_samples, all_informative in zip([trained[:2], trained[2:]], full):
        if all_informative:
            assert all(int(s["reference"]) % 2 == 0 for s in step_samples)


def test_a_batch_without_signal_is_topped_up_after_the_last_round(tiny_model_dir, tmp_path):
    trainer, metrics, _ = run_dynamic(tiny_model_dir, tmp_path / "c", "constant", 3)
    assert [m["dynamic_sampling/rounds"] for m in metrics] == [3.0, 3.0]
    assert [m["dynamic_sampling/informative_share"] for m in metrics] == [0.0, 0.0]
    assert all(m["loss"] == 0.0 for m in metrics)  # zero advantages, beta 0
    assert trainer.sampler.position == 6
