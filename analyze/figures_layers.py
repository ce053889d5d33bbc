"""PNG figures of the layer distributions: the latent x layer heatmap of P(L|J) sorted by E[L|J] (the
poster's figure) and the histogram of E[L|J]. matplotlib is imported lazily (Agg: no display needed)."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
from torch import Tensor

from harvest.atomic import atomic_savefig


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def layer_heatmap(p: Tensor, mean: Tensor, layers: Sequence[int], path: str | Path) -> None:
    """p [n_latents, L] = P(L|J), mean [n_latents] = E[L|J] (NaN: no mass). Latents without mass are left
    out; the rest are sorted by E[L|J] ascending (x axis), layers on the y axis (first at the bottom)."""
    plt = _pyplot()
    has = ~torch.isnan(mean)
    order = torch.argsort(mean[has], stable=True)
    img = p[has][order].T.float().numpy()  # [L, n_active]
    fig, ax = plt.subplots(figsize=(8, 1.2 + 0.25 * len(layers)))
    if img.shape[1]:
        im = ax.imshow(img, aspect="auto", origin="lower", cmap="viridis", vmin=0, vmax=1, interpolation="antialiased")
        fig.colorbar(im, ax=ax, label="P(L | J)")
    step = max(1, len(layers) // 12)
    ax.set_yticks(range(0, len(layers), step), [str(l) for l in layers][::step])
    ax.set_ylabel("layer")
    ax.set_xlabel(f"latent ({img.shape[1]:,} with activation mass), sorted by E[L | J]")
    fig.tight_layout()
    atomic_savefig(fig, path, dpi=150)
    plt.close(fig)


def mean_layer_histogram(mean: Tensor, layers: Sequence[int], path: str | Path) -> None:
    """Histogram of E[L|J] over latents with activation mass (layer positions, labelled by layer number)."""
    plt = _pyplot()
    m = mean[~torch.isnan(mean)].float().numpy()
    L = len(layers)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    # bins of width 1/4 layer, centred so that a latent at exactly layer l sits in one bin
    n_bins = 4 * (L - 1) + 1 if L > 1 else 1
    ax.hist(m, bins=n_bins, range=(-0.125, L - 1 + 0.125) if L > 1 else (-0.5, 0.5), color="tab:blue")
    step = max(1, L // 12)
    ax.set_xticks(range(0, L, step), [str(l) for l in layers][::step])
    ax.set_xlabel("E[L | J] (layer)")
    ax.set_ylabel("latents")
    ax.set_title(f"{len(m):,} latents with activation mass")
    fig.tight_layout()
    atomic_savefig(fig, path, dpi=150)
    plt.close(fig)
