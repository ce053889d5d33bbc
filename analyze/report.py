"""One self-contained HTML report from the typed results in an analysis folder (analyze/results.py).

No external assets: figures are embedded as base64 data URIs and the CSS is inline, so the file can be
mailed or attached as is. Every number comes from a field of a typed result, by name: a renamed field
is an AttributeError in the tests, never a row that quietly disappears. Each section starts with its
result's headline numbers (the same rows `analyze compare` lists), then its tables and figures.
"""

from __future__ import annotations

import base64
import dataclasses
import html
import os
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from analyze.claims import Claim, claims
from analyze.results import (
    DELTA_CE_BASELINES,
    RESULT_TYPES,
    Analyses,
    CacheInfo,
    DeltaCeResult,
    ExamplesSummary,
    Headline,
    MmcsResult,
    PromptResult,
    Provenance,
    ReconstructionResult,
    ResidResult,
    Result,
    RunInfo,
    TrainingResult,
    VarianceResult,
    format_value,
    lens_name,
    load_analyses,
)
from harvest.atomic import atomic_write_text
from harvest.errors import UserError
from train.record import load_run

REPORT_HTML = "report.html"

CSS = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,sans-serif;margin:2em auto;max-width:1100px;padding:0 1em;color:#222}
h1{font-size:1.6em;margin-bottom:.2em}h2{border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:2em}
h3{font-size:1.05em;margin-top:1.2em}table{border-collapse:collapse;margin:.5em 0;font-size:13px}
td,th{border:1px solid #ddd;padding:3px 7px;text-align:left;vertical-align:top}th{background:#f4f4f4}
td.n{text-align:right;font-variant-numeric:tabular-nums}.muted{color:#777}.ok{color:#1a7f37;font-weight:600}
.no{color:#c62828;font-weight:600}.meh{color:#a66b00;font-weight:600}img{max-width:100%;border:1px solid #eee;margin:.5em 0}
details{margin:.5em 0}code{background:#f4f4f4;padding:0 3px}.scroll{overflow-x:auto}
"""


# ---------------------------------------------------------------------------------------------
# provenance: the cache and the runs behind the numbers


def cache_info(path: str | Path) -> CacheInfo | None:
    """What the report says about a cache; None where it is no longer readable (moved or deleted): the
    numbers still stand, only their provenance is thinner."""
    from harvest import open_cache

    try:
        c = open_cache(path)
    except UserError:
        return None
    m, spec = c.meta, c.meta.get("spec") or {}
    return CacheInfo(
        path=str(c.path),
        model=str((m.get("model") or {}).get("name")),
        dataset=str(spec.get("dataset")),
        tokens=c.layout.n_tokens,
        context=c.layout.context,
        layers=list(c.layers),
        d_model=c.layout.d_model,
        dtype=c.layout.dtype,
        hook=str(spec.get("hook")),
        special_tokens=str(spec.get("special_tokens", "exclude")),
        prepend_bos=bool((m.get("tokenizer") or {}).get("prepend_bos")),
        lens=lens_name(c.lens_record),
        fingerprint=c.fingerprint,
    )


def run_info(run_dir: str | Path) -> RunInfo:
    """What the report says about a run (train's RunRecord, docs/format.md)."""
    r = load_run(run_dir, require_sae=False)
    return RunInfo(
        folder=str(run_dir),
        label=r.label(),
        layers=list(r.layers),
        n_latents=r.sae.n_latents,
        k=r.sae.k,
        steps=r.steps,
        train_tokens=r.steps * r.train.batch_tokens,
        special_tokens=r.special_tokens,
        held_out=r.heldout.describe(),
    )


def clear_results(folder: str | Path) -> None:
    """Remove the typed results `analyze report` writes from `folder` (not the latent browser's record)."""
    for t in RESULT_TYPES:
        if t is not ExamplesSummary:
            t.path_in(folder).unlink(missing_ok=True)


def provenance(run_dirs: Sequence[str | Path], cache: str | Path) -> Provenance:
    return Provenance(
        cache=cache_info(cache),
        runs=[run_info(d) for d in run_dirs],
        created=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    )


# ---------------------------------------------------------------------------------------------
# HTML pieces


def _e(x: Any) -> str:
    return html.escape(str(x))


def _n(v: Any) -> str:
    return _e(format_value(v))


def _table(header: Sequence[str], rows: Iterable[Sequence[str]], num_cols: Iterable[int] = ()) -> str:
    """Cells are HTML already (escape with _e / _n)."""
    nums = set(num_cols)
    h = "".join(f"<th>{_e(c)}</th>" for c in header)
    body = "".join(
        "<tr>" + "".join(f"<td{' class=n' if i in nums else ''}>{c}</td>" for i, c in enumerate(r)) + "</tr>"
        for r in rows
    )
    return f"<div class=scroll><table><tr>{h}</tr>{body}</table></div>"


def _img(path: Path) -> str:
    try:
        b64 = base64.b64encode(path.read_bytes()).decode("ascii")
    except OSError:
        return f"<p class=muted>figure {_e(path.name)} could not be read</p>"
    name = _e(path.name)
    return f'<figure><img alt="{name}" src="data:image/png;base64,{b64}"><figcaption class=muted>{name}</figcaption></figure>'


def _headlines(rows: list[Headline]) -> str:
    return _table(["headline", "value"], [[_e(h.label), _n(h.value)] for h in rows], [1])


def _definitions(defs: dict[str, str]) -> str:
    if not defs:
        return ""
    rows = [[f"<code>{_e(k)}</code>", _e(v)] for k, v in defs.items()]
    return "<details><summary>Definitions</summary>" + _table(["quantity", "definition"], rows) + "</details>"


def _per_layer(layers: Sequence[Any], columns: dict[str, Sequence[Any]]) -> str:
    rows = [[_e(l)] + [_n(col[i]) for col in columns.values()] for i, l in enumerate(layers)]
    return _table(["layer", *columns], rows, range(1, len(columns) + 1))


# ---------------------------------------------------------------------------------------------
# sections


def _claims_html(rows: list[Claim]) -> str:
    if not rows:
        return "<h2 id=claims>Claims checked</h2><p class=muted>no analysis with the numbers for a claim was found</p>"
    body = [
        [
            _e(c.claim),
            _e(c.poster),
            _e(c.ours),
            _e(c.reference) or "<span class=muted>-</span>",
            f"<span class={c.verdict_class()}>{_e(c.verdict)}</span>",
            _e(c.would_change),
        ]
        for c in rows
    ]
    header = ["claim (Lawson et al. poster)", "poster", "ours", "reference formula", "verdict", "would change it"]
    return "<h2 id=claims>Claims checked</h2>" + _table(header, body)


def _provenance_html(p: Provenance) -> str:
    parts = [f"<p class=muted>report generated {_e(p.created)}</p>"]
    if p.cache is not None:
        c = p.cache
        fields = [
            ("path", c.path),
            ("model", c.model),
            ("dataset", c.dataset),
            ("tokens", c.tokens),
            ("context", c.context),
            ("layers", f"{c.layers[0]}..{c.layers[-1]} ({len(c.layers)})" if c.layers else "-"),
            ("d_model", c.d_model),
            ("dtype", c.dtype),
            ("hook", c.hook),
            ("special tokens", c.special_tokens),
            ("BOS prepended", c.prepend_bos),
            ("tuned lens", c.lens),
            ("fingerprint", c.fingerprint[:16]),
        ]
        parts.append("<h3>Cache</h3>" + _table(["field", "value"], [[_e(k), _n(v)] for k, v in fields]))
    else:
        parts.append("<p class=muted>the cache is no longer readable at its recorded path</p>")
    if p.runs:
        rows = [
            [
                _e(r.label),
                _e(r.folder),
                _e(r.layers),
                _n(r.n_latents),
                _n(r.k),
                _n(r.steps),
                _n(r.train_tokens),
                _e(r.special_tokens),
                _e(r.held_out),
            ]
            for r in p.runs
        ]
        header = ["SAE", "folder", "layers", "latents", "k", "steps", "training tokens", "special tokens", "held out"]
        parts.append("<h3>SAE runs</h3>" + _table(header, rows, [3, 4, 5, 6]))
    return "\n".join(parts)


def _variance_html(v: VarianceResult) -> str:
    ref = v.reference
    pairs = [
        ("Var(L)", v.variances.var_l, ref.var_l if ref else None),
        ("E[Var(L|J)]", v.variances.exp_var_l_given_j, ref.exp_var_l_f if ref else None),
        ("E[Var(L|J,T)]", v.variances.exp_var_l_given_jt, ref.exp_var_l_tf if ref else None),
        ("E[Var(L|J)] / Var(L)", v.variances.ratio_latent, ref.rel_var_f if ref else None),
        ("E[Var(L|J,T)] / E[Var(L|J)]", v.variances.ratio_token, ref.rel_var_t if ref else None),
    ]
    head = ["quantity", f"proper variance ({v.tokens:,} tokens)"]
    if ref is not None:
        head.append(f"reference code's formula: NOT a proper variance ({ref.tokens:,} tokens in {ref.batches} batches)")
    rows = [[_e(name), _n(p)] + ([_n(r)] if ref is not None else []) for name, p, r in pairs]
    out = "<h3>The variance of the layer index</h3>" + _table(head, rows, [1, 2])
    if ref is not None:
        seen = (
            ref.tokens_seen
            or "shuffled batches of cache tokens (a result from before the reference column used whole windows)"
        )
        out += f"<p class=muted>{_e(ref.label)}; its batches: {_e(seen)}; source: {_e(ref.source)}</p>"
    else:
        out += "<p class=muted>run with --reference-formulas to see the reference code's formulas beside these</p>"
    ml = v.multi_layer
    out += "<h3>Latents active at more than one layer</h3>" + _table(
        ["fraction", "value"],
        [
            [_e("per token, pooled over (token, latent) pairs"), _n(ml.per_token_pooled)],
            [_e("per token, mean over tokens"), _n(ml.per_token_mean)],
            [_e("aggregated over all tokens"), _n(ml.aggregated)],
            [_e("active latents"), _n(ml.active_latents)],
            [_e("mean active latents per token"), _n(ml.mean_active_latents_per_token)],
        ],
        [1],
    )
    return out


def _reconstruction_html(r: ReconstructionResult) -> str:
    out = (
        f"<p>Held out: {_n(r.tokens)} kept tokens of {_e(r.held_out_set.describe())}; special tokens: "
        f"{_e(r.special_tokens)}.</p>"
    )
    for run in r.runs:
        h = run.held_out
        out += f"<h3>{_e(run.label)} on its own layers <span class=muted>({_e(run.run)})</span></h3>"
        out += _per_layer(
            h.layers,
            {
                "FVU": h.fvu,
                "FVU per feature": h.fvu_feature,
                "MSE": h.mse,
                "L0": h.l0,
                "never fires at this layer on held-out tokens": h.silent_on_heldout,
                "firing density": h.firing_density,
            },
        )
        out += (
            f"<p>mean over layers: FVU {_n(h.fvu_mean)}, per feature {_n(h.fvu_feature_mean)}; never fires at any layer on held-out tokens "
            f"layer {_n(h.silent_on_heldout_all_layers)}</p>"
        )
    if len(r.runs) > 1:
        out += "<h3>Layer x layer FVU (row: SAE, column: evaluated layer)</h3>" + _table(
            ["", *map(str, r.layers)],
            [[_e(run.label)] + [_n(x) for x in run.matrix.fvu] for run in r.runs],
            range(1, len(r.layers) + 1),
        )
        c = r.comparison_fvu
        out += "<h3>MLSAE vs single-layer SAEs</h3>" + _table(
            ["layer", "MLSAE", "diagonal", "best other", "trained on"],
            [
                [_e(p.layer), _n(p.mlsae), _n(p.diagonal), _n(p.off_diagonal_best), _n(p.off_diagonal_layer)]
                for p in c.per_layer
            ],
            [1, 2, 3],
        )
    return out


def _training_html(t: TrainingResult) -> str:
    rows = [
        [
            _e(c.label),
            _n(len(c.tokens)),
            _n(c.tokens[-1]),
            _n(c.fvu_mean[0]),
            _n(c.fvu_mean[-1]),
            _n(c.fvu_feature_mean[-1]),
            _n(c.last_quarter_drop()),
        ]
        for c in t.curves
    ]
    header = ["SAE", "evaluations", "tokens", "first FVU", "last FVU", "last FVU per feature", "drop, last quarter"]
    return _table(header, rows, range(1, 7))


def _delta_ce_html(d: DeltaCeResult) -> str:
    w = d.window_source
    where = (
        f"{d.windows} windows of {d.context} tokens ({_e(w.source)}"
        + (f"; held-out share of their tokens {_n(w.held_out_token_fraction)}" if w.held_out_token_fraction else "")
        + (f"; {w.fully_held_out_windows} fully held out" if w.fully_held_out_windows is not None else "")
        + (f"; dataset {_e(w.dataset)}" if w.dataset else "")
        + ")"
    )
    return (
        f"<p>{_n(d.tokens)} predictions over {where}; clean CE {_n(d.clean_ce)} nats; special tokens: "
        f"{_e(d.special_tokens)}; hook {_e(d.hook)}; delta CE and KL against {_e(DELTA_CE_BASELINES.get(d.baseline, d.baseline))}.</p>"
        + _per_layer(
            d.layers,
            {"delta CE (nats)": d.delta_ce, "KL (nats)": d.kl, "CE spliced": d.ce}
            | ({"CE baseline": d.baseline_ce} if d.baseline_ce else {}),
        )
    )


def _resid_html(r: ResidResult) -> str:
    out = _table(
        ["layers", "cosine (centered)", "cosine (raw)"],
        [[f"{a} &rarr; {b}", _n(c), _n(u)] for (a, b), c, u in zip(r.pairs, r.cosine_centered, r.cosine_uncentered)],
        [1, 2],
    )
    return out + _per_layer(r.layers, {"mean L2 norm": r.norm_mean})


def _mmcs_html(m: MmcsResult) -> str:
    q = ", ".join(f"{k}: {format_value(v)}" for k, v in m.max_cosine_quantiles.items())
    return f"<p>{_n(m.n_latents)} decoder directions of {_e(m.sae)}; quantiles of each one's max cosine: {_e(q)}</p>"


def _prompt_html(p: PromptResult) -> str:
    rows = []
    for t in p.tokens:
        top = "; ".join(f"{d.latent} @ layers {d.layers}" for d in t.top)
        name = f"<code>{_e(repr(t.text)[1:-1])}</code>" + (
            " <span class=muted>(special, excluded)</span>" if t.special else ""
        )
        rows.append([_n(t.pos), name, _n(t.n_active), _n(t.n_multi), _e(top)])
    return f"<p>Prompt: <code>{_e(p.text)}</code></p>" + _table(
        ["#", "token", "active latents", "at >= 2 layers", "top latents and their layers"], rows, [0, 2, 3]
    )


def _examples_html(e: ExamplesSummary) -> str:
    numbers = (
        f" ({_n(e.latents)} latents, {_n(e.examples_per_latent)} examples each, over {_n(e.tokens)} tokens)"
        if e.tokens is not None
        else ""
    )
    link = f"<a href='{_e(e.browser)}'>Open the latent browser</a>"
    return f"<p>{link}{numbers}: every latent's top examples over all layers and per layer.</p>"


BROWSER_INDEX = Path("latents") / "browser" / "index.html"  # where `analyze examples` writes it (default --out)


def find_browser(folder: str | Path, run_dir: str | Path) -> ExamplesSummary | None:
    """The latent browser of `analyze examples` for the report in `folder`: under the folder, else under
    the run; saved as latent_browser.json so the report and `analyze compare` see it. None without one."""
    for base in (Path(folder), Path(run_dir)):
        if (base / BROWSER_INDEX).is_file():
            found = ExamplesSummary(sae=str(run_dir), browser=os.path.relpath(base / BROWSER_INDEX, folder))
            mine = ExamplesSummary.load_if_present(base / BROWSER_INDEX.parent.parent)  # analyze examples' numbers
            if mine is not None:
                found = dataclasses.replace(mine, browser=found.browser)
            found.save(folder)
            return found
    return None


def _section(anchor: str, result: Result, body: str, folder: Path) -> str:
    figures = [folder / f for f in result.figures]
    return "\n".join(
        [
            f"<h2 id={anchor}>{_e(result.TITLE)}</h2>",
            f"<p class=muted>from {_e(result.FILE)}</p>",
            _headlines(result.headlines()),
            body,
            *(_img(f) for f in figures if f.is_file()),
            _definitions(result.definitions),
        ]
    )


SECTION_BODIES: dict[type, Callable[[Any], str]] = {
    Provenance: _provenance_html,
    VarianceResult: _variance_html,
    ReconstructionResult: _reconstruction_html,
    TrainingResult: _training_html,
    DeltaCeResult: _delta_ce_html,
    ResidResult: _resid_html,
    MmcsResult: _mmcs_html,
    PromptResult: _prompt_html,
    ExamplesSummary: _examples_html,
}


def render(a: Analyses, title: str | None = None) -> str:
    """The report of one analysis folder as one HTML document."""
    prov = a.provenance
    model = prov.cache.model if prov and prov.cache else None
    model = Path(model).name if model and "/" in model and Path(model).exists() else model  # a folder: its name
    title = title or f"Multi-layer SAE analysis{f': {model}' if model else ''}"
    sections: list[tuple[str, str, str]] = []  # (anchor, title, html)

    for result in a.present():
        html_ = _section(result.KIND, result, SECTION_BODIES[type(result)](result), a.folder)
        sections.append((result.KIND, result.TITLE, html_))
    claimed = {f for r in a.present() for f in r.figures}
    rest = [p for p in sorted(a.folder.glob("*.png")) if p.name not in claimed]
    if rest:
        sections.append(("other", "Other figures", "<h2 id=other>Other figures</h2>" + "".join(map(_img, rest))))
    toc = " · ".join(f"<a href='#{anchor}'>{_e(t)}</a>" for anchor, t, _ in sections)
    return (
        f"<!doctype html><html lang=en><head><meta charset=utf-8><title>{_e(title)}</title><style>{CSS}</style>"
        f"</head><body><h1>{_e(title)}</h1><p class=muted>reproduces Lawson et al., Residual Stream Analysis with "
        f"Multi-Layer SAEs (arXiv 2409.04185)</p><p>{toc}</p>{_claims_html(claims(a))}"
        + "".join(h for _, _, h in sections)
        + "</body></html>"
    )


def report_folder(
    folder: str | Path,
    out_html: str | Path | None = None,
    title: str | None = None,
    sae_dirs: Sequence[str | Path] = (),
) -> Path:
    """Load the typed results of `folder` and write one self-contained HTML (<folder>/report.html); links the
    latent browser of `analyze examples` found under the folder or the first of `sae_dirs`."""
    folder = Path(folder)
    if not ExamplesSummary.path_in(folder).is_file():
        find_browser(folder, sae_dirs[0] if sae_dirs else folder)
    analyses = load_analyses(folder)
    if not analyses.present():
        raise UserError(
            f"{folder} holds no analysis results: run `analyze report --sae RUN` (or single analyses) first"
        )
    out = Path(out_html) if out_html is not None else folder / REPORT_HTML
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, render(analyses, title))
    return out
