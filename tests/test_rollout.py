"""Sampling with a shared prompt prefix: padding, end tokens, masks, and agreement with the log-prob pass."""

import pytest
import torch

from grpo.model.loading import load_model
from grpo.model.logprobs import CompletionLogprobs
from grpo.rollout.generate import Rollout, generate, left_pad
from grpo.rollout.sampling import sample_next


def tiny(tiny_model_dir):
    return load_model(str(tiny_model_dir), device=torch.device("cpu"), dtype=torch.float32)


def test_left_pad():
    ids, mask = left_pad([[5, 6, 7], [8]], pad_id=0, device=torch.device("cpu"))
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]


def test_rows_take_whole_groups():
    n, t = 6, 3  # 3 prompts x G=2
    ro = Rollout(
        prompt_ids=torch.arange(n * 2).view(n, 2),
        prompt_mask=torch.ones(n, 2, dtype=torch.long),
        completion_ids=torch.arange(n * t).view(n, t),
        completion_mask=torch.ones(n, t, dtype=torch.long),
        truncated=torch.tensor([True, False] * 3),
        group_size=2,
        sampling_logps=-torch.arange(n * t, dtype=torch.float).view(n, t),
    )
    part = ro.rows(slice(2, 6))
    assert part.group_size == 2 and part.completion_ids.tolist() == ro.completion_ids[2:6].tolist()
    assert part.sampling_logps.tolist() == ro.sampling_logps[2:6].tolist()
    assert part.prompt_ids.tolist() == [[4, 5], [6, 7], [8, 9], [10, 11]]
    assert part.truncated.tolist() == [True, False] * 2
    ids, _, index = part.prompt_groups(slice(0, 4))  # the shared-prefix pass sees its 2 prompts
    assert ids.tolist() == [[4, 5], [8, 9]] and index.tolist() == [0, 0, 1, 1]
    with pytest.raises(ValueError, match=r"^rows 1:4 split a group of 2 samples.$"):
        ro.rows(slice(1, 4))


def test_top_p_keeps_only_the_nucleus():
    logits = torch.log(torch.tensor([[0.6, 0.3, 0.05, 0.05]]))
    g = torch.Generator().manual_seed(0)
    draws = {int(sample_next(logits, temperature=1.0, top_p=0.5, generator=g)) for _ in range(50)}
    assert draws == {0}
    draws = {int(sample_next(logits, temperature=1.0, top_p=0.85, generator=g)) for _ in range(200)}
    assert draws == {0, 1}


def test_greedy_rollout_matches_unpadded_single_prompt(tiny_model_dir, tokenizer):
    """Left padding and the G-fold cache expansion must not change what a prompt produces."""
    model = tiny(tiny_model_dir)
    short = tokenizer("What is 2 + 2?", add_special_tokens=False)["input_ids"]
    long = tokenizer("A much longer prompt that forces padding of the short one", add_special_tokens=False)[
        "input_ids"
    ]
    kw = dict(
        max_new_tokens=6, eos_ids=[tokenizer.eos_token_id], pad_id=tokenizer.pad_token_id, temperature=1e-4
    )
    both = generate(model, [short, long], num_generations=3, **kw)
    alone = generate(model, [short], num_generations=1, **kw)
    assert both.completion_ids.shape == (6, 6)
    for j in range(3):
        assert torch.equal(both.completion_ids[j], alone.completion_ids[0])


def test_end_token_masks_the_rest(tiny_model_dir, tokenizer):
    model = tiny(tiny_model_dir)
    prompt = tokenizer("Hello", add_special_tokens=False)["input_ids"]
    g = torch.Generator().manual_seed(0)
    # Declare the most likely first token to be an end token: sequences that draw it end at once.
    first = model(torch.tensor([prompt])).logits[0, -1].argmax().item()
    ro = generate(
        model,
        [prompt],
        num_generations=8,
        max_new_tokens=5,
        eos_ids=[first],
        pad_id=0,
        temperature=1.0,
        generator=g,
    )
    for ids, mask, trunc in zip(ro.completion_ids, ro.completion_mask, ro.truncated):
        ended = (ids == first).nonzero()
        if len(ended):
            k = int(ended[0])
            assert mask.tolist() == [1] * (k + 1) + [0] * (len(mask) - k - 1) and not trunc
            assert torch.all(ids[k + 1 :] == 0)
        else:
            assert mask.sum() == len(mask) and trunc


def test_logprob_pass_matches_sampling_distribution(tiny_model_dir, tokenizer):
    """The training forward over prompt + completion gives the log-probs the sampler used (no off-by-one)."""
    model = tiny(tiny_model_dir)
    prompts = [
        tokenizer(t, add_special_tokens=False)["input_ids"] for t in ("Hi there", "Count to ten please")
    ]
    ro = generate(
        model,
        prompts,
        num_generations=2,
        max_new_tokens=4,
        eos_ids=[tokenizer.eos_token_id],
        pad_id=tokenizer.pad_token_id,
        generator=torch.Generator().manual_seed(1),
    )
    with torch.no_grad():
        logps = CompletionLogprobs(model, impl="naive")(
            ro.prompt_ids, ro.prompt_mask, ro.completion_ids, ro.completion_mask
        )
    for i in range(4):
        ids = ro.prompt_ids[i][ro.prompt_mask[i].bool()].tolist()
        for t in range(int(ro.completion_mask[i].sum())):
            with torch.no_grad():
                logits = model(torch.tensor([ids])).logits[0, -1]
            expected = torch.log_softmax(logits, -1)[ro.completion_ids[i, t]]
            assert abs(float(logps[i, t]) - float(expected)) < 1e-4
            ids.append(int(ro.completion_ids[i, t]))
