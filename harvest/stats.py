"""Per-layer running statistics of cached vectors: count, per-feature mean and variance, mean L2 norm.

Kept per write block and merged (harvest.moments), so the totals do not depend on how blocks were split
over processes or interrupted runs. Only kept (non-special) tokens count: BOS carries a ~1e5 "massive
activation" in Gemma that would swamp every statistic.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .moments import Moments


@dataclass
class LayerStats:
    moments: Moments  # count [L], mean [L, d], m2 [L, d], float64 on the CPU
    norm_sum: torch.Tensor  # [L] float64, sum of L2 norms

    @classmethod
    def zeros(cls, n_layers: int, d_model: int) -> LayerStats:
        return cls(Moments.zeros(n_layers, d_model), torch.zeros(n_layers, dtype=torch.float64))

    @classmethod
    def of(cls, x: torch.Tensor) -> LayerStats:
        """Statistics of x [L, T, d] (any device); one layer at a time in float64 to bound memory."""
        norms = torch.stack([x[l].to(torch.float64).norm(dim=1).sum() for l in range(x.shape[0])])
        return cls(Moments.of(x).to("cpu"), norms.cpu())

    def merge(self, other: LayerStats) -> LayerStats:
        return LayerStats(self.moments.merge(other.moments), self.norm_sum + other.norm_sum)

    @property
    def count(self) -> torch.Tensor:
        return self.moments.count

    @property
    def mean(self) -> torch.Tensor:
        return self.moments.mean

    @property
    def var(self) -> torch.Tensor:
        """Per-feature population variance [L, d]."""
        return self.moments.var

    @property
    def mean_norm(self) -> torch.Tensor:
        return self.norm_sum / self.count.clamp(min=1)

    def to_tensors(self) -> dict[str, torch.Tensor]:
        m = self.moments
        return {"count": m.count, "mean": m.mean, "m2": m.m2, "norm_sum": self.norm_sum}

    @classmethod
    def from_tensors(cls, t: dict[str, torch.Tensor]) -> LayerStats:
        return cls(Moments(t["count"], t["mean"], t["m2"]), t["norm_sum"])
