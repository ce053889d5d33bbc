"""Residual-stream geometry (docs/method.md Sec. 4, last bullet; the poster's motivation plots).

- Adjacent-layer cosine similarity: mean over kept tokens of cos(x_{t,l} - mu_l, x_{t,l'} - mu_{l'}) for
  consecutive cached layers l < l', each vector centered by its layer's mean over the cache's kept
  tokens. Centering matters: every layer has a large common offset (and Gemma/Pythia a few huge
  "massive activation" dimensions) that makes raw cosines look high between ANY two vectors. The raw
  (uncentered) cosine is reported too, labelled, for comparison with papers that use it.
- Residual L2 norm per layer: mean over kept tokens of |x_{t,l}| (the poster: it grows with depth).
- MMCS of an SAE decoder: mean over latents i of max_{j != i} cos(W_dec[i], W_dec[j]).

Everything over tokens is a running sum, read chunk by chunk: memory does not grow with the token count.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from analyze.results import MmcsResult, ResidResult
from harvest import ChunkReader, UserError, open_cache
from harvest.atomic import atomic_savefig
from harvest.models import resolve_device

COSINE_PNG = "resid_cosine.png"
NORM_PNG = "resid_norm.png"


# ---------------------------------------------------------------------------------------------
# MMCS


def max_cosine(W: torch.Tensor, chunk: int | None = None) -> torch.Tensor:
    """For each row i of W [n, d]: max_{j != i} cos(W[i], W[j]), as a float32 vector [n].

    Row blocks of `chunk` rows against all rows: memory O(chunk x n), never n x n (a 64 x 2304 SAE has
    147k latents, whose full similarity matrix would be 87 GB). Default chunk: ~16M similarities."""
    n = W.shape[0]
    if n < 2:
        raise ValueError(f"max cosine needs at least 2 rows, got {n}")
    chunk = chunk or max(1, 2**24 // n)
    Wn = W.float()
    Wn = Wn / Wn.norm(dim=1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
    out = torch.empty(n, dtype=torch.float32, device=W.device)
    for s in range(0, n, chunk):
        sim = Wn[s : s + chunk] @ Wn.t()  # [c, n]
        rows = torch.arange(sim.shape[0], device=W.device)
        sim[rows, rows + s] = -float("inf")  # j != i
        out[s : s + chunk] = sim.amax(1)
    return out


def mmcs(W: torch.Tensor, chunk: int | None = None) -> float:
    """Mean max cosine similarity of the rows of W [n, d] (W_dec stores one decoder direction per row)."""
    return max_cosine(W, chunk).double().mean().item()


def decoder_mmcs(sae_dir: str | Path, device: str = "cpu") -> MmcsResult:
    """The MMCS of a trained SAE's decoder directions, and quantiles of each direction's max cosine."""
    from train.record import load_run

    folder = Path(sae_dir)
    sae = load_run(folder).load_sae(device)
    mc = max_cosine(sae.W_dec.detach())
    return MmcsResult(
        sae=str(folder),
        n_latents=int(mc.numel()),
        mmcs=mc.double().mean().item(),
        max_cosine_quantiles={str(q): torch.quantile(mc.cpu(), q).item() for q in (0.05, 0.5, 0.95)},
        definitions={"mmcs": "mean over decoder directions i of max_{j != i} cos(W_dec[i], W_dec[j])"},
    )


# ---------------------------------------------------------------------------------------------
# streaming sums over tokens


@dataclass
class ResidSums:
    """Running sums over tokens; `merge` adds two (other chunks, shards or ranks)."""

    n: int  # kept tokens seen
    norm: torch.Tensor  # [L] float64 sum of |x_l|
    cos_centered: torch.Tensor  # [L-1] float64 sum of cos(x_l - mu_l, x_l' - mu_l')
    cos_raw: torch.Tensor  # [L-1] float64 sum of cos(x_l, x_l')

    @classmethod
    def zeros(cls, n_layers: int) -> "ResidSums":
        z = lambda k: torch.zeros(max(k, 0), dtype=torch.float64)
        return cls(0, z(n_layers), z(n_layers - 1), z(n_layers - 1))

    def merge(self, o: "ResidSums") -> "ResidSums":
        return ResidSums(self.n + o.n, self.norm + o.norm, self.cos_centered + o.cos_centered, self.cos_raw + o.cos_raw)

    @classmethod
    def of(cls, x: torch.Tensor, mu: torch.Tensor) -> "ResidSums":
        """Sums over the tokens of x [L, n, d] (any float dtype/device), layer means mu [L, d].

        One layer pair at a time in float32 (norms and dots of O(1e3)-sized vectors need no more),
        summed in float64."""
        n_layers, n = x.shape[0], x.shape[1]
        out = cls.zeros(n_layers)
        out.n = n
        if n == 0:
            return out
        tiny = torch.finfo(torch.float32).tiny
        mu = mu.to(device=x.device, dtype=torch.float32)
        prev = prev_c = None
        for l in range(n_layers):
            xl = x[l].float()
            xc = xl - mu[l]
            out.norm[l] = xl.norm(dim=1).sum(dtype=torch.float64).cpu()
            if prev is not None:
                out.cos_raw[l - 1] = _cos(prev, xl, tiny).sum(dtype=torch.float64).cpu()
                out.cos_centered[l - 1] = _cos(prev_c, xc, tiny).sum(dtype=torch.float64).cpu()
            prev, prev_c = xl, xc
        return out


def _cos(a: torch.Tensor, b: torch.Tensor, tiny: float) -> torch.Tensor:
    """Row-wise cosine; 0 where a vector is exactly zero (no division by zero)."""
    return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1)).clamp_min(tiny)


def resid_sums(
    cache_path: str | Path,
    tokens: int | None = None,
    device: str = "cpu",
    layers: list[int] | None = None,
    rows: int = 16384,
) -> tuple[ResidSums, list[int]]:
    """Stream the cache's kept tokens (the reader's seeded chunk order: a random sample when `tokens`
    is smaller than the cache) through `ResidSums`; returns the sums and the layers (storage order)."""
    cache = open_cache(cache_path)
    reader = ChunkReader(cache, layers=layers)
    # layer means over ALL kept tokens of the cache (the harvest's per-block statistics, merged)
    stats = cache.stats()
    mu = stats.mean[[cache.layout.layer_index(l) for l in reader.layers]]
    if int(stats.count.min()) == 0:
        raise UserError(f"cache {cache.path} has no kept tokens: harvest more text")
    total = ResidSums.zeros(len(reader.layers))
    budget = tokens if tokens and tokens > 0 else None
    for chunk in reader:
        idx = chunk.keep.nonzero().squeeze(1)
        if budget is not None:
            idx = idx[: budget - total.n]
        for s in range(0, len(idx), rows):
            x = chunk.vectors(idx[s : s + rows]).to(device)
            total = total.merge(ResidSums.of(x, mu))
        if budget is not None and total.n >= budget:
            break
    return total, list(reader.layers)


# ---------------------------------------------------------------------------------------------
# the analysis


def run_resid(
    cache_path: str | Path,
    out_dir: str | Path,
    tokens: int | None = None,
    device: str = "cpu",
    figures: bool = True,
) -> ResidResult:
    """Adjacent-layer cosines and norms -> out_dir/resid.json + two PNGs."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    device = resolve_device(device)
    cache = open_cache(cache_path)
    sums, layers = resid_sums(cache_path, tokens, device)
    n = max(sums.n, 1)
    norm = (sums.norm / n).tolist()
    result = ResidResult(
        cache=str(cache.path),
        model=cache.meta.get("model", {}).get("name"),
        hook=cache.meta.get("spec", {}).get("hook"),
        lens=cache.lens_record,
        tokens=sums.n,
        layers=layers,
        pairs=[[a, b] for a, b in zip(layers, layers[1:])],
        cosine_centered=(sums.cos_centered / n).tolist(),
        cosine_uncentered=(sums.cos_raw / n).tolist(),
        norm_mean=norm,
        norm_growth=norm[-1] / norm[0] if norm and norm[0] > 0 else None,
        definitions={
            "cosine_centered": "mean over kept tokens t of cos(x_{t,l} - mu_l, x_{t,l'} - mu_{l'}) for consecutive "
            "cached layers (l, l'); mu_l = layer mean over all kept tokens of the cache",
            "cosine_uncentered": "the same without centering (for comparison only)",
            "norm_mean": "mean over kept tokens of the L2 norm |x_{t,l}|",
            "norm_growth": "norm_mean of the last layer / norm_mean of the first",
        },
    )
    if figures:
        result.figures = _figures(result, out)
    result.files = [ResidResult.FILE]
    result.save(out)
    return result


def format_resid(res: ResidResult, mmcs: MmcsResult | None = None) -> str:
    """Adjacent-layer cosines, norms (and the decoder MMCS) as plain text."""
    lines = [f"{'layers':>9}  {'cos (centered)':>14}  {'cos (raw)':>9}"]
    for (a, b), c, u in zip(res.pairs, res.cosine_centered, res.cosine_uncentered):
        lines.append(f"{f'{a}->{b}':>9}  {c:>14.3f}  {u:>9.3f}")
    lines.append("mean norm per layer: " + ", ".join(f"{n:.4g}" for n in res.norm_mean))
    if mmcs is not None:
        lines.append(f"decoder MMCS: {mmcs.mmcs:.4f}")
    return "\n".join(lines)


def run_mmcs(sae_dir: str | Path, out_dir: str | Path, device: str = "cpu") -> MmcsResult:
    """decoder_mmcs -> out_dir/mmcs.json."""
    result = decoder_mmcs(sae_dir, resolve_device(device))
    result.save(out_dir)
    return result


def _figures(r: ResidResult, out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    model = r.model or r.cache
    title = f"{Path(model).name if Path(model).exists() else model} ({r.tokens:,} tokens)"
    names = []
    if r.pairs:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        x = [a for a, _ in r.pairs]
        ax.plot(x, r.cosine_centered, "o-", label="centered (x - layer mean)")
        ax.plot(x, r.cosine_uncentered, "s--", alpha=0.6, label="uncentered")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("layer l (vs the next cached layer)")
        ax.set_ylabel("mean cosine similarity")
        ax.set_title(f"Adjacent-layer similarity: {title}", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        atomic_savefig(fig, out / COSINE_PNG, dpi=120)
        plt.close(fig)
        names.append(COSINE_PNG)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(r.layers, r.norm_mean, "o-")
    if all(v > 0 for v in r.norm_mean):
        ax.set_yscale("log")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("layer")
    ax.set_ylabel("mean L2 norm (log scale)")
    ax.set_title(f"Residual norm by layer: {title}", fontsize=9)
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    atomic_savefig(fig, out / NORM_PNG, dpi=120)
    plt.close(fig)
    names.append(NORM_PNG)
    return names
