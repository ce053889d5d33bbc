"""How the variance ratios move as an SAE trains, and how much they vary from seed to seed.

`analyze convergence --sae RUN`: the run's snapshots (`train --snapshot-tokens`: loadable run folders
<RUN>/snapshots/tokens-<n>) and the run itself are the points along training. At each point: the held-out
FVU (both definitions, from the point's summary.json) and both variance ratios, proper and by the
reference code's formulas (`analyze variance --reference-formulas` on the point's folder, run where its
variance.json is missing or holds fewer tokens). `--seeds` adds runs trained like it with other seeds: at
every point they all have (snapshot or end), the spread (mean +- sample standard deviation over the run
and the seeds) becomes error bars. Writes convergence.json, convergence.csv and convergence.png.

`seed_spread` is the spread alone (docs/results_seeds.md's table).
"""

from __future__ import annotations

import csv
import io
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Sequence

from analyze.results import ResultError, VarianceResult
from harvest.atomic import atomic_write, atomic_write_json, atomic_write_text

SNAPSHOTS = "snapshots"  # train/loop.py writes the snapshots there
CSV, JSON, PNG = "convergence.csv", "convergence.json", "convergence.png"
# the numbers of a point, in the order of the CSV and the figure's panels
QUANTITIES = {
    "fvu": "held-out FVU (poster's definition: scalar variance)",
    "fvu_feature": "held-out FVU per feature",
    "ratio_token": "E[Var(L|J,T)] / E[Var(L|J)] (proper)",
    "ratio_latent": "E[Var(L|J)] / Var(L) (proper)",
    "ref_ratio_token": "E[Var(L|J,T)] / E[Var(L|J)] (reference formula)",
    "ref_ratio_latent": "E[Var(L|J)] / Var(L) (reference formula)",
}


@dataclass
class Point:
    """One SAE along training (or a seed), and its numbers."""

    run: str
    tokens: int  # training tokens
    fvu: float
    fvu_feature: float
    ratio_token: float
    ratio_latent: float
    ref_ratio_token: float
    ref_ratio_latent: float
    variance_tokens: int  # tokens the ratios were measured on


@dataclass
class Spread:
    quantity: str
    n: int
    mean: float
    std: float  # sample standard deviation (n - 1); NaN for one value


def training_points(run: str | Path) -> list[Path]:
    """The run's snapshot folders in training order, then the run itself."""
    run = Path(run)
    snaps = sorted((run / SNAPSHOTS).glob("tokens-*")) if (run / SNAPSHOTS).is_dir() else []
    return [*snaps, run]


def measure(
    folder: str | Path, tokens: int, device: str = "cpu", log: Callable[[str], None] = print, cache: str | None = None
) -> Point:
    """The numbers of one run folder; runs `analyze variance --reference-formulas` into it where needed."""
    from analyze.layers import run_variance
    from train.record import load_run

    folder = Path(folder)
    record = load_run(folder)
    summary = record.summary()
    if not summary or "held_out" not in summary:
        raise ResultError(f"{folder} has no held-out evaluation (summary.json): let `train run` finish")
    try:
        var = VarianceResult.load(folder)
    except ResultError:
        var = None
    if var is None or var.reference is None or not var.reference.tokens_seen or var.tokens_requested < tokens:
        log(f"{folder}: analyze variance --reference-formulas over {tokens:,} tokens")
        var = run_variance(
            folder, cache or record.cache.path, tokens, folder, True, device, progress=False, figures=False, log=log
        )
    h, v, ref = summary["held_out"], var.variances, var.reference
    return Point(
        run=str(folder),
        tokens=int(summary["tokens"]),
        fvu=float(h["fvu_mean"]),
        fvu_feature=float(h["fvu_feature_mean"]),
        ratio_token=v.ratio_token,
        ratio_latent=v.ratio_latent,
        ref_ratio_token=ref.rel_var_t if ref else math.nan,
        ref_ratio_latent=ref.rel_var_f if ref else math.nan,
        variance_tokens=var.tokens,
    )


def seed_spread(points: Sequence[Point]) -> list[Spread]:
    """Mean and sample standard deviation of every quantity over `points` (one per seed)."""
    out = []
    for q in QUANTITIES:
        values = [getattr(p, q) for p in points]
        mean = sum(values) / len(values)
        var = sum((x - mean) ** 2 for x in values) / (len(values) - 1) if len(values) > 1 else math.nan
        out.append(Spread(q, len(values), mean, math.sqrt(var)))
    return out


def run_convergence(
    run: str | Path,
    tokens: int,
    out_dir: str | Path,
    seeds: Sequence[str | Path] = (),
    device: str = "cpu",
    log: Callable[[str], None] = print,
) -> dict:
    """Points along the training of `run` (+ the seed spread at the point the seeds match); writes
    convergence.json / .csv / .png into `out_dir` and returns the JSON's content."""
    out_dir = Path(out_dir)
    points = [measure(f, tokens, device, log) for f in training_points(run)]
    seeded = [[measure(f, tokens, device, log) for f in training_points(s)] for s in seeds]
    spread = []  # at every point that each seed run also has (its snapshots and its end)
    for p in points:
        same = [next((q for q in pts if q.tokens == p.tokens), None) for pts in seeded]
        if seeded and all(same):
            runs = [p.run, *(q.run for q in same)]
            spread.append({"tokens": p.tokens, "runs": runs, "spread": [asdict(x) for x in seed_spread([p, *same])]})
    if seeded and not spread:
        raise ResultError(
            f"--seeds must be runs with a point (snapshot or end) at a training-token count of {run} "
            f"({sorted(p.tokens for p in points)}): train them like it with other seeds"
        )
    result = {"run": str(run), "points": [asdict(p) for p in points], "seeds": spread, "quantities": QUANTITIES}
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out_dir / JSON, result)
    atomic_write_text(out_dir / CSV, _csv(points))
    atomic_write(out_dir / PNG, lambda tmp: _figure(points, spread, tmp))
    return result


def _csv(points: list[Point]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["tokens", *QUANTITIES, "variance_tokens", "run"])
    for p in points:
        w.writerow([p.tokens, *(f"{getattr(p, q):.6g}" for q in QUANTITIES), p.variance_tokens, p.run])
    return buf.getvalue()


def _figure(points: list[Point], spread: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = [p.tokens for p in points]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.8))
    panels = [
        (a, ["ratio_token", "ref_ratio_token", "ratio_latent", "ref_ratio_latent"], "variance ratio"),
        (b, ["fvu", "fvu_feature"], "held-out FVU"),
    ]
    for ax, names, label in panels:
        for q in names:
            ax.plot(x, [getattr(p, q) for p in points], "o--" if q.startswith("ref") else "o-", label=QUANTITIES[q])
            for at in spread:  # mean +- std over the seeds at that point
                s = next(x for x in at["spread"] if x["quantity"] == q)
                ax.errorbar([at["tokens"]], [s["mean"]], yerr=[s["std"]], fmt="none", ecolor="k", capsize=4)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("training tokens")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    a.axhline(0.1, color="grey", lw=0.8, ls=":")  # the claim's threshold
    title = "along training" + (f"; error bars: {len(spread[0]['runs'])} seeds (mean +- std)" if spread else "")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110, format="png")
    plt.close(fig)


def format_convergence(result: dict) -> str:
    """The table of points (and the seed spread) as Markdown."""
    head = ["training tokens", *QUANTITIES.values()]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for p in result["points"]:
        lines.append(f"| {p['tokens']:,} | " + " | ".join(f"{p[q]:.4f}" for q in QUANTITIES) + " |")
    for s in result["seeds"]:
        cells = " | ".join(f"{x['mean']:.4f} +- {x['std']:.4f}" for x in s["spread"])
        lines.append(f"| {s['tokens']:,}, {len(s['runs'])} seeds | {cells} |")
    return "\n".join(lines)
