"""The shared-prefix log-prob pass (each prompt once) equals the concatenated pass in values and gradients."""

from __future__ import annotations

import pytest
import torch

from grpo.model.loading import load_model
from grpo.model.logprobs import CompletionLogprobs
from grpo.rollout.generate import Rollout, left_pad

CPU, F32 = torch.device("cpu"), torch.float32


def make_rollout(pad_id: int, *, prompt_lengths: list[int], completion_lengths: list[int], g: int) -> Rollout:
    gen = torch.Generator().manual_seed(7)
    prompts = [torch.randint(100, 2000, (n,), generator=gen).tolist() for n in prompt_lengths]
    ids, mask = left_pad(prompts, pad_id, CPU)
    t = max(completion_lengths)
    completion = torch.full((len(completion_lengths), t), pad_id)
    completion_mask = torch.zeros((len(completion_lengths), t), dtype=torch.long)
    for row, n in enumerate(completion_lengths):
        completion[row, :n] = torch.randint(100, 2000, (n,), generator=gen)
        completion_mask[row, :n] = 1
    return Rollout(
        prompt_ids=ids.repeat_interleave(g, dim=0),
        prompt_mask=mask.repeat_interleave(g, dim=0),
        completion_ids=completion,
        completion_mask=completion_mask,
        truncated=completion_mask.sum(-1).eq(t),
        group_size=g,
    )


@pytest.mark.parametrize(
    "rows, completion_lengths",
    [
        (slice(0, 6), [5, 3, 1, 5, 2, 4]),  # whole groups, mixed lengths
        (slice(1, 5), [5, 3, 1, 5, 2, 4]),  # a micro-batch that cuts both groups
        (slice(0, 6), [1, 1, 1, 1, 1, 1]),  # one completion token: only the prompt pass predicts
        (slice(3, 6), [2, 2, 2, 6, 6, 6]),  # trailing columns all padding for these rows
    ],
)
def test_shared_prefix_matches_concatenated_pass(tokenizer, tiny_model_dir, rows, completion_lengths):
    model = load_model(str(tiny_model_dir), device=CPU, dtype=F32)
    module = CompletionLogprobs(model, temperature=0.7, impl="naive")
    ro = make_rollout(
        tokenizer.pad_token_id, prompt_lengths=[4, 9], completion_lengths=completion_lengths, g=3
    )
    concat_args = (
        ro.prompt_ids[rows],
        ro.prompt_mask[rows],
        ro.completion_ids[rows],
        ro.completion_mask[rows],
    )
    prompt_ids, prompt_mask, index = ro.prompt_groups(rows)
    assert prompt_ids.shape[0] == len(set(range(rows.start // 3, (rows.stop - 1) // 3 + 1)))
    shared_args = (prompt_ids, prompt_mask, ro.completion_ids[rows], ro.completion_mask[rows], index)
    weights = torch.randn(ro.completion_ids[rows].shape, generator=torch.Generator().manual_seed(3))

    grads = []
    for args in (concat_args, shared_args):
        model.zero_grad()
        logps = module(*args)
        assert logps.shape == ro.completion_ids[rows].shape
        (logps * weights).sum().backward()
        grads.append((logps.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (concat, concat_grads), (shared, shared_grads) = grads
    mask = ro.completion_mask[rows].bool()
    torch.testing.assert_close(shared[mask], concat[mask], atol=2e-5, rtol=1e-5)
    assert torch.all(shared[~mask] == 0) and torch.all(concat[~mask] == 0)
    for name, g in concat_grads.items():
        torch.testing.assert_close(shared_grads[name], g, atol=2e-5, rtol=1e-4, msg=name)


def test_prompt_groups_drops_shared_left_padding(tokenizer):
    ro = make_rollout(tokenizer.pad_token_id, prompt_lengths=[4, 9, 6], completion_lengths=[2] * 6, g=2)
    ids, mask, index = ro.prompt_groups(slice(4, 6))  # only the 6-token prompt: 3 padding columns go
    assert ids.shape == (1, 6) and mask.all()
    assert index.tolist() == [0, 0]
    ids, mask, index = ro.prompt_groups(slice(1, 5))  # rows 1-4 touch prompts 0, 1, 2; 9 tokens wide
    assert ids.shape == (3, 9)
    assert mask.sum(-1).tolist() == [4, 9, 6]
    assert index.tolist() == [0, 1, 1, 2]


@pytest.mark.parametrize("impl", ["naive", "chunked"])
def test_entropy_is_the_per_token_entropy_of_the_model_without_gradient(tokenizer, tiny_model_dir, impl):
    model = load_model(str(tiny_model_dir), device=CPU, dtype=F32)
    module = CompletionLogprobs(model, temperature=0.7, impl=impl)
    ro = make_rollout(tokenizer.pad_token_id, prompt_lengths=[4, 9], completion_lengths=[5, 3, 1, 5], g=2)
    args = (ro.prompt_ids, ro.prompt_mask, ro.completion_ids, ro.completion_mask)
    logps, entropy = module(*args, return_entropy=True)
    assert logps.requires_grad and not entropy.requires_grad
    torch.testing.assert_close(logps, module(*args), atol=0, rtol=0)  # the entropy changes nothing else
    # The specification: the full logits of prompt + completion, the position before each completion token.
    with torch.no_grad():
        ids = torch.cat([ro.prompt_ids, ro.completion_ids], 1)
        mask = torch.cat([ro.prompt_mask, ro.completion_mask], 1)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        logits = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits
        p = ro.prompt_ids.shape[1]
        logp_all = torch.log_softmax(logits[:, p - 1 : -1].float() / 0.7, dim=-1)  # [B, T, V]
        want = -(logp_all.exp() * logp_all).sum(-1)  # [B, T]
    done = ro.completion_mask.bool()
    torch.testing.assert_close(entropy[done], want[done], atol=2e-5, rtol=1e-5)
    assert torch.all(entropy[~done] == 0) and entropy[done].min() > 0


@pytest.mark.parametrize("completion_lengths", [[1, 1, 1, 1], [1, 3, 2, 1]])
def test_shared_prefix_pass_always_calls_the_decoder_twice(tokenizer, tiny_model_dir, completion_lengths):
    # Under FSDP every decoder call gathers weights on all ranks: a rank whose micro-batch holds only 1-token
    # completions must make the same calls as the others, or they wait for it forever.
    model = load_model(str(tiny_model_dir), device=CPU, dtype=F32)
    module = CompletionLogprobs(model, impl="naive")
    calls = []
    model.get_decoder().register_forward_pre_hook(lambda *_: calls.append(1))
    ro = make_rollout(
        tokenizer.pad_token_id, prompt_lengths=[4, 9], completion_lengths=completion_lengths, g=2
    )
    prompt_ids, prompt_mask, index = ro.prompt_groups(slice(0, 4))
    logps = module(prompt_ids, prompt_mask, ro.completion_ids, ro.completion_mask, index)
    assert len(calls) == 2 and logps.shape == ro.completion_ids.shape
    concat = module(ro.prompt_ids, ro.prompt_mask, ro.completion_ids, ro.completion_mask)
    torch.testing.assert_close(logps, concat, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("weights, autocast", [(torch.bfloat16, None), (F32, torch.bfloat16)])
def test_fp32_head_takes_the_log_probs_from_fp32_logits_under_bf16(
    tokenizer, tiny_model_dir, weights, autocast
):
    """cast_lm_head_to_fp32 (ScaleRL): with bf16 weights, or fp32 weights under bf16 autocast (bf16-mixed), the
    log-probs are log_softmax of fp32 logits from the hidden states; without it they carry the rounding of
    bf16 logits. The gradient still reaches the head weight in its own dtype."""
    model = load_model(str(tiny_model_dir), device=CPU, dtype=weights)
    ro = make_rollout(tokenizer.pad_token_id, prompt_lengths=[4, 9], completion_lengths=[5, 3, 6, 2], g=2)
    args = (ro.prompt_ids, ro.prompt_mask, ro.completion_ids, ro.completion_mask)
    fp32 = CompletionLogprobs(model, impl="chunked", autocast=autocast, fp32_head=True)
    plain = CompletionLogprobs(model, impl="chunked", autocast=autocast)
    context = (
        torch.autocast("cpu", dtype=torch.bfloat16) if autocast else torch.autocast("cpu", enabled=False)
    )
    with torch.no_grad(), context:
        h = fp32._concatenated_hidden(*args)  # [B, T, H], bf16
    assert h.dtype == (torch.bfloat16 if autocast is None else F32)  # autocast keeps the final norm in fp32
    head = model.get_output_embeddings().weight
    logits = h.float() @ head.float().T  # [B, T, V] fp32
    expected = torch.log_softmax(logits, -1).gather(-1, ro.completion_ids[..., None]).squeeze(-1)
    mask = ro.completion_mask.bool()
    got = fp32(*args)
    torch.testing.assert_close(got[mask], expected[mask], atol=2e-5, rtol=0)
    with torch.no_grad():
        rounded = plain(*args)
    assert (rounded[mask] - expected[mask]).abs().max() > 1e-4  # bf16 logits: 10x further off
    got[mask].sum().backward()
    assert head.grad is not None and head.grad.dtype == weights
