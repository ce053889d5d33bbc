"""Reconstruction quality on held-out tokens: per-layer metrics of each SAE, and the layer x layer FVU
matrix (docs/method.md Sec. 3): every SAE (the MLSAE, and each single-layer SAE, labelled by the layer it
was trained on) evaluated on the vectors of EVERY layer j. The paper's claim to check: the MLSAE is
about as good as the single-layer SAE on that SAE's own layer (the diagonal), and better than the
single-layer SAEs of the other layers (off the diagonal).

Metrics come from train.evaluate (pooled per-layer FVU, both definitions), so the numbers here are the
numbers training reports. All SAEs are evaluated on the SAME tokens: the held-out windows recorded in
the first run's config.json, which must be held out for every run (same cache, not trained on).
"""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from analyze.results import (
    Comparison,
    LayerComparison,
    ReconstructionResult,
    RunReconstruction,
)
from harvest.atomic import atomic_open, atomic_savefig
from harvest.models import resolve_device
from train.evaluate import evaluate
from train.inputs import open_inputs
from train.record import RunError, RunRecord, load_run
from train.special import SpecialTokens

FVU_CSV, FVU_FEATURE_CSV, RECONSTRUCTION_PNG = "fvu_matrix.csv", "fvu_feature_matrix.csv", "reconstruction.png"


# ---------------------------------------------------------------------------------------------
# run folders (read through train.record: one loader, one error type)


def _labels(records: list[RunRecord]) -> list[str]:
    """Row labels; runs that would share a label (two MLSAEs of a sweep) get their folder name added."""
    base = [r.label() for r in records]
    return [b if base.count(b) == 1 else f"{b} ({r.dir.name})" for b, r in zip(base, records)]


def check_same_cache(records: list[RunRecord], cache: Any) -> None:
    """Every run was trained on `cache` (same fingerprint), and the first run's held-out tokens are held
    out for every run (a run with another held-out set trained on some of them)."""
    for r in records:
        if r.cache.fingerprint != cache.fingerprint:
            raise RunError(
                f"{r.dir} was trained on cache {r.cache.path} (fingerprint "
                f"{r.cache.fingerprint}), not on {cache.path} ({cache.fingerprint}): pass runs "
                f"trained on one cache, and that cache"
            )
    first = records[0].heldout
    if not first.n_tokens and not first.chunks:
        raise RunError(f"{records[0].dir} has no held-out tokens (trained with --eval-tokens 0): retrain it")
    held = first.positions(cache)
    for r in records[1:]:
        if r.heldout.to_dict() != first.to_dict() and not np.isin(held, r.heldout.positions(cache)).all():
            raise RunError(
                f"{r.dir} trained on some of the held-out tokens of {records[0].dir} ({first.describe()}): "
                f"compare runs trained with the same --eval-tokens and --heldout-seed, listing first the one "
                f"with the fewest held-out tokens"
            )


# ---------------------------------------------------------------------------------------------
# the analysis


def run_reconstruction(
    run_dirs: Sequence[str | Path],
    cache_path: str | Path | None = None,
    out_dir: str | Path | None = None,
    device: str = "auto",
    tokens: int | None = None,
    special_tokens: str | None = None,
    write: bool = True,
) -> ReconstructionResult:
    """Held-out metrics of each run and the layer x layer FVU matrix; writes reconstruction.json,
    fvu_matrix.csv, fvu_feature_matrix.csv and reconstruction.png into `out_dir` (default: the first
    run's folder) when `write`. `cache_path` defaults to the cache recorded by the first run;
    `special_tokens` (train/special.py) to the first run's training mode."""
    if not run_dirs:
        raise RunError("no run given: pass at least one --sae RUN folder")
    lead = open_inputs(run_dirs[0], cache_path, purpose="analyze reconstruction", heldout=True)
    records, cache = [lead.record, *(load_run(d) for d in run_dirs[1:])], lead.cache
    cache.require_complete()
    check_same_cache(records, cache)
    heldout = records[0].heldout.limited(tokens, cache)
    special = SpecialTokens.of(special_tokens or records[0].special_tokens, cache).mode
    device = resolve_device(device)
    columns = sorted({l for r in records for l in r.layers})
    labels = _labels(records)

    rows = []
    for record, label in zip(records, labels):
        sae = record.load_sae(device)
        matrix = evaluate(sae, cache, heldout, columns, device, special)
        own = matrix if record.layers == columns else evaluate(sae, cache, heldout, record.layers, device, special)
        rows.append(
            RunReconstruction(
                label=label,
                run=str(record.dir),
                trained_layers=record.layers,
                multi_layer=record.multi_layer,
                n_latents=sae.cfg.n_latents,
                k=sae.cfg.k,
                held_out=own,
                matrix=matrix,
            )
        )

    result = ReconstructionResult(
        cache=str(cache.path),
        fingerprint=cache.fingerprint,
        model=cache.meta["model"]["name"],
        lens=cache.lens_record,
        held_out_set=heldout,
        tokens=rows[0].held_out.tokens,
        special_tokens=special,
        layers=columns,
        runs=rows,
        comparison_fvu=compare(rows, columns, "fvu"),
        comparison_fvu_feature=compare(rows, columns, "fvu_feature"),
        definitions={
            "fvu": "sum of squared errors / sum of squared deviations from the mean of all scalars of the "
            "layer, pooled over the held-out tokens (reference definition)",
            "fvu_feature": "same numerator / sum of squared deviations from each feature's mean (Gao et al.)",
            "l0": "mean number of latents above 1e-3 per vector of the layer",
            "silent_on_heldout": "latents that never exceed 1e-3 at that layer over the held-out tokens (not the "
            "training dead counter)",
            "silent_on_heldout_all_layers": "latents that never exceed 1e-3 at any layer over the held-out tokens",
            "firing_density": "mean over latents of the fraction of held-out tokens on which it fires at that layer",
            "matrix": "row = SAE (MLSAE, or single-layer SAE L<i> trained on layer i), column j = the layer "
            "whose vectors it reconstructs",
        },
    )
    if write:
        out = Path(out_dir) if out_dir is not None else records[0].dir
        out.mkdir(parents=True, exist_ok=True)
        write_matrix_csv(out / FVU_CSV, result.rows, columns, result.fvu_matrix)
        write_matrix_csv(out / FVU_FEATURE_CSV, result.rows, columns, result.fvu_feature_matrix)
        plot_reconstruction(result, out / RECONSTRUCTION_PNG)
        result.files = [ReconstructionResult.FILE, FVU_CSV, FVU_FEATURE_CSV]
        result.figures = [RECONSTRUCTION_PNG]
        result.save(out)
    return result


def compare(runs: list[RunReconstruction], columns: list[int], key: str = "fvu") -> Comparison:
    """Per evaluation layer j: the (first) MLSAE's FVU, the single-layer SAE trained on j (diagonal) and
    the best single-layer SAE trained on another layer (off-diagonal); None where a row is absent."""
    mlsae = next((r for r in runs if r.multi_layer), None)
    single = {r.trained_layers[0]: r for r in runs if not r.multi_layer}
    row = lambda r: getattr(r.matrix, key)
    per_layer = []
    for j, layer in enumerate(columns):
        diag = single.get(layer)
        others = [(row(r)[j], i) for i, r in single.items() if i != layer and math.isfinite(row(r)[j])]
        best = min(others) if others else None
        per_layer.append(
            LayerComparison(
                layer=layer,
                mlsae=row(mlsae)[j] if mlsae else None,
                diagonal=row(diag)[j] if diag else None,
                off_diagonal_best=best[0] if best else None,
                off_diagonal_layer=best[1] if best else None,
            )
        )
    ratios = [p.mlsae / p.diagonal for p in per_layer if p.mlsae is not None and p.diagonal]
    beats = [
        p.mlsae < p.off_diagonal_best for p in per_layer if p.mlsae is not None and p.off_diagonal_best is not None
    ]
    return Comparison(
        mlsae=mlsae.label if mlsae else None,
        per_layer=per_layer,
        mlsae_over_diagonal_mean=sum(ratios) / len(ratios) if ratios else None,
        mlsae_beats_off_diagonal=sum(beats),
        off_diagonal_compared=len(beats),
    )


# ---------------------------------------------------------------------------------------------
# output


def write_matrix_csv(path: Path, rows: list[str], columns: list[int], matrix: list[list[float]]) -> None:
    with atomic_open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["sae", *[f"layer {l}" for l in columns]])
        for label, values in zip(rows, matrix):
            w.writerow([label, *[f"{v:.6g}" for v in values]])


def _f(v: float | None) -> str:
    return "-" if v is None else f"{v:.4f}"


def format_reconstruction(result: ReconstructionResult) -> str:
    """Plain-text tables: each SAE's held-out metrics per layer; per layer, MLSAE vs diagonal vs best
    off-diagonal FVU, and the claim's tally."""
    lines = [f"held-out metrics on {result.tokens:,} tokens ({result.held_out_set.describe()}) of {result.cache}"]
    for r in result.runs:
        h = r.held_out
        lines.append(
            f"{r.label}: FVU mean {h.fvu_mean:.4f} (per-feature {h.fvu_feature_mean:.4f}); silent at every "
            f"layer {h.silent_on_heldout_all_layers:.3f}"
        )
        lines.append(f"{'layer':>7}  {'FVU':>8}  {'FVU feat':>8}  {'L0':>7}  {'silent':>6}  {'density':>8}")
        for i, l in enumerate(h.layers):
            lines.append(
                f"{l:>7}  {h.fvu[i]:>8.4f}  {h.fvu_feature[i]:>8.4f}  {h.l0[i]:>7.2f}  "
                f"{h.silent_on_heldout[i]:>6.3f}  {h.firing_density[i]:>8.2e}"
            )
    c = result.comparison_fvu
    lines.append(f"{'layer':>5}  {'MLSAE':>8}  {'diagonal':>8}  {'best other':>10}  (trained on)")
    for p in c.per_layer:
        other = "" if p.off_diagonal_layer is None else f"L{p.off_diagonal_layer}"
        lines.append(f"{p.layer:>5}  {_f(p.mlsae):>8}  {_f(p.diagonal):>8}  {_f(p.off_diagonal_best):>10}  {other}")
    if c.mlsae_over_diagonal_mean is not None:
        lines.append(
            f"MLSAE / diagonal single-layer SAE, mean over layers: {c.mlsae_over_diagonal_mean:.3f} (paper: ~1)"
        )
    if c.off_diagonal_compared:
        lines.append(
            f"MLSAE better than every other-layer SAE at {c.mlsae_beats_off_diagonal} of "
            f"{c.off_diagonal_compared} layers (paper: all)"
        )
    return "\n".join(lines)


def plot_reconstruction(result: ReconstructionResult, path: Path) -> None:
    """Left: the FVU matrix (log colour scale: off-diagonal FVUs can exceed 1), cells annotated.
    Right: per layer, the MLSAE against the diagonal and the best off-diagonal single-layer SAE."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import LogNorm

    m, rows, cols = result.fvu_matrix, result.rows, result.layers
    finite = [v for r in m for v in r if math.isfinite(v) and v > 0]
    fig, (ax, ax2) = plt.subplots(
        1,
        2,
        figsize=(6 + 0.45 * len(cols) + 5, 1.5 + 0.4 * len(rows)),
        gridspec_kw={"width_ratios": [max(len(cols), 3), 6]},
        squeeze=True,
    )
    norm = LogNorm(min(finite), max(finite)) if finite and min(finite) < max(finite) else None
    im = ax.imshow(
        [[v if math.isfinite(v) and v > 0 else float("nan") for v in r] for r in m],
        aspect="auto",
        cmap="viridis_r",
        norm=norm,
    )
    size = max(4, min(9, 120 // max(len(cols), 1)))
    for i, r in enumerate(m):
        for j, v in enumerate(r):
            ax.text(
                j,
                i,
                f"{v:.2g}",
                ha="center",
                va="center",
                fontsize=size,
                color="white" if norm is not None and math.isfinite(v) and v > 0 and norm(v) > 0.6 else "black",
            )
    ax.set_xticks(range(len(cols)), [str(l) for l in cols])
    ax.set_yticks(range(len(rows)), rows)
    ax.set_xlabel("evaluated on layer j")
    ax.set_ylabel("SAE (trained on)")
    ax.set_title("held-out FVU")
    fig.colorbar(im, ax=ax, fraction=0.04)
    per = result.comparison_fvu.per_layer
    for name, label, style in [
        ("mlsae", "MLSAE", "o-"),
        ("diagonal", "single-layer SAE, same layer", "s--"),
        ("off_diagonal_best", "best single-layer SAE, other layer", "^:"),
    ]:
        pts = [(p.layer, getattr(p, name)) for p in per if getattr(p, name) is not None]
        if pts:
            ax2.plot(*zip(*pts), style, label=label)
    ax2.set_yscale("log")
    ax2.set_xticks(cols, [str(l) for l in cols])
    ax2.set_xlabel("layer")
    ax2.set_ylabel("held-out FVU")
    ax2.set_title("diagonal vs off-diagonal")
    ax2.legend(fontsize=8)
    fig.tight_layout()
    atomic_savefig(fig, path, dpi=120)
    plt.close(fig)
