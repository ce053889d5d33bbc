"""Where along the residual stream each latent fires: streaming layer distributions and variance ratios.

Exactly docs/method.md Sec. 4. With h_j(x_{t,l}) the activation of latent j on token t at layer l (0 outside
the top k, and values <= FIRE_THRESHOLD = 1e-3 count as 0), layers indexed l = 0..L-1 by POSITION in
the SAE's layer list (the model's layer numbers are recorded beside), and the joint distribution
P(l, t, j) proportional to h_j(x_{t,l}):

    mass        m[j, l]          = sum_t h_j(x_{t,l})
    P(L=l|J=j)                   = m[j, l] / sum_l' m[j, l']
    E[L|J=j], Var(L|J=j)         from P(L|J=j)
    Var(L)                       over all mass: P(l) = sum_j m[j, l] / sum_{j,l} m[j, l]
    E[Var(L|J)]                  = sum_j P(j) Var(L|J=j),            P(j) = sum_l m[j, l] / M
    E[Var(L|J,T)]                = sum_{t,j} P(t,j) Var(L|T=t,J=j)   = (1/M) sum_{t,j} m_tj Var_tj

with m_tj = sum_l h_j(x_{t,l}) and m_tj Var_tj = sum_l h l^2 - (sum_l h l)^2 / m_tj. By the law of total
variance Var(L) >= E[Var(L|J)] >= E[Var(L|J,T)], so both reported ratios lie in [0, 1].

Everything is a sum over tokens: `LayerDistribution` holds [n_latents, L] and [n_latents] float64
tensors plus a few scalars, whatever the token count, and merges across batches, shards and ranks.
Per batch, the (token, latent) groups are found by sorting each token's L*k latent ids (a batched sort
of short rows) instead of building a dense [T, n_latents] matrix; all bookkeeping is a handful of
vectorized index_adds over the T*L*k top-k entries, so the SAE encoder stays the cost.

`--reference-formulas`: `reference_variance_terms` reimplements the paper's code (tim-lawson/mlsae,
mlsae/analysis/variances.py, class Metric), whose "variances" are not proper variances; see there. Its
per-batch averages depend on what a batch holds, so it is fed the tokens as the reference sees them:
whole context windows in text order (`WindowOrder`; the chunks are read block by block, as a window's
tokens never leave its write block), consecutive windows filling each batch of 2,048 tokens (the
reference's one sequence of 2,048), zeros at BOS/EOS/PAD in `reference` mode. In `exclude` mode the
special positions are missing from those windows (the reference has zeros there): the result says so.
With `--reference-formulas` both columns use the same tokens: the leading whole windows of seeded blocks
(`_whole_windows`) holding at least `--tokens` used tokens, never a window cut by the budget.
"""

from __future__ import annotations

import json
import math
import time
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Iterator, NamedTuple, Sequence

import numpy as np
import torch
from safetensors.torch import save_file
from torch import Tensor

from analyze.results import LayerVariances, MultiLayer, ReferenceFormulas, VarianceResult
from harvest import ChunkReader
from harvest.atomic import atomic_write
from harvest.errors import SpecError
from train.objectives import FIRE_THRESHOLD
from train.special import SpecialTokens

DISTRIBUTION_FILE = "layer_distribution.safetensors"
HEATMAP_PNG = "layer_heatmap.png"
HISTOGRAM_PNG = "layer_mean_histogram.png"
REFERENCE_BATCH_TOKENS = 2048  # the reference's test batches: batch_size 1 x max_length 2048 (DataConfig defaults)

DEFINITIONS = {
    "tokens": "kept tokens of the cache (special tokens excluded), in the ChunkReader's seeded chunk order",
    "activation": "h_j(x_{t,l}): TopK activation of latent j on token t at layer position l "
    "(0 outside the top k; values <= 1e-3 count as 0). Layers are positions 0..L-1 in `layers`.",
    "p_layer_given_latent": "P(L=l|J=j) = sum_t h_j(x_{t,l}) / sum_{t,l'} h_j(x_{t,l'})",
    "var_l": "Var(L) under P(l) = sum_{t,j} h_j(x_{t,l}) / sum_{t,j,l'} h_j(x_{t,l'}) (all activation mass)",
    "exp_var_l_given_j": "E[Var(L|J)] = sum_j P(j) Var(L|J=j), P(j) = activation mass of j / total mass",
    "exp_var_l_given_jt": "E[Var(L|J,T)] = sum_{t,j} P(t,j) Var(L|T=t,J=j), P(t,j) = sum_l h_j(x_{t,l}) / "
    "total mass, P(L=l|T=t,J=j) = h_j(x_{t,l}) / sum_l' h_j(x_{t,l'})",
    "ratio_latent": "E[Var(L|J)] / Var(L): share of the layer variance left within latents",
    "ratio_token": "E[Var(L|J,T)] / E[Var(L|J)]: share of a latent's layer variance left within one token",
    "multi_layer_per_token_mean": "mean over tokens t with >= 1 active latent of |M_t| / |A_t|, A_t = latents "
    "active at >= 1 layer on t, M_t = those active at >= 2 layers on t",
    "multi_layer_per_token_pooled": "sum_t |M_t| / sum_t |A_t| (per (token, latent) pair)",
    "multi_layer_aggregated": "latents with nonzero mass at >= 2 layers (summed over all tokens) / latents "
    "with nonzero mass",
}


# ---------------------------------------------------------------------------------------------
# one batch: group the top-k entries by (token, latent)


class Groups(NamedTuple):
    """The (token, latent) groups of one batch, and every top-k entry in group order.

    Inactive entries (h = 0) get the id n_latents and form groups of their own ("void" groups: latent
    == n_latents, mass 0); callers send those to a spare slot n_latents that they drop, which is cheaper
    than filtering them out with boolean masks."""

    token: Tensor  # [G] int64
    latent: Tensor  # [G] int64, n_latents for void groups
    mass: Tensor  # [G] float64: m_tj = sum_l h
    s1: Tensor  # [G] float64: sum_l h l
    s2: Tensor  # [G] float64: sum_l h l^2
    n_layers: Tensor  # [G] int64: layers at which j is active on t (TopK ids are distinct per vector)
    entry_h: Tensor  # [E] float64: every top-k entry (E = T*L*k) in group order, 0 for inactive entries
    entry_layer: Tensor  # [E] int64
    entry_latent: Tensor  # [E] int64, n_latents for inactive entries
    entry_group: Tensor  # [E] int64: index into the [G] arrays


def active_values(values: Tensor) -> Tensor:
    """float64 activations with values <= FIRE_THRESHOLD set to 0 (docs/method.md Sec. 4)."""
    # compared in the values' own dtype, as train.objectives does: a float32 1e-3 is not above 1e-3
    return torch.where(
        values > FIRE_THRESHOLD, values.to(torch.float64), torch.zeros((), dtype=torch.float64, device=values.device)
    )


def group_by_token_latent(values: Tensor, indices: Tensor, n_latents: int) -> Groups:
    """values, indices [L, T, k] (L layers of the same T tokens) -> Groups.

    Each token's L*k latent ids are sorted (one batched sort over short rows): a group starts where the
    sorted id changes, so a running count of starts numbers the groups, with no [T, n_latents] matrix."""
    L, T, k = values.shape
    dev = values.device
    h = active_values(values)
    void = torch.full((), n_latents, dtype=torch.int64, device=dev)
    # token-major rows of L*k entries; entry i of a row comes from layer i // k
    ids = torch.where(h > 0, indices.to(torch.int64), void).permute(1, 0, 2).reshape(T, L * k)
    ids, order = ids.sort(dim=1)
    h = h.permute(1, 0, 2).reshape(T, L * k).gather(1, order).reshape(-1)
    layer = (order // k).reshape(-1)
    start = torch.ones_like(ids, dtype=torch.bool)
    start[:, 1:] = ids[:, 1:] != ids[:, :-1]
    ids, start = ids.reshape(-1), start.reshape(-1)
    seg = start.cumsum(0) - 1
    first = start.nonzero().squeeze(1)
    # groups never span two tokens (each row starts one), and every entry of a non-void group is active:
    # its length is the number of layers at which the latent fires on the token
    length = torch.diff(first, append=first.new_tensor([ids.numel()]))
    hl = h * layer
    sums = torch.zeros(3, len(first), dtype=torch.float64, device=dev)
    for row, x in zip(sums, (h, hl, hl * layer)):  # one index_add each: cheaper than stacking E-long rows
        row.index_add_(0, seg, x)
    return Groups(first // (L * k), ids[first], sums[0], sums[1], sums[2], length, h, layer, ids, seg)


# ---------------------------------------------------------------------------------------------
# the accumulator


@dataclass
class LayerDistribution:
    """Streaming sums over tokens (float64); memory is O(n_latents * L), independent of the token count.

    mass[j, l]        sum_t h_j(x_{t,l})
    token_var[j]      sum_t m_tj Var(L|T=t,J=j)  (= sum_t [sum_l h l^2 - (sum_l h l)^2 / m_tj])
    pairs[j]          tokens on which j is active at >= 1 layer
    multi_pairs[j]    tokens on which j is active at >= 2 layers
    tokens            tokens seen
    active_tokens     tokens with >= 1 active latent
    multi_share_sum   sum over active tokens of |M_t| / |A_t| (see DEFINITIONS)
    layers            the model's layer numbers of positions 0..L-1 (int64)
    """

    mass: Tensor
    token_var: Tensor
    pairs: Tensor
    multi_pairs: Tensor
    tokens: Tensor
    active_tokens: Tensor
    multi_share_sum: Tensor
    layers: Tensor

    @classmethod
    def zeros(cls, n_latents: int, layers: Sequence[int], device: str | torch.device = "cpu") -> "LayerDistribution":
        f = lambda *s: torch.zeros(*s, dtype=torch.float64, device=device)
        return cls(
            f(n_latents, len(layers)),
            f(n_latents),
            f(n_latents),
            f(n_latents),
            f(()),
            f(()),
            f(()),
            torch.tensor(list(layers), dtype=torch.int64, device=device),
        )

    @property
    def n_latents(self) -> int:
        return self.mass.shape[0]

    @property
    def n_layers(self) -> int:
        return self.mass.shape[1]

    @torch.no_grad()
    def update(self, values: Tensor, indices: Tensor) -> None:
        """Add one batch: values, indices [L, T, k], the L layers of the SAME T tokens."""
        L, T, _ = values.shape
        if self.n_layers != L:
            raise ValueError(f"got activations of {L} layers, the accumulator has {self.n_layers}")
        n, dev = self.n_latents, values.device
        g = group_by_token_latent(values, indices, n)
        # inactive entries carry h = 0 and the id n: clamping their id keeps the sum unchanged
        self.mass.view(-1).index_add_(0, g.entry_latent.clamp_max(n - 1) * L + g.entry_layer, g.entry_h)
        real = (g.latent < n).to(torch.float64)
        multi = real * (g.n_layers > 1)
        # m Var = s2 - s1^2 / m (0 for void groups, where all three are 0); the clamp removes the rounding
        # error of one-layer groups, exactly 0 in exact arithmetic
        m_var = (g.s2 - g.s1 * g.s1 / torch.where(g.mass > 0, g.mass, 1.0)).clamp_min_(0)
        per_latent = torch.zeros(3, n + 1, dtype=torch.float64, device=dev)  # slot n: void groups, dropped
        for row, x in zip(per_latent, (m_var, real, multi)):
            row.index_add_(0, g.latent, x)
        self.token_var += per_latent[0, :n]
        self.pairs += per_latent[1, :n]
        self.multi_pairs += per_latent[2, :n]
        per_tok = torch.zeros(2, T, dtype=torch.float64, device=dev)  # |A_t|, |M_t|
        per_tok[0].index_add_(0, g.token, real)
        per_tok[1].index_add_(0, g.token, multi)
        self.tokens += T
        self.active_tokens += (per_tok[0] > 0).sum()
        self.multi_share_sum += (per_tok[1] / per_tok[0].clamp_min(1)).sum()  # M_t = 0 where A_t = 0

    def merge(self, other: "LayerDistribution") -> "LayerDistribution":
        """The accumulator of both token sets (neither input changes)."""
        if self.mass.shape != other.mass.shape or not torch.equal(self.layers.cpu(), other.layers.cpu()):
            raise ValueError("cannot merge layer distributions of different SAEs or layer lists")
        return LayerDistribution(
            **{
                f.name: (
                    getattr(self, f.name)
                    if f.name == "layers"
                    else getattr(self, f.name) + getattr(other, f.name).to(self.mass.device)
                )
                for f in fields(self)
            }
        )

    def all_reduce_(self) -> "LayerDistribution":
        """Sum over the ranks of torch.distributed, in place (no-op when it is not initialized)."""
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            for f in fields(self):
                if f.name != "layers":
                    dist.all_reduce(getattr(self, f.name))
        return self

    def to_tensors(self) -> dict[str, Tensor]:
        return {f.name: getattr(self, f.name).detach().cpu().contiguous() for f in fields(self)}

    @classmethod
    def from_tensors(cls, d: dict[str, Tensor], device: str | torch.device = "cpu") -> "LayerDistribution":
        return cls(**{f.name: d[f.name].to(device) for f in fields(cls)})

    # -- results -----------------------------------------------------------------------------

    def latent_mass(self) -> Tensor:
        return self.mass.sum(1)

    def p_layer_given_latent(self) -> Tensor:
        """P(L=l|J=j) [n_latents, L]; rows of latents without mass are 0."""
        m = self.latent_mass()
        return self.mass / torch.where(m > 0, m, 1.0).unsqueeze(1)

    def mean_layer(self) -> Tensor:
        """E[L|J=j] [n_latents]; NaN for latents without mass."""
        l = torch.arange(self.n_layers, dtype=torch.float64, device=self.mass.device)
        return self._nan_where_empty(self.p_layer_given_latent() @ l)

    def var_layer(self) -> Tensor:
        """Var(L|J=j) [n_latents]; NaN for latents without mass."""
        l = torch.arange(self.n_layers, dtype=torch.float64, device=self.mass.device)
        p = self.p_layer_given_latent()
        mu = p @ l
        return self._nan_where_empty((p * (l - mu.unsqueeze(1)) ** 2).sum(1))

    def var_layer_within_token(self) -> Tensor:
        """E[Var(L|J=j,T)] [n_latents] = sum_t P(t|j) Var(L|T=t,J=j); NaN for latents without mass."""
        m = self.latent_mass()
        return self._nan_where_empty(self.token_var / torch.where(m > 0, m, 1.0))

    def _nan_where_empty(self, x: Tensor) -> Tensor:
        return torch.where(self.latent_mass() > 0, x, torch.full((), math.nan, dtype=x.dtype, device=x.device))

    def variances(self) -> LayerVariances:
        """Var(L), E[Var(L|J)], E[Var(L|J,T)] and the two ratios (NaN where undefined)."""
        m_j = self.latent_mass()
        M = m_j.sum()
        l = torch.arange(self.n_layers, dtype=torch.float64, device=self.mass.device)
        if M <= 0:
            return LayerVariances(math.nan, math.nan, math.nan, math.nan, math.nan)
        p_l = self.mass.sum(0) / M
        mu = (p_l * l).sum()
        var_l = (p_l * (l - mu) ** 2).sum().item()
        # sum_j P(j) Var(L|J=j) = (1/M) sum_j sum_l m[j,l] (l - E[L|J=j])^2 (latents without mass add 0)
        mu_j = (self.mass @ l) / torch.where(m_j > 0, m_j, 1.0)
        e_var_j = ((self.mass * (l - mu_j.unsqueeze(1)) ** 2).sum() / M).item()
        e_var_jt = (self.token_var.sum() / M).item()
        return LayerVariances(
            var_l=var_l,
            exp_var_l_given_j=e_var_j,
            exp_var_l_given_jt=e_var_jt,
            ratio_latent=_div(e_var_j, var_l),
            ratio_token=_div(e_var_jt, e_var_j),
        )

    def multi_layer(self) -> MultiLayer:
        """Fractions of latents active at more than one layer, per token and aggregated (DEFINITIONS)."""
        with_mass = self.mass > 0
        active = with_mass.any(1)
        multi = with_mass.sum(1) > 1
        return MultiLayer(
            per_token_mean=_div(self.multi_share_sum.item(), self.active_tokens.item()),
            per_token_pooled=_div(self.multi_pairs.sum().item(), self.pairs.sum().item()),
            aggregated=_div(multi.sum().item(), active.sum().item()),
            active_latents=int(active.sum()),
            multi_layer_latents=int(multi.sum()),
            active_tokens=int(self.active_tokens.item()),
            mean_active_latents_per_token=_div(self.pairs.sum().item(), self.active_tokens.item()),
        )


def _div(a: float, b: float) -> float:
    return a / b if b != 0 else math.nan


# ---------------------------------------------------------------------------------------------
# the reference code's formulas (for comparison only)


REFERENCE_SOURCE = "github.com/tim-lawson/mlsae, mlsae/analysis/variances.py (class Metric: var, update, compute)"
REFERENCE_KEYS = ("exp_var_l_f", "exp_var_l_tf", "var_l", "rel_var_f", "rel_var_t")


def reference_variance_terms(values: Tensor, indices: Tensor, n_latents: int) -> dict[str, float]:
    """The reference code's per-batch quantities, for one batch of T tokens (values, indices [L, T, k]).

    Faithful to mlsae/analysis/variances.py (tim-lawson/mlsae), which scatters the top k into a dense
    latents [L, T, F] (F = n_latents) and computes

        probs = latents / latents.sum(0), NaN -> 0          # P(l|t,f); all zeros where f is off on t
        var(x) = sum_l l^2 x[l] - (sum_l l x[l])^2          # over dim 0, NOT normalized by sum_l x[l]
        exp_var_l_f  = var(probs.mean(1)).mean()            # mean over f of var of q_f = mean_t P(.|t,f)
        exp_var_l_tf = var(probs).mean()                    # mean over ALL (t, f), inactive ones as 0
        var_l        = var(probs.mean((1, 2)))              # var of q = mean_{t,f} P(.|t,f)
        rel_var_f    = exp_var_l_f / var_l
        rel_var_t    = exp_var_l_tf / exp_var_l_f

    Why these are not variances: q_f sums to the fraction of tokens on which f is active (a_f << 1), so
    var(q_f) ~= sum_l l^2 q_f[l] (the subtracted square is O(a_f^2)), and likewise var_l ~= sum_l l^2 q[l]
    with q = mean_f q_f: both numerator and denominator of rel_var_f are ~ sum_l l^2 q[l], so the first
    ratio is ~1 whatever the data. exp_var_l_tf averages proper per-(t, f) variances (over all T*F pairs,
    inactive ones as 0), but exp_var_l_f is ~ a second moment about layer 0, not a variance, so rel_var_t
    is biased low, the more so the further latents sit from layer 0.

    Computed here from the (token, latent) groups without the dense [L, T, F] tensor (same numbers);
    activations <= 1e-3 count as 0, as everywhere in this module (the reference thresholds nothing,
    which changes nothing beyond rounding since such values are rare and tiny)."""
    L, T, _ = values.shape
    F = n_latents
    g = group_by_token_latent(values, indices, n_latents)
    dev = values.device
    l = torch.arange(L, dtype=torch.float64, device=dev)
    safe = torch.where(g.mass > 0, g.mass, 1.0)
    p = g.entry_h / safe[g.entry_group]  # P(l|t,f) of each entry; 0 for inactive ones (h = 0)
    # q_f[l] = mean_t P(l|t,f): dense [L, F] (the size of the accumulator, independent of T)
    q_f = torch.zeros(L * F, dtype=torch.float64, device=dev)
    q_f.index_add_(0, g.entry_layer * F + g.entry_latent.clamp_max(F - 1), p / T)
    q_f = q_f.view(L, F)

    def var(x: Tensor) -> Tensor:  # the reference's Metric.var, over dim 0
        lv = l.view(L, *([1] * (x.dim() - 1)))
        return (lv**2 * x).sum(0) - ((lv * x).sum(0)) ** 2

    exp_var_l_f = var(q_f).mean()
    # var(probs) at an active (t, f) is the proper Var(L|t,f) = s2/m - (s1/m)^2; 0 at inactive ones
    var_tf = g.s2 / safe - (g.s1 / safe) ** 2  # void groups: 0
    exp_var_l_tf = var_tf.sum() / (T * F)
    var_l = var(q_f.mean(1))
    return {
        "exp_var_l_f": exp_var_l_f.item(),
        "exp_var_l_tf": exp_var_l_tf.item(),
        "var_l": var_l.item(),
        "rel_var_f": _div(exp_var_l_f.item(), var_l.item()),
        "rel_var_t": _div(exp_var_l_tf.item(), exp_var_l_f.item()),
    }


@dataclass
class ReferenceVariances:
    """The reference's averaging: its quantities per batch of `batch_tokens` tokens, then the plain mean
    of each (ratios included) over batches, as Metric.compute does. Tokens are regrouped into batches of
    exactly `batch_tokens` (the reference asserts full batches); a final partial batch is left out."""

    n_latents: int
    n_layers: int
    batch_tokens: int = REFERENCE_BATCH_TOKENS
    sums: Tensor = field(default_factory=lambda: torch.zeros(len(REFERENCE_KEYS), dtype=torch.float64))
    batches: int = 0
    _carry: list[tuple[Tensor, Tensor]] = field(default_factory=list, repr=False)  # tokens of the next batch

    @property
    def carried(self) -> int:
        return sum(v.shape[1] for v, _ in self._carry)

    @torch.no_grad()
    def update(self, values: Tensor, indices: Tensor) -> None:
        """values, indices [L, T, k]: the next T tokens of the stream."""
        if values.shape[0] != self.n_layers:
            raise ValueError(f"got activations of {values.shape[0]} layers, expected {self.n_layers}")
        self._carry.append((values, indices))
        if self.carried < self.batch_tokens:
            return
        v, i = (torch.cat(x, dim=1) for x in zip(*self._carry))
        n_full = v.shape[1] // self.batch_tokens
        for b in range(n_full):
            s = slice(b * self.batch_tokens, (b + 1) * self.batch_tokens)
            terms = reference_variance_terms(v[:, s], i[:, s], self.n_latents)
            self.sums += torch.tensor([terms[k] for k in REFERENCE_KEYS], dtype=torch.float64)
            self.batches += 1
        rest = slice(n_full * self.batch_tokens, None)
        self._carry = [(v[:, rest].clone(), i[:, rest].clone())] if v.shape[1] > n_full * self.batch_tokens else []

    def all_reduce_(self) -> "ReferenceVariances":
        """Sum the per-batch sums over ranks; each rank's partial batch stays left out."""
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            t = torch.cat([self.sums, torch.tensor([float(self.batches)], dtype=torch.float64)])
            if dist.get_backend() == "nccl":
                t = t.cuda()
            dist.all_reduce(t)
            t = t.cpu()
            self.sums, self.batches = t[:-1], int(t[-1].item())
        return self

    def compute(self, tokens_seen: str = "") -> ReferenceFormulas:
        n = self.batches
        means = {k: (self.sums[i].item() / n if n else math.nan) for i, k in enumerate(REFERENCE_KEYS)}
        return ReferenceFormulas(
            **means,
            batches=n,
            batch_tokens=self.batch_tokens,
            tokens=n * self.batch_tokens,
            source=REFERENCE_SOURCE,
            tokens_seen=tokens_seen,
        )


class WindowOrder:
    """Encoded tokens arrive in the cache's shuffled order; this hands them on as whole context windows in
    text order (positions sorted, windows by number) the moment a window's every used token has arrived.
    `expected[w]`: the tokens of window w the stream uses. Holds at most the windows of the blocks being
    read (the caller reads block by block)."""

    def __init__(self, expected: Tensor):
        self.expected = expected
        self._parts: dict[int, list[tuple[Tensor, Tensor, Tensor]]] = {}  # window -> [(pos, values, indices)]
        self._got: dict[int, int] = {}

    def add(self, seq: Tensor, pos: Tensor, values: Tensor, indices: Tensor) -> list[tuple[Tensor, Tensor]]:
        """seq, pos [T]; values, indices [L, T, k] -> the windows completed by these tokens, in window order."""
        order = torch.argsort(seq, stable=True)
        seq, pos = seq[order].tolist(), pos[order]
        values, indices = values[:, order.to(values.device)], indices[:, order.to(indices.device)]
        done, i = [], 0
        while i < len(seq):
            w, j = seq[i], i
            while j < len(seq) and seq[j] == w:
                j += 1
            self._parts.setdefault(w, []).append((pos[i:j], values[:, i:j], indices[:, i:j]))
            self._got[w] = self._got.get(w, 0) + j - i
            if self._got[w] >= int(self.expected[w]):
                done.append(w)
            i = j
        out = []
        for w in sorted(done):
            parts = self._parts.pop(w)
            del self._got[w]
            p = torch.cat([q for q, _, _ in parts])
            v, x = torch.cat([v for _, v, _ in parts], dim=1), torch.cat([x for _, _, x in parts], dim=1)
            o = torch.argsort(p).to(v.device)
            out.append((v[:, o], x[:, o]))
        return out

    @property
    def pending(self) -> int:
        """Windows started but not complete (left out of the reference's batches when the budget ends)."""
        return len(self._parts)


def block_grouped(order: Sequence[int], layout: Any) -> list[int]:
    """`order` (a seeded chunk order) regrouped block by block: blocks in the order they first appear,
    chunks within a block in their order, so every window is complete after its block's last chunk."""
    first: dict[int, int] = {}
    block = [layout.chunk_range(int(c))[0] // layout.block_tokens for c in order]
    for i, b in enumerate(block):
        first.setdefault(b, i)
    return [int(c) for _, _, c in sorted((first[b], i, c) for i, (b, c) in enumerate(zip(block, order)))]


# ---------------------------------------------------------------------------------------------
# cache + SAE -> variance.json, layer_distribution.safetensors, figures


@contextmanager
def _distributed() -> Iterator[tuple[int, int]]:
    """(rank, world size): from torch.distributed when initialized; under torchrun when nobody has
    initialized it yet, initialize it here and tear it down on the way out."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        yield dist.get_rank(), dist.get_world_size()
        return
    from harvest.env import Dist

    d = Dist.init()  # world size 1 unless WORLD_SIZE says otherwise
    try:
        yield d.rank, d.world_size
    finally:
        d.close()


@torch.no_grad()
def run_variance(
    sae_dir: str | Path,
    cache_path: str | Path,
    tokens: int,
    out_dir: str | Path,
    reference_formulas: bool = False,
    device: str = "auto",
    chunks: Sequence[int] | None = None,
    progress: bool = True,
    rows: int = 4096,
    seed: int = 0,
    reference_batch_tokens: int = REFERENCE_BATCH_TOKENS,
    figures: bool = True,
    log: Callable[[str], None] = print,
) -> VarianceResult:
    """Layer distributions and variance ratios of the SAE in `sae_dir` over up to `tokens` kept tokens.

    Reads whole chunks of the cache (all complete chunks, or `chunks`) in the ChunkReader's seeded order
    (`seed`), keeps the tokens the run trained on (its special-token mode: the `keep` flag, or every
    token for include-real; held-out windows included) until `tokens` are used, restricted to the
    layers the SAE was trained on (the run record's layers), and encodes them in
    sub-batches of `rows` tokens x L layers on `device`. Under torchrun (torch.distributed initialized)
    the chunks are split over ranks, each rank takes its share of `tokens`, the accumulators are summed
    over ranks, and rank 0 alone writes. Writes variance.json, layer_distribution.safetensors and two
    PNG figures into `out_dir`; returns the result (the content of variance.json)."""
    from harvest.models import resolve_device
    from train.inputs import open_inputs

    if tokens < 1:
        raise SpecError(f"--tokens must be positive, got {tokens}")
    sae_dir, out_dir = Path(sae_dir), Path(out_dir)
    inputs = open_inputs(sae_dir, cache_path, purpose="analyze variance")
    record, cache, layers = inputs.record, inputs.cache, inputs.record.layers
    if not inputs.trained_on:
        log(f"reading {inputs.describe()}")
    dev = resolve_device(device)
    sae = record.load_sae(dev)
    with _distributed() as (rank, world):
        reader = ChunkReader(
            cache,
            layers=layers,
            seed=seed,
            rank=rank,
            world_size=world,
            chunks=chunks,
            pin_memory=dev.startswith("cuda"),
        )
        budget = tokens // world + (rank < tokens % world)  # this rank's share of the kept tokens
        acc = LayerDistribution.zeros(sae.cfg.n_latents, layers, dev)
        ref = ReferenceVariances(sae.cfg.n_latents, len(layers), reference_batch_tokens) if reference_formulas else None
        t0 = time.perf_counter()
        special = SpecialTokens.of(record.special_tokens, cache)
        order, windows = reader.order(0), None
        if ref is not None:  # the reference's formulas on whole windows in text order: read block by block
            order, windows, budget = _whole_windows(cache, reader, special, seed, rank, world, budget)
        _stream(sae, reader, order, budget, rows, dev, acc, ref, windows, progress and rank == 0, special)
        seconds = time.perf_counter() - t0
        acc.all_reduce_()
        if ref is not None:
            ref.all_reduce_()

    result = VarianceResult(
        tokens=int(acc.tokens.item()),
        tokens_requested=tokens,
        layers=list(layers),
        n_latents=sae.cfg.n_latents,
        k=sae.cfg.k,
        variances=acc.variances(),
        multi_layer=acc.multi_layer(),
        reference=ref.compute(_tokens_seen(special.mode, ref.batch_tokens, cache.layout.context))
        if ref is not None
        else None,
        special_tokens=special.mode,
        sae=str(sae_dir.resolve()),
        cache=cache.location,
        cache_fingerprint=cache.fingerprint,
        lens=cache.lens_record,
        seed=seed,
        device=dev,
        world_size=world,
        seconds=seconds,
        tokens_per_s=acc.tokens.item() / max(seconds, 1e-9),
        definitions=DEFINITIONS,
    )
    if rank == 0:
        if result.tokens < tokens:
            log(f"note: the chosen chunks hold only {result.tokens:,} kept tokens; used them all")
        _write_outputs(acc, result, out_dir, figures)
    return result


def _whole_windows(
    cache: Any, reader: ChunkReader, special: SpecialTokens, seed: int, rank: int, world: int, budget: int
) -> tuple[list[int], WindowOrder, int]:
    """For the reference's formulas: the chunks of this rank's blocks (the seeded chunk order regrouped
    block by block; whole blocks per rank, so that every window completes on one rank), the leading
    windows of those blocks in text order holding at least `budget` used tokens (a WindowOrder that
    passes on only those), and their token count, the new budget: no window is cut by the budget."""
    layout = cache.layout
    order = block_grouped(np.random.default_rng([seed, 0]).permutation(reader.chunks), layout)
    blocks = list(dict.fromkeys(layout.chunk_range(c)[0] // layout.block_tokens for c in order))[rank::world]
    usable = special.usable(cache.read_tokens("keep"), cache.read_tokens("token_ids"))
    expected = torch.bincount(cache.read_tokens("seq").to(torch.int64)[usable], minlength=layout.n_sequences)
    chosen, total, used = [], 0, []
    for b in blocks:
        if total >= budget:
            break
        start, stop = layout.block_range(b)
        used.append(b)
        for w in range(start // layout.context, stop // layout.context):
            if total >= budget:
                break
            chosen.append(w)
            total += int(expected[w])
    order = [c for c in order if layout.chunk_range(c)[0] // layout.block_tokens in set(used)]
    wanted = torch.zeros(layout.n_sequences, dtype=torch.int64)
    wanted[chosen] = expected[chosen]  # 0 for every other window: never collected
    return order, WindowOrder(wanted), total


def _tokens_seen(mode: str, batch_tokens: int, context: int) -> str:
    """What the reference formulas' batches held, in words (ReferenceFormulas.tokens_seen)."""
    special = {
        "reference": "BOS/EOS/PAD as zero vectors, as the reference",
        "exclude": "special positions left out (the reference has zero vectors there)",
        "include-real": "special positions with their real vectors (the reference has zero vectors there)",
    }[mode]
    return (
        f"whole context windows of {context} in text order, {batch_tokens:,} consecutive tokens per batch "
        f"(the reference: one sequence of 2,048); {special}"
    )


def _stream(
    sae: Any,
    reader: ChunkReader,
    order: Sequence[int],
    budget: int,
    rows: int,
    dev: str,
    acc: LayerDistribution,
    ref: ReferenceVariances | None,
    windows: WindowOrder | None,
    progress: bool,
    special: SpecialTokens,
) -> None:
    """Encode up to `budget` tokens of the chunks `order` (those the run's special-token mode uses) and
    feed the accumulators; the reference's through `windows` (whole windows in text order)."""
    from harvest.progress import progress_bar

    upper = min(budget, len(order) * reader.layout.chunk_tokens)  # kept tokens are unknown until read
    done = 0
    with progress_bar("variance", upper, "tokens", enabled=progress, rate_unit="tok/s") as bar:
        for chunk in reader.iter_chunks(order):
            use = special.usable(chunk.keep, chunk.token_ids)
            if windows is not None:  # whole windows only (the reference's formulas)
                use &= windows.expected[chunk.seq.to(torch.int64)] > 0
            kept = use.nonzero().squeeze(1)[: budget - done]
            # a copy out of the reader's reusable buffer (on a GPU: the whole chunk, then index there)
            x_all = chunk.vectors(kept, dev, non_blocking=True)  # decoded (float8 caches) on the device
            x_all = special.vectors(x_all, chunk.token_ids[kept])  # zeros at BOS/EOS/PAD in `reference` mode
            encoded = []
            for s in range(0, x_all.shape[1], rows):
                values, indices = sae.encode(x_all[:, s : s + rows].float())
                acc.update(values, indices)
                encoded.append((values, indices))
            if ref is not None and windows is not None and encoded:
                v, i = torch.cat([v for v, _ in encoded], dim=1), torch.cat([i for _, i in encoded], dim=1)
                for wv, wi in windows.add(chunk.seq[kept].to(torch.int64), chunk.pos[kept], v, i):
                    ref.update(wv, wi)
            done += len(kept)
            bar.advance(len(kept))
            if done >= budget:
                break
        bar.update(total=done)
    if dev.startswith("cuda"):
        torch.cuda.synchronize()  # the time measured by the caller is the work done, not the work queued


def _write_outputs(acc: LayerDistribution, result: VarianceResult, out_dir: Path, figures: bool) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = {
        **acc.to_tensors(),
        "p_layer_given_latent": acc.p_layer_given_latent().cpu(),
        "mean_layer": acc.mean_layer().cpu(),
        "var_layer": acc.var_layer().cpu(),
        "var_layer_within_token": acc.var_layer_within_token().cpu(),
    }
    atomic_write(
        out_dir / DISTRIBUTION_FILE,
        lambda tmp: save_file(
            {k: v.contiguous() for k, v in tensors.items()},
            str(tmp),
            metadata={"layers": json.dumps(result.layers), "tokens": str(result.tokens)},
        ),
    )
    if figures:
        from analyze.figures_layers import layer_heatmap, mean_layer_histogram

        p, mean = tensors["p_layer_given_latent"], tensors["mean_layer"]
        layer_heatmap(p, mean, result.layers, out_dir / HEATMAP_PNG)
        mean_layer_histogram(mean, result.layers, out_dir / HISTOGRAM_PNG)
        result.figures = [HEATMAP_PNG, HISTOGRAM_PNG]
    result.files = [VarianceResult.FILE, DISTRIBUTION_FILE]
    result.save(out_dir)


def format_variance(res: VarianceResult) -> str:
    """The headline numbers of `analyze variance` as plain text."""
    v, ml, ref = res.variances, res.multi_layer, res.reference
    lines = [
        f"variance over {res.tokens:,} tokens, layers {res.layers[0]}..{res.layers[-1]}",
        f"  Var(L) = {v.var_l:.4g}   E[Var(L|J)] = {v.exp_var_l_given_j:.4g}   "
        f"E[Var(L|J,T)] = {v.exp_var_l_given_jt:.4g}",
        f"  E[Var(L|J)]/Var(L) = {v.ratio_latent:.4f}   E[Var(L|J,T)]/E[Var(L|J)] = {v.ratio_token:.4f}",
        f"  latents active at >1 layer: {ml.per_token_pooled:.1%} per token (pooled), {ml.aggregated:.1%} aggregated",
    ]
    if ref is not None:
        lines.append(f"  reference code's formulas (not proper variances): {ref.rel_var_f:.4f}, {ref.rel_var_t:.4f}")
        lines.append(f"    on {ref.tokens:,} tokens in {ref.batches} batches: {ref.tokens_seen}")
    return "\n".join(lines)
