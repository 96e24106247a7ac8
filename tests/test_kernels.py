"""kernels/: every fast path against the naive reference (values and gradients), fp32 tight and bf16 relative."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest
import torch
from torch import Tensor

from grpo_kernels.chunked import CHUNK_BYTES, default_chunk_size
from grpo_kernels.dispatch import available_impls, token_logprobs
from grpo_kernels.naive import naive_token_logprobs

B, T, H, V = 2, 47, 32, 123  # odd shapes: N = 94 rows is not a multiple of any chunk size tested
CUDA = torch.cuda.is_available()
needs_triton = pytest.mark.skipif("triton" not in available_impls(), reason="needs CUDA and triton")


def make_inputs(
    *,
    n: int = B * T,
    vocab: int = V,
    dtype: torch.dtype = torch.float32,
    bias: bool = False,
    device: str = "cpu",
) -> dict[str, Tensor | None]:
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(n, H, generator=gen) * 2  # [N, H] logits of std ~2, like a trained LM head
    weight = torch.randn(vocab, H, generator=gen) / H**0.5  # [V, H]
    b = torch.randn(vocab, generator=gen) if bias else None  # [V]
    targets = torch.randint(0, vocab, (n,), generator=gen)  # [N]

    def leaf(x: Tensor | None) -> Tensor | None:
        return None if x is None else x.to(device=device, dtype=dtype).requires_grad_()

    return {"hidden": leaf(hidden), "weight": leaf(weight), "bias": leaf(b), "targets": targets.to(device)}


def run(
    inp: dict, *, impl: str, entropy: bool = False, mask: Tensor | None = None, **kw
) -> dict[str, Tensor]:
    """Values and gradients of sum(g * logp) [+ sum(g2 * entropy)] w.r.t. hidden, weight and bias."""
    n = inp["targets"].shape[0]
    gen = torch.Generator().manual_seed(1)
    g = torch.randn(n, generator=gen).to(inp["targets"].device)  # [N] upstream gradient (advantage-like)
    g2 = torch.randn(n, generator=gen).to(inp["targets"].device)  # [N]
    if mask is not None:
        g, g2 = g * mask, g2 * mask
    out = token_logprobs(
        inp["hidden"],
        inp["weight"],
        inp["targets"],
        bias=inp["bias"],
        impl=impl,
        return_entropy=entropy,
        **kw,
    )
    logp, ent = out if entropy else (out, None)
    loss = (logp * g).sum() + ((ent * g2).sum() if entropy else 0)
    names = [k for k in ("hidden", "weight", "bias") if inp[k] is not None and inp[k].requires_grad]
    leaves = [inp[k] for k in names]
    grads = torch.autograd.grad(loss, leaves) if n else [torch.zeros_like(x) for x in leaves]
    res = {"logp": logp.detach(), **{f"grad_{k}": gr for k, gr in zip(names, grads)}}
    if entropy:
        res["entropy"] = ent.detach()
    return res


def assert_matches(got: dict, want: dict, atol: float = 1e-5, rtol: float = 1e-5) -> None:
    assert got.keys() == want.keys()
    for k in want:
        assert got[k].dtype == want[k].dtype, k
        torch.testing.assert_close(got[k], want[k], atol=atol, rtol=rtol, msg=lambda m, k=k: f"{k}: {m}")


@pytest.mark.parametrize("chunk_size", [1, 7, 1000])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("entropy", [False, True])
def test_chunked_matches_reference_fp32(
    chunk_size: int, bias: bool, temperature: float, entropy: bool
) -> None:
    inp = make_inputs(bias=bias)
    kw = {"temperature": temperature, "entropy": entropy}
    got = run(inp, impl="chunked", chunk_size=chunk_size, **kw)
    assert got["logp"].dtype == torch.float32 and got["logp"].shape == (B * T,)
    assert_matches(got, run(inp, impl="naive", **kw))


def test_values_are_log_probs_and_entropy() -> None:
    inp = make_inputs(bias=True)
    logp, ent = token_logprobs(
        inp["hidden"], inp["weight"], inp["targets"], bias=inp["bias"], temperature=1.5, return_entropy=True
    )
    logits = (inp["hidden"] @ inp["weight"].T + inp["bias"]).double() / 1.5  # [N, V]
    p = torch.softmax(logits, -1)
    want_logp = p.log().gather(1, inp["targets"].unsqueeze(1)).squeeze(1)
    torch.testing.assert_close(logp.double(), want_logp, atol=1e-5, rtol=0)
    torch.testing.assert_close(ent.double(), -(p * p.log()).sum(-1), atol=1e-5, rtol=0)
    assert (logp <= 0).all() and (ent >= 0).all() and (ent <= torch.log(torch.tensor(V)) + 1e-5).all()


@pytest.mark.parametrize("impl", ["naive", "chunked"])
def test_masked_rows_get_exactly_zero_grads(impl: str) -> None:
    inp = make_inputs(bias=True)
    mask = torch.ones(B, T)  # [B, T]
    mask[0] = 0  # a fully masked sequence
    mask[1, 30:] = 0  # padding after the completion ended
    got = run(inp, impl=impl, mask=mask.flatten(), entropy=True, chunk_size=7)
    masked = ~mask.flatten().bool()
    assert got["grad_hidden"][masked].abs().max() == 0
    assert_matches(got, run(inp, impl="naive", mask=mask.flatten(), entropy=True))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_frozen_head_computes_hidden_grad_in_forward(dtype: torch.dtype) -> None:
    # LoRA: the LM head is frozen, so d log p / d hidden is computed in forward (2 matmuls instead of 3).
    inp = make_inputs(dtype=dtype, bias=True)
    inp["weight"].requires_grad_(False)
    inp["bias"].requires_grad_(False)
    mask = torch.ones(B * T)
    mask[:T] = 0
    got = run(inp, impl="chunked", chunk_size=7, temperature=0.7, mask=mask)
    assert set(got) == {"logp", "grad_hidden"} and got["grad_hidden"][:T].abs().max() == 0
    assert got["grad_hidden"].dtype == dtype
    ref = run(inp, impl="naive", temperature=0.7, mask=mask)
    if dtype == torch.float32:
        assert_matches(got, ref)
    else:
        exact = run({k: _f64(v) for k, v in inp.items()}, impl="naive", temperature=0.7, mask=mask)
        for k in exact:
            e_fast, e_ref = ((x[k].double() - exact[k].double()).abs().max() for x in (got, ref))
            assert e_fast <= 2 * e_ref + 1e-6, (k, e_fast, e_ref)


def test_all_rows_masked_gives_zero_weight_grad() -> None:
    inp = make_inputs(bias=True)
    got = run(inp, impl="chunked", mask=torch.zeros(B * T), entropy=True, chunk_size=7)
    for k in ("grad_hidden", "grad_weight", "grad_bias"):
        assert got[k].abs().max() == 0, k


@pytest.mark.parametrize("impl", ["naive", "chunked"])
def test_zero_rows(impl: str) -> None:
    inp = make_inputs(n=0, bias=True)
    logp, ent = token_logprobs(
        inp["hidden"], inp["weight"], inp["targets"], bias=inp["bias"], impl=impl, return_entropy=True
    )
    assert logp.shape == ent.shape == (0,) and logp.dtype == torch.float32
    (logp.sum() + ent.sum()).backward()
    assert inp["weight"].grad.abs().max() == 0 and inp["hidden"].grad.shape == (0, H)


def bf16_errors(impl: str, **kw) -> tuple[dict[str, float], dict[str, float]]:
    """Max abs error vs an fp64 reference on the same bf16 inputs, for `impl` and for the bf16 reference."""
    inp = make_inputs(dtype=torch.bfloat16, bias=True)
    exact = run({k: _f64(v) for k, v in inp.items()}, impl="naive", entropy=True, **kw)
    errs = []
    for name in (impl, "naive"):
        got = run(inp, impl=name, entropy=True, **kw)
        errs.append({k: (got[k].double() - exact[k].double()).abs().max().item() for k in exact})
    return errs[0], errs[1]


def _f64(x: Tensor | None) -> Tensor | None:
    if x is None or not x.is_floating_point():
        return x
    return x.detach().double().requires_grad_(x.requires_grad)


@pytest.mark.parametrize("chunk_size", [7, 1000])
def test_chunked_bf16_error_within_twice_the_reference_error(chunk_size: int) -> None:
    fast, ref = bf16_errors("chunked", chunk_size=chunk_size, temperature=0.7)
    for k in ref:
        assert fast[k] <= 2 * ref[k] + 1e-6, (k, fast[k], ref[k])
        assert ref[k] > 0, k  # the comparison is meaningful: bf16 does lose precision here


def test_bf16_weight_grad_accumulates_in_fp32_across_chunks() -> None:
    # 512 one-row chunks against one chunk: with fp32 accumulation they differ by at most the final bf16
    # rounding (1 ulp = 2^-8 relative); summing bf16 partials in bf16 would drift by many ulps.
    inp = make_inputs(n=512, dtype=torch.bfloat16, bias=True)
    one_by_one = run(inp, impl="chunked", chunk_size=1)
    at_once = run(inp, impl="chunked", chunk_size=512)
    for k in ("grad_weight", "grad_bias"):
        a, b = one_by_one[k].float(), at_once[k].float()
        assert ((a - b).abs() <= b.abs() * 2**-7 + 1e-6).all(), k


@pytest.mark.parametrize("chunk_size,matmuls", [(B * T, 3), (B * T - 1, 8)])
def test_backward_reuses_a_single_chunk_instead_of_recomputing_it(chunk_size: int, matmuls: int) -> None:
    # One chunk: forward's matmul + grad hidden + grad weight. Two chunks: 2 forward, then per chunk a
    # recomputation of its logits + grad hidden + grad weight.
    from torch.utils._python_dispatch import TorchDispatchMode

    class CountMatmuls(TorchDispatchMode):
        count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.addmm, torch.ops.aten.addmm_):
                CountMatmuls.count += 1
            return func(*args, **(kwargs or {}))

    inp = make_inputs()
    with CountMatmuls():
        got = run(inp, impl="chunked", chunk_size=chunk_size)
    assert CountMatmuls.count == matmuls
    assert_matches(got, run(inp, impl="naive"))


@pytest.mark.parametrize("case", ["one chunk", "several chunks", "frozen head"])
def test_detached_entropy_is_a_constant_that_keeps_the_fast_backward(case: str) -> None:
    # An entropy wanted only as a metric or a mask: values as the reference's, no gradient through it, and the
    # log-probs' backward takes exactly the matmuls it takes without the entropy.
    from torch.utils._python_dispatch import TorchDispatchMode

    class CountMatmuls(TorchDispatchMode):
        """Counts matmuls, and tensors made with at least 0.9 N x V elements (logit-sized buffers)."""

        def __init__(self):
            super().__init__()
            self.count, self.big = 0, 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.addmm, torch.ops.aten.addmm_):
                self.count += 1
            out = func(*args, **(kwargs or {}))
            if func.overloadpacket in (torch.ops.aten.empty, torch.ops.aten.empty_like):
                self.big += out.numel() >= B * T * V * 9 // 10
            return out

    chunk = B * T - 1 if case == "several chunks" else B * T
    counts, results = [], []
    for detach in (False, True):
        inp = make_inputs(bias=True)
        if case == "frozen head":
            inp["weight"].requires_grad_(False)
            inp["bias"].requires_grad_(False)
        leaves = [x for x in (inp["hidden"], inp["weight"], inp["bias"]) if x.requires_grad]
        with CountMatmuls() as counter:
            out = token_logprobs(
                inp["hidden"],
                inp["weight"],
                inp["targets"],
                bias=inp["bias"],
                temperature=0.7,
                impl="chunked",
                chunk_size=chunk,
                return_entropy=detach,
                detach_entropy=detach,
            )
            logp = out[0] if detach else out
            grads = torch.autograd.grad(logp.sum(), leaves)
        counts.append((counter.count, counter.big))
        results.append((logp.detach(), *grads))
        if detach:
            assert not out[1].requires_grad
            _, want = token_logprobs(
                *(inp[k].detach() for k in ("hidden", "weight")),
                inp["targets"],
                bias=inp["bias"].detach(),
                temperature=0.7,
                impl="naive",
                return_entropy=True,
            )
            torch.testing.assert_close(out[1], want, atol=1e-5, rtol=1e-5)
    assert counts[0] == counts[1], counts  # the same matmuls and no extra logit-sized buffer
    for got, want in zip(results[1], results[0]):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_naive_detached_entropy_has_no_grad() -> None:
    inp = make_inputs()
    logp, ent = token_logprobs(
        inp["hidden"], inp["weight"], inp["targets"], impl="naive", return_entropy=True, detach_entropy=True
    )
    assert logp.requires_grad and not ent.requires_grad


def test_only_inputs_and_row_stats_are_saved_for_backward() -> None:
    # Records every tensor autograd keeps: the chunked path must keep nothing of size N x V.
    inp = make_inputs(n=400, vocab=1000, bias=True)
    n_by_v = 400 * 1000

    def largest_saved(impl: str) -> int:
        sizes = []
        with torch.autograd.graph.saved_tensors_hooks(lambda x: sizes.append(x.numel()) or x, lambda x: x):
            token_logprobs(
                inp["hidden"], inp["weight"], inp["targets"], bias=inp["bias"], impl=impl, chunk_size=64
            )
        return max(sizes)

    assert largest_saved("naive") >= n_by_v  # the hook does see the reference's [N, V] tensors
    assert largest_saved("chunked") <= max(inp["weight"].numel(), inp["hidden"].numel())


def test_tied_embeddings_accumulate_both_grads() -> None:
    inp = make_inputs()
    ids = torch.randint(0, V, (B * T,), generator=torch.Generator().manual_seed(2))
    grads = []
    for impl in ("naive", "chunked"):
        w = inp["weight"].detach().clone().requires_grad_()
        hidden = torch.tanh(w[ids] * 3)  # [N, H] the embedding of the inputs, through a "model"
        logp = token_logprobs(hidden, w, inp["targets"], impl=impl, chunk_size=10)
        (logp * torch.linspace(-1, 1, B * T)).sum().backward()
        grads.append(w.grad)
    torch.testing.assert_close(grads[1], grads[0], atol=1e-5, rtol=1e-5)


def test_no_grad_inference_and_int32_targets() -> None:
    inp = make_inputs()
    with torch.no_grad():
        got = token_logprobs(inp["hidden"], inp["weight"], inp["targets"].int(), impl="chunked")
        want = naive_token_logprobs(inp["hidden"], inp["weight"], inp["targets"])
    assert not got.requires_grad
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_mixed_dtypes_and_autocast() -> None:
    inp = make_inputs()
    w16 = inp["weight"].detach().bfloat16().requires_grad_()  # a bf16 head on fp32 hidden states: promoted
    got = token_logprobs(inp["hidden"], w16, inp["targets"], impl="chunked", chunk_size=7)
    want = naive_token_logprobs(inp["hidden"], w16.float(), inp["targets"])
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    got.sum().backward()
    assert w16.grad.dtype == torch.bfloat16
    with torch.autocast("cpu", dtype=torch.bfloat16):  # like a bf16 LM head under autocast
        fast = token_logprobs(inp["hidden"], inp["weight"], inp["targets"], impl="chunked", chunk_size=7)
        ref = token_logprobs(inp["hidden"], inp["weight"], inp["targets"], impl="naive")
    assert fast.dtype == torch.float32
    torch.testing.assert_close(fast, ref, atol=0.1, rtol=0)  # both use bf16 logits
    exact = naive_token_logprobs(
        inp["hidden"].detach().bfloat16().double(), inp["weight"].bfloat16().double(), inp["targets"]
    )
    assert (fast - exact).abs().max() <= 2 * (ref - exact).abs().max() + 1e-6
    fast.sum().backward()
    assert inp["weight"].grad.dtype == torch.float32


def test_bad_impl_name_is_one_clear_sentence() -> None:
    inp = make_inputs()
    with pytest.raises(ValueError) as err:
        token_logprobs(inp["hidden"], inp["weight"], inp["targets"], impl="fused")
    assert str(err.value) == "impl must be one of 'auto', 'naive', 'chunked', 'triton'; got 'fused'."


@pytest.mark.parametrize(
    "kw, field",
    [({"chunk_size": 0}, "chunk_size"), ({"targets": torch.zeros(3, dtype=torch.long)}, "targets")],
)
def test_bad_arguments_name_the_field(kw: dict, field: str) -> None:
    inp = make_inputs()
    args = {"targets": inp["targets"], **kw}
    with pytest.raises(ValueError, match=f"^{field} must be"):
        token_logprobs(inp["hidden"], inp["weight"], **args)


def test_available_impls_and_auto_on_this_machine() -> None:
    impls = available_impls()
    assert impls[:2] == ["naive", "chunked"]
    assert ("triton" in impls) == CUDA or not CUDA
    if not CUDA:
        inp = make_inputs()
        with pytest.raises(ValueError, match="^impl='triton' needs CUDA tensors"):
            token_logprobs(inp["hidden"], inp["weight"], inp["targets"], impl="triton")


def test_default_chunk_size_bounds_the_chunk_buffer() -> None:
    for vocab in (123, 49_152, 151_936):
        rows = default_chunk_size(vocab)
        assert rows >= 16 and (rows * vocab * 4 <= CHUNK_BYTES or rows == 16)


@needs_triton
@pytest.mark.parametrize("chunk_size", [7, 1000])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_triton_matches_reference_fp32(chunk_size: int, bias: bool, temperature: float) -> None:
    torch.backends.cuda.matmul.allow_tf32 = False
    inp = make_inputs(bias=bias, device="cuda")
    kw = {"temperature": temperature, "entropy": True}
    got = run(inp, impl="triton", chunk_size=chunk_size, **kw)
    assert_matches(got, run(inp, impl="naive", **kw))


@needs_triton
@pytest.mark.parametrize("vocab", [V, 5000])  # 5000: several vocabulary blocks per row, a partial last one
def test_triton_bf16_error_within_twice_the_reference_error(vocab: int) -> None:
    inp = make_inputs(dtype=torch.bfloat16, bias=True, vocab=vocab, device="cuda")
    exact = run({k: _f64(v) for k, v in inp.items()}, impl="naive", entropy=True, temperature=0.7)
    fast = run(inp, impl="triton", entropy=True, temperature=0.7, chunk_size=7)
    ref = run(inp, impl="naive", entropy=True, temperature=0.7)
    for k in exact:
        e_fast = (fast[k].double() - exact[k].double()).abs().max().item()
        e_ref = (ref[k].double() - exact[k].double()).abs().max().item()
        assert e_fast <= 2 * e_ref + 1e-6, (k, e_fast, e_ref)


@needs_triton
def test_triton_masked_rows_and_auto() -> None:
    inp = make_inputs(bias=True, device="cuda")
    mask = torch.ones(B * T, device="cuda")
    mask[:T] = 0
    got = run(inp, impl="auto", mask=mask, entropy=True, chunk_size=7)
    assert got["grad_hidden"][:T].abs().max() == 0
    empty = make_inputs(n=0, device="cuda")
    assert token_logprobs(empty["hidden"], empty["weight"], empty["targets"], impl="triton").shape == (0,)


INTERPRETED = """
import triton.runtime.interpreter as ti
if hasattr(ti, "_patch_lang_tensor"):  # triton < 3.7 calls int() on a [1] array, an error from numpy 2.4 on
    patch_tensor = ti._patch_lang_tensor
    def _patch_lang_tensor(tensor, scope):
        patch_tensor(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))
    ti._patch_lang_tensor = _patch_lang_tensor
import torch, grpo_kernels.triton_logprobs as tl_mod
from grpo_kernels.chunked import ChunkedLogprobs
from grpo_kernels.naive import naive_token_logprobs
tl_mod.BLOCK_V = 32  # several vocabulary blocks per row, a partial last one
g = torch.Generator().manual_seed(0)
h, w = torch.randn(94, 16, generator=g) * 2, torch.randn(123, 16, generator=g) / 4
b, t = torch.randn(123, generator=g), torch.randint(0, 123, (94,), generator=g)
g1, g2 = torch.randn(94, generator=g), torch.randn(94, generator=g)
# (frozen head, entropy, entropy gradient); frozen: d log p / d hidden is computed in forward (eager)
for frozen_head, entropy, entropy_grad in [(0, 1, 1), (1, 0, 0), (1, 1, 0), (0, 1, 0)]:
    outs = []
    for fast in (True, False):
        leaves = [x.clone().requires_grad_(not frozen_head or x is h) for x in (h, w, b)]
        if fast:
            eager = bool(frozen_head and not entropy_grad)
            args = (t, 0.7, 7, bool(entropy), bool(entropy_grad), eager, tl_mod.TritonChunkOps)
            res = ChunkedLogprobs.apply(*leaves, *args)
        else:
            res = naive_token_logprobs(*leaves[:2], t, bias=leaves[2], temperature=0.7,
                                       return_entropy=bool(entropy), detach_entropy=not entropy_grad)
        lp, en = res if entropy else (res, torch.zeros(94))
        assert en.requires_grad == bool(entropy_grad)
        wrt = [x for x in leaves if x.requires_grad]
        loss = (lp * g1).sum() + ((en * g2).sum() if entropy_grad else 0)
        outs.append([lp, en, *torch.autograd.grad(loss, wrt)])
    for got, want in zip(*outs):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
print("ok")
"""


@pytest.mark.skipif(CUDA or importlib.util.find_spec("triton") is None, reason="needs triton, without CUDA")
def test_triton_kernels_in_interpreter_mode() -> None:
    # Without a GPU, Triton's interpreter runs the kernels on CPU tensors: the kernels' math, not their speed.
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run(
        [sys.executable, "-c", INTERPRETED], env=env, cwd=root, capture_output=True, text=True
    )
    assert proc.stdout.strip() == "ok", proc.stderr[-2000:]
