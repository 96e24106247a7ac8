"""Running under torchrun: launch.py (environment, process group, failure exits), wrapping.py (DDP / FSDP2),
collectives.py (what crosses ranks besides gradients).

A plain `python scripts/train.py` is world size 1 with no process group and no wrapping. Under torchrun (even
with one process) each process is a rank with one device: a process group starts (nccl on CUDA, gloo on CPU) and
the training forward (`CompletionLogprobs`) is wrapped by `distributed_strategy`:

- ddp:  every rank holds the full model; gradients are averaged over ranks in backward.
- fsdp: FSDP2 `fully_shard` per decoder layer, then the `CompletionLogprobs` root (embeddings, final norm, LM
        head); parameters, gradients and optimizer state are split over ranks. On GPU it computes in bf16 and
        reduces gradients in fp32 (`MixedPrecisionPolicy`). The KL reference model is sharded the same way.

Each rank owns whole groups (all G samples of its prompts), so only metrics and gradients cross ranks.
"""
