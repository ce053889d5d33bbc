"""Per-layer running statistics of cached vectors: count, per-feature mean and variance, mean L2 norm, the
number of non-finite values stored, and (float8) the number of values beyond the scales' range.

Kept per write block and merged (harvest.moments), so the totals do not depend on how blocks were split
over processes or interrupted runs. Only kept tokens count: BOS carries a ~1e5 "massive activation" in
Gemma that would swamp every statistic (in `reference` mode special tokens are kept and stored as zeros,
so they count, as zeros). Vectors holding NaN or inf (stored only with --allow-nonfinite) are left out of
the moments and norms and counted in `nonfinite` instead, value by value, over every stored position.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .moments import Moments


@dataclass
class LayerStats:
    moments: Moments  # count [L], mean [L, d], m2 [L, d], float64 on the CPU
    norm_sum: torch.Tensor  # [L] float64, sum of L2 norms
    nonfinite: torch.Tensor = field(default=None)  # type: ignore[assignment]  # [L] float64, NaN/inf values
    # [L] float64: float8 values beyond their channel's range, stored saturated (only with --allow-out-of-range)
    out_of_range: torch.Tensor = field(default=None)  # type: ignore[assignment]

    def __post_init__(self) -> None:
        if self.nonfinite is None:  # statistics written before the count existed
            self.nonfinite = torch.zeros_like(self.norm_sum)
        if self.out_of_range is None:  # statistics of other dtypes, or written before float8 existed
            self.out_of_range = torch.zeros_like(self.norm_sum)

    @classmethod
    def zeros(cls, n_layers: int, d_model: int) -> LayerStats:
        return cls(Moments.zeros(n_layers, d_model), torch.zeros(n_layers, dtype=torch.float64))

    @classmethod
    def of(cls, x: torch.Tensor, kept: torch.Tensor | None = None) -> LayerStats:
        """Statistics of the vectors x [L, T, d] (any device) at the positions `kept` [T] (bool; all if None):
        moments and norms over those whose values are all finite; non-finite values counted over all T."""
        finite = torch.isfinite(x)
        nonfinite = (~finite).sum(dim=(1, 2)).to("cpu", torch.float64)
        if not bool(nonfinite.any()):  # the usual case: the same rows of every layer
            out = cls._moments(x if kept is None else x[:, kept])
        else:  # each layer over its own finite rows
            rows = finite.all(dim=2) if kept is None else finite.all(dim=2) & kept
            parts = [cls._moments(x[l : l + 1, rows[l]]) for l in range(x.shape[0])]
            out = cls(
                Moments(*(torch.cat([getattr(p.moments, k) for p in parts]) for k in ("count", "mean", "m2"))),
                torch.cat([p.norm_sum for p in parts]),
            )
        out.nonfinite = nonfinite
        return out

    @classmethod
    def _moments(cls, x: torch.Tensor) -> LayerStats:
        """Moments and norm sums of every vector of x [L, T, d]; one layer at a time in float64 to bound memory."""
        norms = torch.stack([x[l].to(torch.float64).norm(dim=1).sum() for l in range(x.shape[0])])
        return cls(Moments.of(x).to("cpu"), norms.cpu())

    def merge(self, other: LayerStats) -> LayerStats:
        return LayerStats(
            self.moments.merge(other.moments),
            self.norm_sum + other.norm_sum,
            self.nonfinite + other.nonfinite,
            self.out_of_range + other.out_of_range,
        )

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
        out = {"count": m.count, "mean": m.mean, "m2": m.m2, "norm_sum": self.norm_sum, "nonfinite": self.nonfinite}
        if bool(self.out_of_range.any()):  # other caches' statistics files stay byte-identical to before
            out["out_of_range"] = self.out_of_range
        return out

    @classmethod
    def from_tensors(cls, t: dict[str, torch.Tensor]) -> LayerStats:
        return cls(Moments(t["count"], t["mean"], t["m2"]), t["norm_sum"], t.get("nonfinite"), t.get("out_of_range"))
