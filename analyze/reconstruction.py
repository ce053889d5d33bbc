"""Reconstruction quality on held-out tokens: per-layer metrics of each SAE, and the layer x layer FVU
matrix (method.md Sec. 3): every SAE (the MLSAE, and each single-layer SAE, labelled by the layer it
was trained on) evaluated on the vectors of EVERY layer j. The paper's claim to check: the MLSAE is
about as good as the single-layer SAE on that SAE's own layer (the diagonal), and better than the
single-layer SAEs of the other layers (off the diagonal).

Metrics come from train.evaluate (pooled per-layer FVU, both definitions), so the numbers here are the
numbers training reports. All SAEs are evaluated on the SAME tokens: the held-out chunks recorded in
the first run's config.json, which must be held out for every run (same cache, not trained on).
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import asdict
from pathlib import Path
from typing import Any, Sequence

from harvest import open_cache
from harvest.models import resolve_device
from train.evaluate import evaluate
from train.record import RunError, RunRecord, load_run

# ---------------------------------------------------------------------------------------------
# run folders (read through train.record: one loader, one error type)


def _labels(records: list[RunRecord]) -> list[str]:
    """Row labels; runs that would share a label (two MLSAEs of a sweep) get their folder name added."""
    base = [r.label() for r in records]
    return [b if base.count(b) == 1 else f"{b} ({r.dir.name})" for b, r in zip(base, records)]


def check_same_cache(records: list[RunRecord], cache: Any) -> None:
    """Every run was trained on `cache` (same fingerprint), and the first run's held-out chunks are held
    out for every run (a run with a smaller held-out set trained on some of them)."""
    for r in records:
        if r.cache.fingerprint != cache.fingerprint:
            raise RunError(
                f"{r.dir} was trained on cache {r.cache.path} (fingerprint "
                f"{r.cache.fingerprint}), not on {cache.path} ({cache.fingerprint}): pass runs "
                f"trained on one cache, and that cache"
            )
    held_out = set(records[0].heldout.chunks)
    for r in records[1:]:
        if not held_out <= set(r.heldout.chunks):
            raise RunError(
                f"{r.dir} trained on some of the held-out chunks of {records[0].dir}: list first "
                f"the run with the fewest held-out tokens (--eval-tokens)"
            )


def held_out_chunks(record: RunRecord, cache: Any, tokens: int | None) -> list[int]:
    """The run's held-out chunks; with `tokens`, the fewest leading ones that hold at least that many
    cache positions (whole chunks: the unit the reader reads)."""
    chunks = list(record.heldout.chunks)
    if not chunks:
        raise RunError(
            f"{record.dir} has no held-out chunks (trained with --eval-tokens 0): retrain with --eval-tokens > 0"
        )
    if tokens is None:
        return chunks
    out, n = [], 0
    for c in chunks:
        if n >= tokens:
            break
        start, stop = cache.layout.chunk_range(c)
        out.append(c)
        n += stop - start
    return out


# ---------------------------------------------------------------------------------------------
# the analysis


def run_reconstruction(
    run_dirs: Sequence[str | Path],
    cache_path: str | Path | None = None,
    out_dir: str | Path | None = None,
    device: str = "auto",
    tokens: int | None = None,
    include_special: bool | None = None,
    write: bool = True,
) -> dict[str, Any]:
    """Held-out metrics of each run and the layer x layer FVU matrix; writes reconstruction.json,
    fvu_matrix.csv, fvu_feature_matrix.csv and reconstruction.png into `out_dir` (default: the first
    run's folder) when `write`. `cache_path` defaults to the cache recorded by the first run;
    `include_special` to the first run's training setting."""
    if not run_dirs:
        raise RunError("no run given: pass at least one --sae RUN folder")
    records = [load_run(d) for d in run_dirs]
    cache = open_cache(cache_path or records[0].cache.path)
    cache.require_complete()
    check_same_cache(records, cache)
    chunks = held_out_chunks(records[0], cache, tokens)
    if include_special is None:
        include_special = records[0].special_tokens == "include-real"
    device = resolve_device(device)
    columns = sorted({l for r in records for l in r.layers})
    labels = _labels(records)

    rows = []
    for record, label in zip(records, labels):
        sae = record.load_sae(device)
        matrix = evaluate(sae, cache, chunks, columns, device, include_special)
        own = (
            matrix if record.layers == columns else evaluate(sae, cache, chunks, record.layers, device, include_special)
        )
        rows.append(
            {
                "label": label,
                "run": str(record.dir),
                "trained_layers": record.layers,
                "multi_layer": record.multi_layer,
                "sae": asdict(record.sae),
                "held_out": own,
                "fvu": matrix["fvu"],
                "fvu_feature": matrix["fvu_feature"],
                "mse": matrix["mse"],
                "l0": matrix["l0"],
            }
        )

    result = {
        "cache": str(cache.path),
        "fingerprint": cache.fingerprint,
        "model": cache.meta["model"]["name"],
        "lens": cache.lens_record,
        "eval_chunks": chunks,
        "tokens": rows[0]["held_out"]["tokens"],
        "include_special": include_special,
        "layers": columns,
        "rows": [r["label"] for r in rows],
        "fvu_matrix": [r["fvu"] for r in rows],
        "fvu_feature_matrix": [r["fvu_feature"] for r in rows],
        "runs": rows,
        "definitions": {
            "fvu": "sum of squared errors / sum of squared deviations from the mean of all scalars of the "
            "layer, pooled over the held-out tokens (reference definition)",
            "fvu_feature": "same numerator / sum of squared deviations from each feature's mean (Gao et al.)",
            "matrix": "row = SAE (MLSAE, or single-layer SAE L<i> trained on layer i), column j = the layer "
            "whose vectors it reconstructs",
        },
    }
    result["comparison"] = {"fvu": compare(result, "fvu"), "fvu_feature": compare(result, "fvu_feature")}
    if write:
        out = Path(out_dir) if out_dir is not None else records[0].dir
        out.mkdir(parents=True, exist_ok=True)
        (out / "reconstruction.json").write_text(json.dumps(result, indent=1))
        for key, name in [("fvu", "fvu_matrix.csv"), ("fvu_feature", "fvu_feature_matrix.csv")]:
            write_matrix_csv(out / name, result["rows"], columns, result[f"{key}_matrix"])
        plot_reconstruction(result, out / "reconstruction.png")
        result["files"] = {
            n: str(out / n)
            for n in ["reconstruction.json", "fvu_matrix.csv", "fvu_feature_matrix.csv", "reconstruction.png"]
        }
    return result


def compare(result: dict[str, Any], key: str = "fvu") -> dict[str, Any]:
    """Per evaluation layer j: the (first) MLSAE's FVU, the single-layer SAE trained on j (diagonal) and
    the best single-layer SAE trained on another layer (off-diagonal); None where a row is absent."""
    runs, columns = result["runs"], result["layers"]
    mlsae = next((r for r in runs if r["multi_layer"]), None)
    single = {r["trained_layers"][0]: r for r in runs if not r["multi_layer"]}
    per_layer = []
    for j, layer in enumerate(columns):
        diag = single.get(layer)
        others = [(r[key][j], i) for i, r in single.items() if i != layer and math.isfinite(r[key][j])]
        best = min(others) if others else None
        per_layer.append(
            {
                "layer": layer,
                "mlsae": mlsae[key][j] if mlsae else None,
                "diagonal": diag[key][j] if diag else None,
                "off_diagonal_best": best[0] if best else None,
                "off_diagonal_layer": best[1] if best else None,
            }
        )
    ratios = [p["mlsae"] / p["diagonal"] for p in per_layer if p["mlsae"] is not None and p["diagonal"]]
    beats = [
        p["mlsae"] < p["off_diagonal_best"]
        for p in per_layer
        if p["mlsae"] is not None and p["off_diagonal_best"] is not None
    ]
    return {
        "mlsae": mlsae["label"] if mlsae else None,
        "per_layer": per_layer,
        "mlsae_over_diagonal_mean": sum(ratios) / len(ratios) if ratios else None,
        "mlsae_beats_off_diagonal": sum(beats),
        "off_diagonal_compared": len(beats),
    }


# ---------------------------------------------------------------------------------------------
# output


def write_matrix_csv(path: Path, rows: list[str], columns: list[int], matrix: list[list[float]]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["sae", *[f"layer {l}" for l in columns]])
        for label, values in zip(rows, matrix):
            w.writerow([label, *[f"{v:.6g}" for v in values]])


def _f(v: float | None) -> str:
    return "-" if v is None else f"{v:.4f}"


def format_reconstruction(result: dict[str, Any], key: str = "fvu") -> str:
    """A plain-text table: per layer, MLSAE vs diagonal vs best off-diagonal, and the claim's tally."""
    c = result["comparison"][key]
    lines = [
        f"held-out {key} on {result['tokens']:,} tokens ({len(result['eval_chunks'])} chunks of {result['cache']})",
        f"{'layer':>5}  {'MLSAE':>8}  {'diagonal':>8}  {'best other':>10}  (trained on)",
    ]
    for p in c["per_layer"]:
        other = "" if p["off_diagonal_layer"] is None else f"L{p['off_diagonal_layer']}"
        lines.append(
            f"{p['layer']:>5}  {_f(p['mlsae']):>8}  {_f(p['diagonal']):>8}  {_f(p['off_diagonal_best']):>10}  {other}"
        )
    if c["mlsae_over_diagonal_mean"] is not None:
        lines.append(
            f"MLSAE / diagonal single-layer SAE, mean over layers: {c['mlsae_over_diagonal_mean']:.3f} (paper: ~1)"
        )
    if c["off_diagonal_compared"]:
        lines.append(
            f"MLSAE better than every other-layer SAE at {c['mlsae_beats_off_diagonal']} of "
            f"{c['off_diagonal_compared']} layers (paper: all)"
        )
    return "\n".join(lines)


def plot_reconstruction(result: dict[str, Any], path: Path) -> None:
    """Left: the FVU matrix (log colour scale: off-diagonal FVUs can exceed 1), cells annotated.
    Right: per layer, the MLSAE against the diagonal and the best off-diagonal single-layer SAE."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import LogNorm

    m, rows, cols = result["fvu_matrix"], result["rows"], result["layers"]
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
    per = result["comparison"]["fvu"]["per_layer"]
    for name, label, style in [
        ("mlsae", "MLSAE", "o-"),
        ("diagonal", "single-layer SAE, same layer", "s--"),
        ("off_diagonal_best", "best single-layer SAE, other layer", "^:"),
    ]:
        pts = [(p["layer"], p[name]) for p in per if p[name] is not None]
        if pts:
            ax2.plot(*zip(*pts), style, label=label)
    ax2.set_yscale("log")
    ax2.set_xticks(cols, [str(l) for l in cols])
    ax2.set_xlabel("layer")
    ax2.set_ylabel("held-out FVU")
    ax2.set_title("diagonal vs off-diagonal")
    ax2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
