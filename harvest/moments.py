"""Mergeable per-layer moments: count, per-feature mean and sum of squared deviations (m2), in float64.

Merged with Chan et al.'s parallel formula, so totals do not depend on how the data was split over
batches, write blocks, interrupted runs or ranks (up to rounding), and nothing cancels catastrophically
the way sum(x^2) - n * mean^2 would on Gemma's ~1e5 activations.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class Moments:
    count: Tensor  # [L] float64, vectors seen per layer
    mean: Tensor  # [L, d] float64
    m2: Tensor  # [L, d] float64, sum of squared deviations from the mean

    @classmethod
    def zeros(cls, n_layers: int, d_model: int, device: str | torch.device = "cpu") -> Moments:
        def z(*shape: int) -> Tensor:
            return torch.zeros(*shape, dtype=torch.float64, device=device)

        return cls(z(n_layers), z(n_layers, d_model), z(n_layers, d_model))

    @classmethod
    def of(cls, x: Tensor) -> Moments:
        """Moments of x [L, n, d] (any device, result on the same device); one layer at a time in float64."""
        n_layers, n, d = x.shape
        out = cls.zeros(n_layers, d, x.device)
        if n == 0:
            return out
        for l in range(n_layers):
            xl = x[l].to(torch.float64)
            out.mean[l] = xl.mean(0)
            out.m2[l] = (xl - out.mean[l]).pow(2).sum(0)
        out.count.fill_(n)
        return out

    def merge(self, other: Moments) -> Moments:
        n_a, n_b = self.count[:, None], other.count[:, None]
        n = n_a + n_b
        safe = torch.where(n > 0, n, torch.ones_like(n))
        delta = other.mean - self.mean
        return Moments(
            self.count + other.count,
            self.mean + delta * n_b / safe,
            self.m2 + other.m2 + delta.pow(2) * n_a * n_b / safe,
        )

    def to(self, device: str | torch.device) -> Moments:
        return Moments(self.count.to(device), self.mean.to(device), self.m2.to(device))

    @property
    def var(self) -> Tensor:
        """Per-feature population variance [L, d]."""
        return self.m2 / self.count.clamp(min=1)[:, None]
