"""Peak memory and time of one log-prob step (forward + backward) for each implementation in kernels/.

    python scripts/bench_kernels.py                      # 8 x 1024 rows, V = 49,152 and 151,936, H = 896
    python scripts/bench_kernels.py --vocab 151936 --impls naive,chunked --chunk-size 256 --repeat 5

fp32 on CPU, bf16 on CUDA (override with --dtype). The step is what the trainer does:
logp = token_logprobs(hidden, weight, targets); (logp * g).sum().backward() with grads for hidden and weight.

How memory is measured, and why it is honest:
- CPU: PyTorch's CPU allocator has no peak counter, and large tensors come straight from mmap, so each
  measurement runs in a fresh child process: the child builds the inputs, reads its resident set size (RSS),
  runs the step once and reads the kernel's high-water mark ru_maxrss. Peak = ru_maxrss - RSS before the step:
  every byte the step touched above its inputs (logits, temporaries, and the gradients it returns). The child
  also reports whether an earlier high-water mark could hide part of it (then the number is a lower bound).
- CUDA: torch.cuda.max_memory_allocated after reset_peak_memory_stats, minus the memory allocated before.
Time: each child runs one more step after the memory-measuring one, timed both as wall-clock and as the
process's CPU time (user + system; steadier when other work shares the machine). Children run in rounds
(naive, chunked, naive, chunked, ...) and the table keeps each impl's fastest round and median peak.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _maxrss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def measure(
    impl: str,
    rows: int,
    vocab: int,
    hidden: int,
    dtype: str,
    repeat: int,
    chunk: int | None,
    frozen_head: bool = False,
) -> dict[str, float | bool | None]:
    """One implementation at one shape, in this process; returns peak bytes and seconds per step."""
    import torch

    from grpo_kernels.dispatch import token_logprobs

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    dt = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    gen = torch.Generator(device=dev).manual_seed(0)
    # Filled in place: no temporary copy of the inputs raises the high-water mark before the step.
    h = torch.empty(rows, hidden, dtype=dt, device=dev).normal_(0, 4, generator=gen)  # [N, H]
    w = torch.empty(vocab, hidden, dtype=dt, device=dev).normal_(0, hidden**-0.5, generator=gen)  # [V, H]
    h.requires_grad_()
    w.requires_grad_(not frozen_head)
    t = torch.randint(0, vocab, (rows,), device=dev, generator=gen)  # [N]
    g = torch.rand(rows, device=dev, generator=gen)  # [N] upstream gradient, like advantage * mask

    def step() -> None:
        h.grad = w.grad = None
        logp = token_logprobs(h, w, t, impl=impl, chunk_size=chunk)
        (logp * g).sum().backward()
        if dev == "cuda":
            torch.cuda.synchronize()

    if dev == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        peak, lower_bound = torch.cuda.max_memory_allocated() - before, False
    else:
        before = _rss_bytes()
        lower_bound = _maxrss_bytes() > before + 16 * 2**20  # an earlier high-water mark may mask the step's
        step()
        peak = _maxrss_bytes() - before
    walls, cpus = [], []
    for _ in range(repeat):
        cpu0, start = _cpu_seconds(), time.perf_counter()
        step()
        walls.append(time.perf_counter() - start)
        cpus.append(_cpu_seconds() - cpu0)
    return {"peak": peak, "lower_bound": lower_bound, "wall": min(walls), "cpu": min(cpus)}


def _cpu_seconds() -> float:
    """User + system CPU time of this process: on a shared machine it moves less than wall time does."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def _child(args: argparse.Namespace, impl: str, vocab: int) -> dict | None:
    name, _, chunk = impl.partition(":")
    cmd = [sys.executable, os.path.abspath(__file__), "--child", name, "--vocab", str(vocab)]
    cmd += ["--rows", str(args.rows), "--hidden", str(args.hidden), "--dtype", args.dtype, "--repeat", "1"]
    chunk = chunk or args.chunk_size
    cmd += ["--chunk-size", str(chunk)] if chunk else []
    cmd += ["--frozen-head"] if args.frozen_head else []
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:  # e.g. -9: the kernel's out-of-memory killer took the naive step
        print(
            f"# {impl} at V={vocab} failed with exit code {proc.returncode}: {proc.stderr[-300:]}", flush=True
        )
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=8 * 1024, help="N = B * T rows (default 8 x 1024)")
    p.add_argument("--vocab", type=int, nargs="+", default=[49_152, 151_936])
    p.add_argument("--hidden", type=int, default=896)
    p.add_argument(
        "--impls",
        default=None,
        help="comma-separated, NAME or NAME:CHUNK; default naive,chunked (+triton on CUDA)",
    )
    p.add_argument("--repeat", type=int, default=3, help="rounds; each runs every impl once, in turn")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default=None, help="fp32 on CPU, bf16 on CUDA")
    p.add_argument("--chunk-size", type=int, default=None, help="rows per chunk (default: the kernels' own)")
    p.add_argument("--frozen-head", action="store_true", help="no gradient for the LM head (as with LoRA)")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()

    import torch

    cuda = torch.cuda.is_available()
    args.dtype = args.dtype or ("bf16" if cuda else "fp32")
    if args.child:
        shape = (args.rows, args.vocab[0], args.hidden)
        res = measure(args.child, *shape, args.dtype, args.repeat, args.chunk_size, args.frozen_head)
        print(json.dumps(res))
        return
    impls = args.impls.split(",") if args.impls else ["naive", "chunked"] + (["triton"] if cuda else [])
    device = torch.cuda.get_device_name() if cuda else f"{_cpu_name()}, {os.cpu_count()} cores"
    print(
        f"# {device}, torch {torch.__version__}, {args.dtype}, N={args.rows}, H={args.hidden}, {args.repeat} rounds"
        + (", frozen LM head" if args.frozen_head else ""),
        flush=True,
    )
    print("| V | impl | peak memory (MiB) | vs naive | wall (s) | vs naive | CPU (s) | vs naive |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|", flush=True)
    for vocab in args.vocab:
        runs: dict[str, list[dict]] = {impl: [] for impl in impls}
        for _ in range(args.repeat):  # rounds interleave the impls, so a busy spell hits them alike
            for impl in impls:
                r = _child(args, impl, vocab)  # one child at a time: never two big ones at once
                runs[impl] += [r] if r else []
        # Each vocabulary's rows go out as soon as it is done: a time limit hit during the next one keeps them.
        rows = table_rows(vocab, runs)
        if rows:  # none when every child failed (each failure was printed)
            print(rows, flush=True)


def table_rows(vocab: int, runs: dict[str, list[dict]]) -> str:
    """One vocabulary's rows: each impl's median peak and fastest round, against naive's."""
    best = {
        impl: {
            "peak": statistics.median(r["peak"] for r in rs),
            "lower_bound": any(r["lower_bound"] for r in rs),
            "wall": min(r["wall"] for r in rs),  # the least disturbed step
            "cpu": min(r["cpu"] for r in rs),
        }
        for impl, rs in runs.items()
        if rs
    }
    base = best.get("naive")
    lines = []
    for impl, r in best.items():
        cols = [
            f"{vocab:,}",
            impl,
            f"{r['peak'] / 2**20:,.0f}" + (" (lower bound)" if r["lower_bound"] else ""),
        ]
        cols.append(f"{base['peak'] / r['peak']:.1f}x lower" if base and impl != "naive" else "")
        for k in ("wall", "cpu"):
            cols += [f"{r[k]:.2f}", f"{r[k] / base[k]:.2f}x" if base and impl != "naive" else ""]
        lines.append("| " + " | ".join(cols) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
