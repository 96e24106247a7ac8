"""One training step on fixed completions, for the distributed equivalence tests.

`python tests/dist_step.py TEMPLATE OUT.pt [key=value ...]`, plainly or under torchrun. The rollout is replaced
by completions drawn from a generator seeded by the prompt's index, so any split of the prompts over ranks sees
the same samples. Rank 0 writes the full updated state dict, the first update's gradients (after the
all-reduce) and the step's metrics to OUT.pt.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from grpo.config import load_template  # noqa: E402
from grpo.parallel.launch import run_rank  # noqa: E402
from grpo.parallel.wrapping import full_state_dict  # noqa: E402
from grpo.rollout.generate import Rollout, left_pad  # noqa: E402
from grpo.trainer import GRPOTrainer  # noqa: E402

T = 8  # completion tokens


def fixed_rollout(trainer: GRPOTrainer, batch: list[int]):
    g, pad = trainer.config.num_generations, trainer.tokenizer.pad_token_id
    prompts = [trainer.prompts[i] for i in batch]
    ids, mask = left_pad([p.ids for p in prompts], pad, trainer.device)  # [B, P]
    completion = torch.full((len(batch) * g, T), pad, dtype=torch.long)
    completion_mask = torch.zeros((len(batch) * g, T), dtype=torch.long)
    # made-up sampling log-probs, far from the model's: rollout_is_cap then weights (and caps) many tokens
    sampling_logps = torch.zeros((len(batch) * g, T))
    for row, i in enumerate(j for j in batch for _ in range(g)):
        gen = torch.Generator().manual_seed(1000 * i + row % g)
        length = int(torch.randint(1, T + 1, (1,), generator=gen))
        completion[row, :length] = torch.randint(100, 1000, (length,), generator=gen)
        completion_mask[row, :length] = 1
        sampling_logps[row, :length] = -12.0 * torch.rand(length, generator=gen)
    ro = Rollout(
        prompt_ids=ids.repeat_interleave(g, dim=0),
        prompt_mask=mask.repeat_interleave(g, dim=0),
        completion_ids=completion.to(trainer.device),
        completion_mask=completion_mask.to(trainer.device),
        truncated=completion_mask.sum(-1).eq(T).to(trainer.device),
        group_size=g,
        sampling_logps=sampling_logps.to(trainer.device),
    )
    texts = trainer.tokenizer.batch_decode(
        completion.masked_fill(completion_mask == 0, pad), skip_special_tokens=True
    )
    return (
        ro,
        texts,
        [p.reference for p in prompts for _ in range(g)],
        [p.row for p in prompts for _ in range(g)],
    )


def main(argv: list[str]) -> int:
    trainer = GRPOTrainer(load_template(argv[0], argv[2:]))
    if trainer.turns is not None:  # tools: every turn from the scripted policy of tests/test_multi_turn.py
        from tests.test_multi_turn import multiply_policy, scripted, use_sampler

        use_sampler(trainer, scripted(trainer.tokenizer, multiply_policy))
    else:
        trainer.sampling.rollout = lambda batch, version: fixed_rollout(trainer, batch)[0]
    grads = {}

    def keep_gradients(optimizer, args, kwargs):  # the first update's gradients, before AdamW uses them
        if grads:
            return
        for name, p in trainer.model.named_parameters():
            if p.grad is not None:
                g = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad  # FSDP: every shard
                grads[name.replace("_fsdp_wrapped_module.", "")] = g.detach().cpu().double()

    trainer.optimizer.register_step_pre_hook(keep_gradients)
    metrics, _ = trainer.train_step()
    from grpo.parallel.collectives import reduce_over_ranks

    metrics = reduce_over_ranks(metrics, trainer.env)
    state = full_state_dict(trainer.model, trainer.env)
    if trainer.env.is_main:
        state = state if state is not None else trainer.model.state_dict()
        torch.save(
            {"state": {k: v.detach().cpu() for k, v in state.items()}, "metrics": metrics, "grads": grads},
            argv[1],
        )
    return 0


if __name__ == "__main__":
    sys.exit(run_rank(lambda: main(sys.argv[1:])))
