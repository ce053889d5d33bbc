"""Held-out reconstruction metrics of one SAE: pooled FVU (both definitions), MSE, L0, dead.

Reads the chunks that hold the held-out windows' tokens (train/split.py) and encodes only those tokens."""

from __future__ import annotations

from typing import Any, Sequence

import torch

from harvest import Cache, ChunkReader
from train.objectives import FIRE_THRESHOLD, FvuAccumulator
from train.sae import TopKSae
from train.special import SpecialTokens
from train.split import HeldOut


@torch.no_grad()
def evaluate(
    sae: TopKSae,
    cache: Cache,
    heldout: HeldOut,
    layers: Sequence[int],
    device: str,
    special_tokens: str = "cache",
    rows: int = 8192,
) -> dict[str, Any]:
    """Metrics of `sae` on the held-out tokens, per layer (in the order of `layers`), with special tokens
    as `special_tokens` (train/special.py) says."""
    n_layers, n_latents = len(layers), sae.cfg.n_latents
    acc = FvuAccumulator.zeros(n_layers, cache.layout.d_model, device)
    l0 = torch.zeros(n_layers, dtype=torch.float64, device=device)
    fired = torch.zeros(n_latents, dtype=torch.bool, device=device)
    special = SpecialTokens.of(special_tokens, cache)
    reader = ChunkReader(cache, layers=layers, chunks=heldout.chunks)
    for chunk in reader.iter_chunks(heldout.chunks):
        used = (special.usable(chunk.keep, chunk.token_ids) & heldout.mask(chunk.seq)).nonzero().squeeze(1)
        x_all = special.vectors(chunk.acts[:, used], chunk.token_ids[used])
        for s in range(0, x_all.shape[1], rows):
            x = x_all[:, s : s + rows].to(device=device, dtype=torch.float32)
            out = sae(x)
            acc.update(x, out.x_hat)
            active = out.values > FIRE_THRESHOLD
            l0 += active.sum((1, 2)).double()
            fired[out.indices[active]] = True
    res = acc.compute()
    n = acc.n.clamp_min(1)
    return {
        "tokens": int(acc.n[0].item()) if n_layers else 0,
        "layers": list(layers),
        "fvu": res.fvu,
        "fvu_feature": res.fvu_feature,
        "mse": res.mse,
        "fvu_mean": res.fvu_mean,
        "fvu_feature_mean": res.fvu_feature_mean,
        "l0": (l0 / n).tolist(),
        "dead_fraction": 1.0 - fired.float().mean().item(),
    }
