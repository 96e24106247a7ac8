"""The update metrics aggregator: exact means over rows and tokens, maxima, and one host read."""

import pytest
import torch

from grpo.run.update_totals import UpdateTotals


def test_means_over_rows_tokens_and_updates():
    totals = UpdateTotals(torch.device("cpu"))
    # two micro-batches of 1 and 3 rows: row-weighted, so (2 * 1 + 6 * 3) / 4
    totals.add_rows({"loss": torch.tensor(2.0), "kl": 0.5}, rows=1)
    totals.add_rows({"loss": torch.tensor(6.0), "kl": 0.25}, rows=3)
    totals.add_tokens({"entropy": torch.tensor(3.0)})
    totals.add_tokens({"entropy": torch.tensor(9.0)})
    totals.count_tokens(torch.tensor([[1, 1, 0], [1, 1, 1]]), rows=4)  # 5 tokens
    totals.add_max("rollout/mismatch_max", torch.tensor(0.25))
    totals.add_max("rollout/mismatch_max", torch.tensor(0.125))
    totals.grad_norms += [torch.tensor(1.0), torch.tensor(3.0)]  # one per mini-batch update
    totals.thresholds += [torch.tensor(0.5), torch.tensor(1.5)]
    assert totals.result() == pytest.approx(
        {
            "loss": 5.0,
            "kl": (0.5 + 0.75) / 4,
            "entropy": 12.0 / 5,
            "rollout/mismatch_max": 0.25,
            "grad_norm": 2.0,
            "entropy_threshold": 1.0,
        },
        rel=1e-12,
    )


def test_nothing_counted_reads_as_empty():
    assert UpdateTotals(torch.device("cpu")).result() == {}
