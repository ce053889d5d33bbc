"""Training objective and reconstruction metrics (docs/method.md Sec. 2-3), defined once: analyze imports them.

Conventions. A batch x is [L, ..., d] (layer first, as the cache stores it; pass `layer_dim` otherwise,
or `layer_dim=None` for vectors of a single layer). FVU is always computed on the reconstruction in
MODEL space, x_hat = x^~ * std + mean, for both the loss and the reported metrics, as the reference
computes it: the training objective of a minibatch is then exactly the headline metric of that
minibatch, and vectors with a large spread weigh more (their errors are larger in model space), as
they do in every downstream use of the reconstruction. AuxK alone lives in standardized space.

FVU of layer l, reference ("scalar variance") definition:
    sum_{t,f} (x_tlf - x^_tlf)^2  /  sum_{t,f} (x_tlf - m_l)^2,   m_l the mean of ALL scalars of layer l;
per-feature definition (Gao et al.): the same numerator over sum_{t,f} (x_tlf - m_lf)^2, m_lf the mean of
feature f. Over an evaluation set both are pooled (numerator and denominator summed, then divided),
per layer; the headline is the unweighted mean over layers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

from harvest.moments import Moments
from train.sae import SaeOutput

FIRE_THRESHOLD = 1e-3  # a latent fires on a vector when its value exceeds this (as the reference)


def _by_layer(t: Tensor, layer_dim: int | None) -> Tensor:
    """[..., L, ..., d] -> [L, n, d] (a view where possible)."""
    if layer_dim is None:
        return t.reshape(1, -1, t.shape[-1])
    t = t.movedim(layer_dim, 0)
    return t.reshape(t.shape[0], -1, t.shape[-1])


# ---------------------------------------------------------------------------------------------
# the training loss


def minibatch_fvu(x: Tensor, x_hat: Tensor, layer_dim: int | None = 0) -> Tensor:
    """Per-layer FVU [L] of one minibatch (scalar-variance definition), differentiable wrt x_hat."""
    x = _by_layer(x, layer_dim).to(x_hat.dtype)
    x_hat = _by_layer(x_hat, layer_dim)
    with torch.no_grad():
        denom = (x - x.mean((1, 2), keepdim=True)).pow(2).sum((1, 2))
    return (x_hat - x).pow(2).sum((1, 2)) / denom


def auxk_loss(x_tilde: Tensor, x_hat_tilde: Tensor, aux_recon: Tensor | None) -> Tensor:
    """OpenAI's AuxK: how much of the (detached) residual of the main reconstruction, in standardized
    space, the top-k_aux dead latents explain, |r - aux|^2 / |r - mean(r)|^2 pooled over every vector of
    the batch (mean(r): the batch's mean residual vector). Zero when no latent is dead."""
    if aux_recon is None:
        return x_hat_tilde.new_zeros(())
    d = x_tilde.shape[-1]
    r = (x_tilde - x_hat_tilde).detach().reshape(-1, d)
    a = aux_recon.reshape(-1, d).to(r.dtype)
    var = (r - r.mean(0)).pow(2).sum()
    return ((r - a).pow(2).sum() / var).nan_to_num(0.0)  # a perfect main reconstruction: nothing to explain


class LossParts(NamedTuple):
    loss: Tensor  # fvu + aux_coef * auxk, the scalar to backpropagate
    fvu: Tensor  # mean over layers of the per-layer minibatch FVU
    fvu_per_layer: Tensor  # [L]
    auxk: Tensor  # 0 when no latent is dead


def training_loss(x: Tensor, out: SaeOutput, aux_coef: float, layer_dim: int | None = 0) -> LossParts:
    """Mean over layers of the per-layer minibatch FVU (model space) + aux_coef * AuxK."""
    per_layer = minibatch_fvu(x, out.x_hat, layer_dim)
    fvu = per_layer.mean()
    aux = auxk_loss(out.x_tilde, out.x_hat_tilde, out.aux_recon)
    return LossParts(fvu + aux_coef * aux, fvu, per_layer, aux)


# ---------------------------------------------------------------------------------------------
# dead latents


class DeadLatents:
    """Tokens since each latent last fired. Counted in TOKENS, not vectors or steps: an MLSAE batch holds
    L vectors per token, and a latent fires on a token when it exceeds FIRE_THRESHOLD at any of them.
    (The reference counted micro-batches, ~156k tokens instead of 10M.)

    Under DDP, all-reduce `fired` (MAX) and sum n_tokens over ranks before `update`, so that every
    rank holds the same, global counts."""

    def __init__(self, n_latents: int, dead_tokens: int, device: str | torch.device = "cpu"):
        self.dead_tokens = dead_tokens
        self.tokens_since_fired = torch.zeros(n_latents, dtype=torch.long, device=device)

    @staticmethod
    def fired(values: Tensor, indices: Tensor, n_latents: int) -> Tensor:
        """[n_latents] bool: which latents fired anywhere in the batch (no host sync)."""
        hits = torch.zeros(n_latents, device=values.device, dtype=torch.int32)
        hits.index_add_(0, indices.reshape(-1), (values.detach() > FIRE_THRESHOLD).reshape(-1).to(torch.int32))
        return hits > 0

    def update(self, fired: Tensor, n_tokens: int) -> None:
        self.tokens_since_fired.add_(n_tokens).masked_fill_(fired.to(self.tokens_since_fired.device), 0)

    @property
    def mask(self) -> Tensor:
        """[n_latents] bool: dead latents (pass to TopKSae.forward as dead_mask)."""
        return self.tokens_since_fired >= self.dead_tokens

    @property
    def fraction(self) -> float:
        return self.mask.float().mean().item()

    def state_dict(self) -> dict[str, Tensor]:
        return {"tokens_since_fired": self.tokens_since_fired}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self.tokens_since_fired.copy_(state["tokens_since_fired"])


# ---------------------------------------------------------------------------------------------
# pooled FVU over an evaluation set


@dataclass
class FvuResult:
    fvu: list[float]  # per layer, reference (scalar-variance) definition
    fvu_feature: list[float]  # per layer, per-feature definition (Gao et al.)
    mse: list[float]  # per layer, mean squared error per scalar
    fvu_mean: float  # the headline: unweighted mean over layers
    fvu_feature_mean: float


@dataclass
class FvuAccumulator:
    """Streaming, mergeable FVU, per layer. Keeps float64 sums only: the sum of squared errors `sse` [L]
    (model space) and the mergeable moments of x (harvest.moments: count, per-feature mean and m2).
    Both denominators follow from these: the per-feature one is sum_f m2_f, the scalar-variance one adds
    the spread of the feature means around the grand mean,
        sum_{t,f} (x_tf - m)^2 = sum_f m2_f + n * sum_f (mean_f - m)^2,   m = mean_f(mean_f)."""

    sse: Tensor
    moments: Moments

    @property
    def n(self) -> Tensor:
        return self.moments.count

    @property
    def mean(self) -> Tensor:
        return self.moments.mean

    @property
    def m2(self) -> Tensor:
        return self.moments.m2

    @classmethod
    def zeros(cls, n_layers: int, d_model: int, device: str | torch.device = "cpu") -> FvuAccumulator:
        return cls(torch.zeros(n_layers, dtype=torch.float64, device=device), Moments.zeros(n_layers, d_model, device))

    @classmethod
    def of(cls, x: Tensor, x_hat: Tensor, layer_dim: int | None = 0) -> FvuAccumulator:
        """The sums of one batch; one layer at a time in float64 to bound memory."""
        x, x_hat = _by_layer(x, layer_dim), _by_layer(x_hat, layer_dim)
        sse = torch.stack([(x_hat[l].double() - x[l].double()).pow(2).sum() for l in range(x.shape[0])])
        return cls(sse, Moments.of(x))

    def update(self, x: Tensor, x_hat: Tensor, layer_dim: int | None = 0) -> None:
        with torch.no_grad():
            merged = self.merge(FvuAccumulator.of(x, x_hat, layer_dim).to(self.sse.device))
        self.sse, self.moments = merged.sse, merged.moments

    def merge(self, other: FvuAccumulator) -> FvuAccumulator:
        return FvuAccumulator(self.sse + other.sse, self.moments.merge(other.moments))

    def to(self, device: str | torch.device) -> FvuAccumulator:
        return FvuAccumulator(self.sse.to(device), self.moments.to(device))

    def denominators(self) -> tuple[Tensor, Tensor]:
        """(scalar-variance, per-feature) sums of squared deviations, [L] each."""
        feature = self.m2.sum(1)
        grand = self.mean.mean(1, keepdim=True)
        return feature + self.n * (self.mean - grand).pow(2).sum(1), feature

    def compute(self) -> FvuResult:
        scalar, feature = self.denominators()
        fvu, fvu_f = self.sse / scalar, self.sse / feature
        mse = self.sse / (self.n * self.mean.shape[1]).clamp_min(1)
        return FvuResult(fvu.tolist(), fvu_f.tolist(), mse.tolist(), fvu.mean().item(), fvu_f.mean().item())

    def to_tensors(self) -> dict[str, Tensor]:
        return {"sse": self.sse, "n": self.n, "mean": self.mean, "m2": self.m2}

    @classmethod
    def from_tensors(cls, t: dict[str, Tensor]) -> FvuAccumulator:
        return cls(t["sse"], Moments(t["n"], t["mean"], t["m2"]))
