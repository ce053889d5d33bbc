"""Per-layer running statistics of cached vectors: count, per-feature mean and variance, mean L2 norm.

Kept per write block and merged with Chan et al.'s parallel formula, so the totals do not depend on
how blocks were split over processes or interrupted runs. Only kept (non-special) tokens count:
BOS carries a ~1e5 "massive activation" in Gemma that would swamp every statistic.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class LayerStats:
    count: torch.Tensor  # [L] float64, vectors seen per layer
    mean: torch.Tensor  # [L, d] float64
    m2: torch.Tensor  # [L, d] float64, sum of squared deviations from the mean
    norm_sum: torch.Tensor  # [L] float64, sum of L2 norms

    @classmethod
    def zeros(cls, n_layers: int, d_model: int) -> "LayerStats":
        z = lambda *s: torch.zeros(*s, dtype=torch.float64)
        return cls(z(n_layers), z(n_layers, d_model), z(n_layers, d_model), z(n_layers))

    @classmethod
    def of(cls, x: torch.Tensor) -> "LayerStats":
        """Statistics of x [L, T, d] (any device); one layer at a time in float64 to bound memory."""
        n_layers, n, d = x.shape
        out = cls.zeros(n_layers, d)
        if n == 0:
            return out
        for l in range(n_layers):
            xl = x[l].to(torch.float64)
            mean = xl.mean(0)
            out.mean[l] = mean.cpu()
            out.m2[l] = ((xl - mean) ** 2).sum(0).cpu()
            out.norm_sum[l] = xl.norm(dim=1).sum().cpu()
        out.count.fill_(n)
        return out

    def merge(self, other: "LayerStats") -> "LayerStats":
        n_a, n_b = self.count[:, None], other.count[:, None]
        n = n_a + n_b
        safe = torch.where(n > 0, n, torch.ones_like(n))
        delta = other.mean - self.mean
        mean = self.mean + delta * n_b / safe
        m2 = self.m2 + other.m2 + delta**2 * n_a * n_b / safe
        return LayerStats(self.count + other.count, mean, m2, self.norm_sum + other.norm_sum)

    @property
    def var(self) -> torch.Tensor:
        """Per-feature population variance [L, d]."""
        return self.m2 / self.count.clamp(min=1)[:, None]

    @property
    def mean_norm(self) -> torch.Tensor:
        return self.norm_sum / self.count.clamp(min=1)

    def to_tensors(self) -> dict[str, torch.Tensor]:
        return {"count": self.count, "mean": self.mean, "m2": self.m2, "norm_sum": self.norm_sum}

    @classmethod
    def from_tensors(cls, t: dict[str, torch.Tensor]) -> "LayerStats":
        return cls(t["count"], t["mean"], t["m2"], t["norm_sum"])
