"""An update pass's metrics, summed on the device over its mini- and micro-batches and read back once.

Reading a scalar to the host waits for the GPU; doing it for every statistic of every micro-batch stalls the
queue ~7 times per micro-batch. Here each value stays a device tensor until `result()`, which makes one read.
"""

from __future__ import annotations

from typing import Any

import torch


class UpdateTotals:
    """Row-weighted means (loss statistics), token means (entropy, rollout mismatch), extrema and grad norms."""

    def __init__(self, device: torch.device):
        self.device = device
        self.row_sums: dict[str, torch.Tensor] = {}
        self.token_sums: dict[str, torch.Tensor] = {}
        self.maxima: dict[str, torch.Tensor] = {}
        self.minima: dict[str, torch.Tensor] = {}
        self.grad_norms: list[torch.Tensor] = []
        self.thresholds: list[torch.Tensor] = []
        self.rows = 0
        self.tokens = torch.zeros((), device=device)

    def add_rows(self, values: dict[str, Any], rows: int) -> None:
        """Statistics that are means over `rows` sequences (a loss function's stats)."""
        for k, v in values.items():
            v = torch.as_tensor(v, device=self.device).detach().double() * rows
            self.row_sums[k] = self.row_sums[k] + v if k in self.row_sums else v

    def add_tokens(self, values: dict[str, torch.Tensor]) -> None:
        """Sums over completion tokens; `count_tokens` gives the denominator."""
        for k, v in values.items():
            v = v.detach().double()
            self.token_sums[k] = self.token_sums[k] + v if k in self.token_sums else v

    def count_tokens(self, completion_mask: torch.Tensor, rows: int) -> None:
        self.tokens = self.tokens + completion_mask.sum()
        self.rows += rows

    def add_max(self, key: str, value: torch.Tensor) -> None:
        value = value.detach().double()
        self.maxima[key] = torch.maximum(self.maxima[key], value) if key in self.maxima else value

    def add_min(self, key: str, value: torch.Tensor) -> None:
        value = value.detach().double()
        self.minima[key] = torch.minimum(self.minima[key], value) if key in self.minima else value

    def result(self) -> dict[str, float]:
        extrema = {**self.maxima, **self.minima}
        keys = [*self.row_sums, *self.token_sums, *extrema]
        tensors = [*self.row_sums.values(), *self.token_sums.values(), *extrema.values()]
        for key, items in (("grad_norm", self.grad_norms), ("entropy_threshold", self.thresholds)):
            if items:
                keys.append(key)
                tensors.append(torch.stack([x.detach().double() for x in items]).mean())
        numbers = torch.stack([*tensors, self.tokens.double()]).tolist()  # the one read back to the host
        values, tokens = dict(zip(keys, numbers[:-1], strict=True)), max(numbers[-1], 1.0)
        out = {}
        for k, v in values.items():
            if k in self.row_sums:
                out[k] = v / max(self.rows, 1)
            elif k in self.token_sums:
                out[k] = v / tokens
            else:
                out[k] = v
        return out
