"""The static-cache decode step against transformers' own decoding, and the inverse-CDF sampler."""

from __future__ import annotations

import contextlib
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from grpo.model.lora import inject_lora
from grpo.rollout.decoding.decoders import HFDecoder
from grpo.rollout.decoding.graph_decode import CUDAGraphDecoder, FixedShapeDecoder, graph_decode_supported
from grpo.rollout.decoding.packed_decode import (
    MATMUL_STRATEGIES,
    PackedDecoder,
    PackedProjection,
    fastest_strategy,
    packed_decode_supported,
)
from grpo.rollout.decoding.sampling import nucleus, sample_next, truncate
from grpo.rollout.decoding.static_decode import StaticDecoder, StaticKVCache, static_decode_supported
from grpo.rollout.generate import SamplingSettings, generate, left_pad

CPU = torch.device("cpu")
CUDA = torch.device("cuda")


def tiny(model_type: str, vocab: int, **extra):
    from transformers import AutoConfig, AutoModelForCausalLM

    if model_type in ("qwen2", "qwen3"):
        extra["use_sliding_window"] = False
    config = AutoConfig.for_model(
        model_type,
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=256,
        **extra,
    )
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).eval()


def prefill(model, prompts, pad_id, device=CPU):
    ids, mask = left_pad(prompts, pad_id, device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True)
    return (out.cache if hasattr(out, "cache") else out.past_key_values), mask, positions[:, -1] + 1


ARCHITECTURES = [
    ("llama", {}),
    ("llama", {"attention_bias": True, "mlp_bias": True, "tie_word_embeddings": True}),
    ("qwen2", {}),  # q/k/v biases
    ("qwen3", {}),  # per-head q/k RMSNorm
    ("mistral", {}),
]


def with_lora(model):
    """Adapters with a non-zero B, so the packed decoder must merge a real delta."""
    inject_lora(model, r=4, alpha=8, dropout=0.1, target_modules=["q_proj", "v_proj", "up_proj", "down_proj"])
    torch.manual_seed(1)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.2)
    return model.eval()


def packed(strategy):
    """A PackedDecoder factory with its GEMM form forced, so each form is held to transformers' logits."""
    return lambda *args: PackedDecoder(*args, strategy=strategy)


def fixed_shape_on_stale_memory(model, cache, mask, capacity):
    """The fixed-shape step attends to columns not written yet: whatever memory held there must not leak in."""
    for buffer in (*cache.keys, *cache.values):
        buffer[:, :, cache.length :] = float("nan")
    return FixedShapeDecoder(model, cache, mask, capacity)


DECODERS = [StaticDecoder, fixed_shape_on_stale_memory, *(packed(s) for s in MATMUL_STRATEGIES)]
DECODER_IDS = ["static", "fixed_shape", *MATMUL_STRATEGIES]


@pytest.mark.parametrize("decoder", DECODERS, ids=DECODER_IDS)
@pytest.mark.parametrize("model_type,extra", ARCHITECTURES)
@torch.no_grad()
def test_static_decoders_match_transformers_logits(model_type, extra, decoder):
    model = tiny(model_type, vocab=300, **extra)
    check_decoder_against_transformers(model, decoder)


@pytest.mark.parametrize("decoder", DECODERS, ids=DECODER_IDS)
@torch.no_grad()
def test_static_decoders_apply_lora_adapters(decoder):
    check_decoder_against_transformers(with_lora(tiny("qwen2", vocab=300)), decoder)


def check_decoder_against_transformers(model, decoder, device=CPU):
    prompts = [[5, 6, 7], [8, 9, 10, 11, 12, 13, 14]]  # different lengths: left padding in the cache
    g, steps = 2, 6
    assert static_decode_supported(model, capacity=7 + steps)
    cache_a, mask, start = prefill(model, prompts, pad_id=0, device=device)
    cache_b, _, _ = prefill(model, prompts, pad_id=0, device=device)
    mask = mask.repeat_interleave(g, dim=0)
    hf = HFDecoder(model, cache_a, g, mask)
    static = decoder(model, StaticKVCache(cache_b, g, 7 + steps), mask, 7 + steps)
    positions = start.repeat_interleave(g)
    tokens = torch.tensor([20, 21, 22, 23], device=device)
    for step in range(steps):
        expected, got = hf(tokens, positions), static(tokens, positions)
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5, msg=f"step {step}")
        tokens, positions = (tokens * 7 + step) % 300, positions + 1


def test_generate_is_the_same_with_either_decoder(tiny_model_dir, tokenizer):
    from grpo.model.loading import load_model

    model = load_model(str(tiny_model_dir), device=CPU, dtype=torch.float32)
    prompts = [tokenizer("Hi there", add_special_tokens=False)["input_ids"], [7, 8, 9, 10, 11, 12]]
    kw = dict(num_generations=3, pad_id=tokenizer.pad_token_id)
    settings = SamplingSettings(max_new_tokens=10, end_ids=())
    runs = {
        impl: generate(
            model, prompts, settings, generator=torch.Generator().manual_seed(4), decode_impl=impl, **kw
        )
        for impl in ("hf", "static", "graph", "packed", "auto")
    }
    for impl, ro in runs.items():
        assert torch.equal(ro.completion_ids, runs["hf"].completion_ids), impl
    assert runs["hf"].completion_ids.shape == (6, 10)
    with pytest.raises(
        ValueError, match="decode_impl must be one of auto, graph, packed, static, hf; got 'fast'"
    ):
        generate(model, prompts, settings, decode_impl="fast", **kw)


@pytest.mark.parametrize("every", [2, 3, 7])
def test_checking_for_the_end_less_often_gives_the_same_rollout(every):
    model = tiny("llama", vocab=40)  # a quarter of the vocabulary ends a row: rows end within a few steps
    prompts = [[15, 16, 17], [18, 19]]
    settings = SamplingSettings(max_new_tokens=30, end_ids=tuple(range(1, 11)))
    kw = dict(num_generations=3, pad_id=0, decode_impl="static")
    want = generate(model, prompts, settings, generator=torch.Generator().manual_seed(2), **kw)
    got = generate(
        model, prompts, settings, generator=torch.Generator().manual_seed(2), check_done_every=every, **kw
    )
    assert not want.truncated.any() and want.completion_ids.shape[1] < 30  # every row ended early
    assert want.completion_mask[:, -1].any()  # the last column belongs to some row: nothing left to trim
    for field in ("completion_ids", "completion_mask", "truncated"):
        assert torch.equal(getattr(got, field), getattr(want, field)), field


def test_graph_decoding_is_skipped_for_length_dependent_rope_and_fsdp():
    assert graph_decode_supported(tiny("llama", vocab=50))
    dynamic = tiny(
        "llama", vocab=50, rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4}
    )
    assert not graph_decode_supported(dynamic)
    script = (
        "import sys, torch, torch.distributed as dist; sys.path.insert(0, 'tests')\n"
        "from test_decode import tiny; from grpo.rollout.decoding.graph_decode import graph_decode_supported\n"
        "from torch.distributed.fsdp import fully_shard\n"
        "dist.init_process_group('gloo', rank=0, world_size=1, store=dist.HashStore())\n"
        "model = tiny('llama', vocab=50); [fully_shard(layer) for layer in model.model.layers]\n"
        "print(graph_decode_supported(model)); dist.destroy_process_group()\n"
    )
    root = Path(__file__).resolve().parent.parent
    proc = subprocess.run([sys.executable, "-c", script], cwd=root, capture_output=True, text=True)
    assert proc.stdout.strip() == "False", proc.stderr[-2000:]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("model_type,extra", ARCHITECTURES)
@torch.no_grad()
def test_cuda_graph_decoder_matches_transformers_logits(model_type, extra):
    model = tiny(model_type, vocab=300, **extra).cuda()
    graph = lambda *args: CUDAGraphDecoder(fixed_shape_on_stale_memory(*args))  # noqa: E731
    check_decoder_against_transformers(model, graph, device=CUDA)


def test_packed_decoding_is_only_chosen_for_cpu_fp32_linear_layers():
    model = tiny("llama", vocab=100)
    assert packed_decode_supported(model, CPU, torch.float32)
    assert not packed_decode_supported(model, CPU, torch.bfloat16)
    assert not packed_decode_supported(model, torch.device("meta"), torch.float32)
    model.model.layers[1].mlp.up_proj = torch.nn.Sequential(
        model.model.layers[1].mlp.up_proj
    )  # a foreign wrapper
    assert not packed_decode_supported(model, CPU, torch.float32)


@pytest.mark.parametrize("strategy", MATMUL_STRATEGIES)
def test_packed_projection_fuses_weights_and_biases_and_rejects_other_row_counts(strategy):
    torch.manual_seed(0)
    a, b = torch.nn.Linear(6, 5), torch.nn.Linear(6, 3, bias=False)
    x = torch.randn(4, 6)
    proj = PackedProjection([a, b], rows=4, strategy=strategy)
    out = proj(x)
    torch.testing.assert_close(out, torch.cat([a(x), b(x)], dim=1), atol=1e-6, rtol=1e-6)
    assert out.is_contiguous()  # the decoder views it per head
    alone = PackedProjection([b], rows=4, strategy=strategy)  # no bias at all
    torch.testing.assert_close(alone(x), b(x), atol=1e-6, rtol=1e-6)
    with pytest.raises(ValueError, match="packed projection built for 4 rows got 3"):
        proj(x[:3])


def test_streamed_projection_uses_an_unfused_weight_in_place():
    layer = torch.nn.Linear(8, 16, bias=False)
    proj = PackedProjection([layer], rows=2, strategy="streamed")
    assert proj.weight.data_ptr() == layer.weight.data_ptr()  # no second copy of the weight
    with pytest.raises(ValueError, match="strategy must be one of mkl_packed, streamed; got 'fast'"):
        PackedProjection([layer], rows=2, strategy="fast")


def test_fastest_strategy_is_measured_once_per_shape():
    fastest_strategy.cache_clear()
    assert fastest_strategy(4, 48, 32) in MATMUL_STRATEGIES
    assert fastest_strategy(4, 48, 32) in MATMUL_STRATEGIES
    info = fastest_strategy.cache_info()
    assert (info.misses, info.hits) == (1, 1)


def test_unsupported_architectures_fall_back_to_transformers():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(vocab_size=100, n_embd=16, n_layer=1, n_head=2, n_positions=64)).eval()
    assert not static_decode_supported(model, capacity=32)
    greedy = SamplingSettings(max_new_tokens=4, end_ids=(), greedy=True)
    ro = generate(model, [[1, 2, 3]], greedy, num_generations=2, pad_id=0)
    assert ro.completion_ids.shape == (2, 4)
    assert torch.equal(ro.completion_ids[0], ro.completion_ids[1])  # greedy: both samples agree
    window = tiny("mistral", vocab=100)
    window.config.sliding_window = 16
    assert static_decode_supported(window, capacity=16) and not static_decode_supported(window, capacity=17)


def test_an_explicit_decode_path_that_cannot_run_is_named(tiny_model_dir, tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    from grpo.config import ConfigError, template_from_dict
    from grpo.rollout.decoding.decoders import DECODE_IMPLS, decode_impl_problem
    from grpo.trainer import GRPOTrainer
    from tests.conftest import tiny_template

    llama = tiny("llama", vocab=50)
    assert all(decode_impl_problem(i, llama, CPU, torch.float32, 64) is None for i in DECODE_IMPLS)
    dynamic = tiny(
        "llama", vocab=50, rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4}
    )
    assert decode_impl_problem("graph", dynamic, CPU, torch.float32, 64) == (
        "cannot record FSDP-wrapped layers or a RoPE that rescales with the sequence length"
    )
    for device, dtype in [(CPU, torch.bfloat16), (torch.device("cuda"), torch.float32)]:
        assert (
            decode_impl_problem("packed", llama, device, dtype, 64)
            == "runs on CPU, in float32, with MKL only"
        )
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=100, n_embd=16, n_layer=1, n_head=2, n_positions=64))
    assert decode_impl_problem("static", gpt2, CPU, torch.float32, 64) == (
        "needs a llama/mistral/qwen2/qwen3 model with sdpa or eager attention and no sliding window shorter "
        "than maximum_sequence_length (64)"
    )
    assert decode_impl_problem("auto", gpt2, CPU, torch.float32, 64) is None
    # bf16-mixed samples from a bf16 copy, which the fp32-only packed decoder cannot run: refused at start
    data = tiny_template(tiny_model_dir, tmp_path, dtype="bf16-mixed", decode_impl="packed")
    with pytest.raises(ConfigError) as e:
        GRPOTrainer(template_from_dict(data))
    assert str(e.value) == (
        "config.decode_impl = 'packed' runs on CPU, in float32, with MKL only: use auto, static or hf."
    )


def test_sampler_follows_the_distribution_and_the_nucleus():
    probs = torch.tensor([0.5, 0.25, 0.125, 0.125, 0.0])
    logits = probs.clamp(min=1e-30).log().expand(20_000, 5)
    gen = torch.Generator().manual_seed(0)
    draws = sample_next(logits, temperature=1.0, top_p=1.0, generator=gen)
    freq = torch.bincount(draws, minlength=5).float() / draws.numel()
    torch.testing.assert_close(freq, probs, atol=0.012, rtol=0)
    assert freq[4] == 0  # a zero-probability token is never drawn
    nucleus = sample_next(logits, temperature=1.0, top_p=0.6, generator=gen)  # keeps the first two tokens
    freq = torch.bincount(nucleus, minlength=5).float() / nucleus.numel()
    torch.testing.assert_close(freq, torch.tensor([2 / 3, 1 / 3, 0, 0, 0]), atol=0.012, rtol=0)
    hot = sample_next(logits[:4], temperature=1e-4, top_p=1.0, generator=gen)
    assert hot.tolist() == [0, 0, 0, 0]  # temperature -> 0 is greedy


@pytest.mark.parametrize("sharpness", [8.0, 0.01])  # peaked: the top 1024 hold the nucleus; flat: full sort
def test_nucleus_of_a_large_vocabulary_matches_a_full_sort(sharpness):
    gen = torch.Generator().manual_seed(3)
    probs = torch.softmax(torch.randn(3, 5000, generator=gen) * sharpness, dim=-1)  # [3, 5000]
    kept, ids = nucleus(probs, 0.9)
    got = torch.zeros_like(probs).scatter_(1, ids, kept)  # [3, 5000] back in vocabulary order
    order = probs.argsort(dim=-1, descending=True)
    ranked = probs.gather(1, order)
    keep = ranked.cumsum(-1) - ranked <= 0.9
    want = torch.zeros_like(probs).scatter_(1, order, ranked * keep)
    assert torch.equal(got, want)
    assert ids.shape[1] == (1024 if sharpness > 1 else 5000)
    assert (want.sum(-1) >= 0.9).all() and ((want > 0).sum(-1) < 5000).all()
    draws = sample_next(probs.log().expand(4, 3, 5000)[:, 0], temperature=1.0, top_p=0.9, generator=gen)
    assert all(got[0, t] > 0 for t in draws.tolist())  # samples come from the nucleus only


def reference_filters(probs, top_k, top_p, min_p):
    """The filters spelled out on a full sort, row by row: the specification `truncate` must match."""
    out = torch.zeros_like(probs)
    for row, p in enumerate(probs):
        ranked, order = p.sort(descending=True)
        keep = torch.ones_like(ranked, dtype=torch.bool)
        if top_k > 0:
            keep[top_k:] = False
        kept_mass = ranked[keep].sum()
        if top_p < 1:
            keep &= ranked.cumsum(0) - ranked <= top_p * kept_mass
        keep &= ranked >= min_p * ranked[0]
        out[row, order[keep]] = ranked[keep]
    return out


@pytest.mark.parametrize(
    ("top_k", "top_p", "min_p"),
    [(0, 1.0, 0.05), (50, 1.0, 0.0), (1, 1.0, 0.0), (2000, 0.95, 0.0), (50, 0.8, 0.1), (0, 0.9, 0.02)],
)
@pytest.mark.parametrize("sharpness", [8.0, 1.0])
def test_sampling_filters_match_a_full_sort(top_k, top_p, min_p, sharpness):
    gen = torch.Generator().manual_seed(5)
    probs = torch.softmax(torch.randn(3, 5000, generator=gen) * sharpness, dim=-1)  # [3, 5000]
    kept, ids = truncate(probs, top_k=top_k, top_p=top_p, min_p=min_p)
    got = kept if ids is None else torch.zeros_like(probs).scatter_(1, ids, kept)
    want = reference_filters(probs, top_k, top_p, min_p)
    assert torch.equal(got > 0, want > 0) and torch.equal(got, want)
    assert ((want > 0).sum(-1) < 5000).all()  # every setting here removes something
    logits = probs.log().repeat(200, 1)  # [600, 5000]
    draws = sample_next(logits, temperature=1.0, top_p=top_p, top_k=top_k, min_p=min_p, generator=gen)
    assert (want.repeat(200, 1).gather(1, draws[:, None]) > 0).all()  # only kept tokens are drawn


def test_top_k_and_min_p_draw_in_proportion():
    probs = torch.tensor([0.4, 0.3, 0.2, 0.1, 0.0])
    logits = probs.clamp(min=1e-30).log().expand(20_000, 5)
    gen = torch.Generator().manual_seed(0)

    def freq(**kw):
        draws = sample_next(logits, temperature=1.0, generator=gen, **{"top_p": 1.0, **kw})
        return torch.bincount(draws, minlength=5).float() / draws.numel()

    torch.testing.assert_close(freq(top_k=2), torch.tensor([4 / 7, 3 / 7, 0, 0, 0]), atol=0.012, rtol=0)
    torch.testing.assert_close(freq(min_p=0.4), torch.tensor([4, 3, 2, 0, 0]) / 9, atol=0.012, rtol=0)
    # top_p after top_k is a share of the 0.9 that top_k kept: 0.7 * 0.9 = 0.63 is passed after two tokens
    torch.testing.assert_close(
        freq(top_k=3, top_p=0.7), torch.tensor([4 / 7, 3 / 7, 0, 0, 0]), atol=0.012, rtol=0
    )


def test_sampler_returns_each_draw_log_prob_under_the_unfiltered_softmax():
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(64, 300, generator=gen) * 3
    for kw in ({"top_p": 1.0}, {"top_p": 0.5, "top_k": 20, "min_p": 0.05}):
        tok, logp = sample_next(logits, temperature=0.7, generator=gen, return_logps=True, **kw)
        want = torch.log_softmax(logits / 0.7, dim=-1).gather(1, tok[:, None]).squeeze(1)
        torch.testing.assert_close(logp, want, rtol=0, atol=2e-6)


@pytest.mark.parametrize("impl", ["packed", "static", "graph", "hf"])
def test_rollout_log_probs_match_the_training_forward(impl):
    from grpo.model.logprobs import CompletionLogprobs

    model = tiny("llama", vocab=120)
    gen = torch.Generator().manual_seed(0)
    ro = generate(
        model,
        [[5, 9, 17, 3], [7, 2]],
        # packed decoding starts at 32 new tokens
        SamplingSettings(max_new_tokens=40, end_ids=(11, 12, 13), temperature=0.8),
        num_generations=2,
        pad_id=0,
        generator=gen,
        decode_impl=impl,
    )
    assert ro.sampling_logps.shape == ro.completion_ids.shape
    assert (ro.sampling_logps[ro.completion_mask == 0] == 0).all()
    assert (ro.completion_mask == 0).any()  # some rows ended early: the padding check above means something
    train = CompletionLogprobs(model, temperature=0.8, impl="naive")
    with torch.no_grad():
        want = train(ro.prompt_ids, ro.prompt_mask, ro.completion_ids, ro.completion_mask)
    torch.testing.assert_close(ro.sampling_logps, want, rtol=0, atol=2e-5)
    settings = SamplingSettings(max_new_tokens=4, end_ids=(), greedy=True)
    greedy = generate(model, [[5, 9]], settings, num_generations=2, pad_id=0)
    assert greedy.sampling_logps is None


def test_top_k_one_samples_the_greedy_answer():
    model = tiny("llama", vocab=120)
    prompts = [[5, 9, 17, 3], [7, 2]]
    common = {"num_generations": 3, "pad_id": 0}
    settings = SamplingSettings(max_new_tokens=6, end_ids=(), temperature=1.5)
    greedy = generate(model, prompts, replace(settings, greedy=True), **common)
    gen = torch.Generator().manual_seed(0)
    sampled = generate(model, prompts, replace(settings, top_k=1), generator=gen, **common)
    assert torch.equal(sampled.completion_ids, greedy.completion_ids)
    loose = generate(model, prompts, settings, generator=gen, **common)
    assert not torch.equal(loose.completion_ids, greedy.completion_ids)


HOST_READS = ("__bool__", "item", "tolist", "__int__", "__float__", "__index__", "nonzero", "numpy")


class HostReadError(AssertionError):
    pass


@contextlib.contextmanager
def host_reads_forbidden():
    """A CUDA graph can only record a step that never waits for a value on the device: every way a tensor's
    value reaches Python raises here, so a CPU run of the step shows whether a GPU capture could succeed."""
    saved = {name: getattr(torch.Tensor, name) for name in HOST_READS}

    def forbid(name):
        def read(self, *args, **kwargs):
            raise HostReadError(f"Tensor.{name} read a device value on the host")

        return read

    try:
        for name in HOST_READS:
            setattr(torch.Tensor, name, forbid(name))
        yield
    finally:
        for name, method in saved.items():
            setattr(torch.Tensor, name, method)


@pytest.mark.parametrize("model_type,extra", ARCHITECTURES)
@torch.no_grad()
def test_fixed_shape_step_never_reads_device_values_on_the_host(model_type, extra):
    model = with_lora(tiny(model_type, vocab=300, **extra))
    cache, mask, start = prefill(model, [[5, 6, 7], [8, 9, 10, 11]], pad_id=0)
    mask = mask.repeat_interleave(2, dim=0)
    fixed = FixedShapeDecoder(model, StaticKVCache(cache, 2, 10), mask, 10)
    fixed.tokens.copy_(torch.tensor([20, 21, 22, 23]))
    fixed.positions.copy_(start.repeat_interleave(2))
    with host_reads_forbidden():
        logits = fixed.step()
        with pytest.raises(HostReadError, match="Tensor.item read a device value on the host"):
            fixed.column.item()  # the guard is live
    assert logits.shape == (4, 300) and int(fixed.column) == 5
