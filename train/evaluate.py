"""Held-out reconstruction metrics of one SAE, per layer: pooled FVU (both definitions), MSE, L0, dead
fraction, firing density (docs/method.md Sec. 3).

Reads the chunks that hold the held-out windows' tokens (train/split.py) and encodes only those tokens."""

from __future__ import annotations

import csv
import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, ClassVar, Sequence

import torch

from harvest import Cache, ChunkReader
from harvest.atomic import atomic_write
from harvest.errors import CacheError
from train.objectives import FIRE_THRESHOLD, FvuAccumulator
from train.sae import TopKSae
from train.special import SpecialTokens
from train.split import HeldOut

# old field name -> today's: "dead" read as the training dead counter, which these are not
RENAMED = {"dead_fraction_per_layer": "silent_on_heldout", "dead_fraction": "silent_on_heldout_all_layers"}


@dataclass
class EvalResult:
    """Held-out metrics of one SAE; lists are per layer, in the order of `layers`."""

    RENAMED: ClassVar[dict[str, str]] = RENAMED

    tokens: int  # tokens evaluated (each gives one vector per layer)
    layers: list[int]
    fvu: list[float]  # reference definition: SSE / squared deviations from the layer's grand mean
    fvu_feature: list[float]  # per-feature definition (Gao et al.): SSE / squared deviations from feature means
    mse: list[float]  # mean squared error per scalar
    l0: list[float]  # mean number of latents firing (> FIRE_THRESHOLD) per vector
    # latents that never fire at that layer on the evaluated (held-out) tokens; not the training dead counter
    silent_on_heldout: list[float]
    firing_density: list[float]  # mean over latents of the fraction of tokens it fires on (= l0 / n_latents)
    fvu_mean: float  # the headline: unweighted mean over layers
    fvu_feature_mean: float
    silent_on_heldout_all_layers: float  # latents that fire at no layer on the evaluated tokens

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> EvalResult:
        """From summary.json; older summaries lack the per-layer silent fraction and firing density (NaN),
        or call them by their old names (RENAMED)."""
        d = {RENAMED.get(k, k): v for k, v in d.items()}
        n = len(d["layers"])
        defaults = {"silent_on_heldout": [float("nan")] * n, "firing_density": [float("nan")] * n}
        return cls(**{f.name: d.get(f.name, defaults.get(f.name)) for f in fields(cls)})


@torch.no_grad()
def evaluate(
    sae: TopKSae,
    cache: Cache,
    heldout: HeldOut,
    layers: Sequence[int],
    device: str,
    special_tokens: str = "cache",
    rows: int = 8192,
) -> EvalResult:
    """Metrics of `sae` on the held-out tokens, per layer (in the order of `layers`), with special tokens
    as `special_tokens` (train/special.py) says. Non-finite held-out vectors are refused (CacheError)."""
    n_layers, n_latents = len(layers), sae.cfg.n_latents
    acc = FvuAccumulator.zeros(n_layers, cache.layout.d_model, device)
    l0 = torch.zeros(n_layers, dtype=torch.float64, device=device)
    fired = torch.zeros(n_layers, n_latents, dtype=torch.bool, device=device)
    offsets = torch.arange(n_layers, device=device)[:, None, None] * n_latents  # layer l's latents in fired.view(-1)
    special = SpecialTokens.of(special_tokens, cache)
    # two reads in flight: evaluation is encode-bound, and each buffer holds a chunk of every layer (~94 MB for
    # Gemma 3 270M), on top of the training stream's own
    reader = ChunkReader(cache, layers=layers, chunks=heldout.chunks, prefetch=2)
    for chunk in reader.iter_chunks(heldout.chunks):
        used = (special.usable(chunk.keep, chunk.token_ids) & heldout.mask(chunk.seq)).nonzero().squeeze(1)
        x_all = special.vectors(chunk.vectors(used), chunk.token_ids[used])
        for s in range(0, x_all.shape[1], rows):
            x = x_all[:, s : s + rows].to(device=device, dtype=torch.float32)
            _require_finite(x, layers, chunk.index, cache)
            out = sae(x)
            acc.update(x, out.x_hat)
            active = out.values > FIRE_THRESHOLD
            l0 += active.sum((1, 2)).double()
            fired.view(-1)[(out.indices + offsets)[active]] = True
    res = acc.compute()
    n = acc.n.clamp_min(1)
    l0_mean = (l0 / n).tolist()
    return EvalResult(
        tokens=int(acc.n[0].item()) if n_layers else 0,
        layers=list(layers),
        fvu=res.fvu,
        fvu_feature=res.fvu_feature,
        mse=res.mse,
        l0=l0_mean,
        silent_on_heldout=(1.0 - fired.float().mean(1)).tolist(),
        firing_density=[v / n_latents for v in l0_mean],
        fvu_mean=res.fvu_mean,
        fvu_feature_mean=res.fvu_feature_mean,
        silent_on_heldout_all_layers=1.0 - fired.any(0).float().mean().item(),
    )


def _require_finite(x: torch.Tensor, layers: Sequence[int], chunk: int, cache: Cache) -> None:
    bad = ~torch.isfinite(x).all(-1).all(-1)
    if bool(bad.any()):
        layer = layers[int(bad.nonzero()[0])]
        raise CacheError(
            f"held-out vectors of layer {layer} in chunk {chunk} of {cache.path} are not finite (NaN/inf): the "
            f"cache is corrupt or the model overflowed; run `harvest verify` and re-harvest"
        )


# ---------------------------------------------------------------------------------------------
# the held-out curve of a run: held-out FVU against training tokens

HELDOUT_CSV, HELDOUT_PNG = "heldout.csv", "heldout.png"


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The lines of a metrics.jsonl; a line cut short by a kill is skipped."""
    out = []
    for line in path.read_text().splitlines() if path.is_file() else []:
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def heldout_points(lines: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The held-out evaluations among metrics lines, one per training-token count (a resumed run logs
    the steps after its last checkpoint twice: the later line wins), in token order."""
    by_tokens = {int(l["tokens"]): l for l in lines if "held_out" in l}
    return [by_tokens[t] for t in sorted(by_tokens)]


def write_heldout_curve(folder: Path, lines: list[dict[str, Any]]) -> None:
    """heldout.csv (tokens, fvu_mean, fvu_feature_mean, then the FVU of each layer) and heldout.png."""
    points = heldout_points(lines)
    if not points:
        return
    layers = points[-1]["held_out"]["layers"]

    def write_csv(tmp: Path) -> None:
        with open(tmp, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["tokens", "fvu_mean", "fvu_feature_mean", *[f"fvu_layer_{l}" for l in layers]])
            for p in points:
                h = p["held_out"]
                w.writerow(
                    [
                        p["tokens"],
                        f"{h['fvu_mean']:.6g}",
                        f"{h['fvu_feature_mean']:.6g}",
                        *[f"{v:.6g}" for v in h["fvu"]],
                    ]
                )

    atomic_write(folder / HELDOUT_CSV, write_csv)
    atomic_write(folder / HELDOUT_PNG, lambda tmp: _plot_heldout(points, layers, tmp))


def _plot_heldout(points: list[dict[str, Any]], layers: list[int], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tokens = [p["tokens"] for p in points]
    fig, ax = plt.subplots(figsize=(6.4, 4))
    if len(layers) > 1:
        for i in range(len(layers)):
            ax.plot(tokens, [p["held_out"]["fvu"][i] for p in points], color="tab:blue", alpha=0.15, lw=0.8)
    ax.plot(tokens, [p["held_out"]["fvu_mean"] for p in points], "o-", color="tab:blue", label="FVU (mean over layers)")
    ax.plot(
        tokens,
        [p["held_out"]["fvu_feature_mean"] for p in points],
        "s--",
        color="tab:orange",
        label="per-feature FVU (mean over layers)",
    )
    ax.set_yscale("log")
    ax.set_xlabel("training tokens")
    ax.set_ylabel("held-out FVU")
    ax.set_title(f"held-out FVU during training ({points[-1]['held_out']['tokens']:,} held-out tokens)", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120, format="png")
    plt.close(fig)
