"""Training curves for the report: each run's held-out FVU against training tokens.

`train` evaluates every run on its held-out windows periodically (`--eval-every`) and writes the
curve into the run folder as heldout.csv (columns: tokens, fvu_mean, fvu_feature_mean, then the FVU of
each of the run's layers, docs/format.md, the run folder). This module reads those files into the typed
`TrainingResult` (training.json in the analysis folder, so that `analyze compare` sees them) and draws
every run's curve in one figure. A run without heldout.csv (trained without --eval-every, or by an
older version) simply has no curve.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Sequence

from analyze.results import HeldOutCurve, ResultError, TrainingResult
from harvest.atomic import atomic_savefig

HELDOUT_CSV = "heldout.csv"
HELDOUT_PNG = "heldout_fvu.png"
FIXED_COLUMNS = ("tokens", "fvu_mean", "fvu_feature_mean")


def read_curve(run_dir: str | Path, label: str, layers: Sequence[int]) -> HeldOutCurve | None:
    """The run's heldout.csv as a curve (None when the run has none); ResultError naming the file when
    its columns or values are not what train writes."""
    path = Path(run_dir) / HELDOUT_CSV
    if not path.is_file():
        return None
    fix = f"retrain, or delete {path} to report without the curve"
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    if not rows or tuple(rows[0][:3]) != FIXED_COLUMNS or len(rows[0]) != 3 + len(layers):
        raise ResultError(
            f"{path} should have the columns {', '.join(FIXED_COLUMNS)} and one FVU per layer of the run "
            f"({len(layers)}): {fix}"
        )
    try:
        values = [[float(x) for x in r] for r in rows[1:] if r]
    except ValueError as e:
        raise ResultError(f"{path} holds a value that is not a number ({e}): {fix}") from None
    values.sort(key=lambda r: r[0])
    return HeldOutCurve(
        label=label,
        run=str(run_dir),
        layers=list(layers),
        tokens=[int(r[0]) for r in values],
        fvu_mean=[r[1] for r in values],
        fvu_feature_mean=[r[2] for r in values],
        fvu=[r[3:] for r in values],
    )


def run_training(runs: Sequence[tuple[str | Path, str, Sequence[int]]], out_dir: str | Path) -> TrainingResult | None:
    """The curves of `runs` ((folder, label, layers) each) -> out_dir/training.json + heldout_fvu.png;
    None (and nothing written) when no run has a curve."""
    curves = [c for c in (read_curve(d, label, layers) for d, label, layers in runs) if c is not None and c.tokens]
    if not curves:
        return None
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    result = TrainingResult(curves=curves, figures=[HELDOUT_PNG])
    plot_curves(result, out / HELDOUT_PNG)
    result.save(out)
    return result


def plot_curves(result: TrainingResult, path: Path) -> None:
    """Held-out FVU (mean over each run's layers; both definitions) against training tokens, one line per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    for ax, name, title in [
        (axes[0], "fvu_mean", "held-out FVU (reference definition), mean over layers"),
        (axes[1], "fvu_feature_mean", "held-out FVU per feature, mean over layers"),
    ]:
        for c in result.curves:
            pts = [(t, v) for t, v in zip(c.tokens, getattr(c, name)) if math.isfinite(v) and v > 0]
            if pts:
                ax.plot(*zip(*pts), "o-", ms=3, label=c.label)
        ax.set_yscale("log")
        ax.set_xlabel("training tokens")
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    fig.tight_layout()
    atomic_savefig(fig, path, dpi=120)
    plt.close(fig)
