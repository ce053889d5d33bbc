"""The static latent browser: plain HTML + JSON files that open from disk (file://), no server, no fetch().

    browser/index.html        every latent in one table, sortable by E[L|J], Var(L|J), density, max
                              activation (a small inline script; without JavaScript the table is sorted
                              by E[L|J]), with a P(L|J) sparkline and the tokens it fires on most; a filter box
    browser/latents.json      the same per-latent numbers, machine readable
    browser/latent/<j>.html   one page per latent: P(L|J) and density bars per layer (inline SVG), the
                              activation histogram, its direct next-token logits, its top contexts over all
                              layers and at each layer with the activating token highlighted (colour = value)

Everything a page shows is rendered into it (inline SVG and CSS), so a page is readable with scripts off.
The numbers come from analyze.examples; this module only lays them out.
"""

from __future__ import annotations

import html
import json
import math
import os
import shutil
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from torch import Tensor

from harvest.atomic import fsync_dir, fsync_file

BROWSER_DIR = "browser"
SPARK = "▁▂▃▄▅▆▇█"
LAYER_ROWS = 10  # examples shown per layer on a page (all --top of them are in examples.safetensors)

CSS = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,sans-serif;margin:1.5em auto;max-width:1200px;padding:0 1em;
color:#222}
h1{font-size:1.5em;margin:.2em 0}h2{font-size:1.15em;border-bottom:1px solid #ddd;margin-top:1.6em}
table{border-collapse:collapse;font-size:13px}td,th{border-bottom:1px solid #eee;padding:2px 8px;text-align:left}
th{background:#f4f4f4;cursor:pointer;position:sticky;top:0}td.n{text-align:right;font-variant-numeric:tabular-nums}
.muted{color:#777}.spark{font-family:monospace;letter-spacing:-1px;color:#3366aa}
.ctx{font-family:ui-monospace,Menlo,monospace;font-size:12.5px;white-space:pre-wrap;word-break:break-all}
.ctx mark{border-radius:3px;padding:0 1px;outline:1px solid #c60}
.a0{background:rgba(255,140,0,0.23)}.a1{background:rgba(255,140,0,0.32)}.a2{background:rgba(255,140,0,0.41)}.a3{background:rgba(255,140,0,0.49)}.a4{background:rgba(255,140,0,0.57)}.a5{background:rgba(255,140,0,0.66)}.a6{background:rgba(255,140,0,0.74)}.a7{background:rgba(255,140,0,0.83)}.a8{background:rgba(255,140,0,0.91)}.a9{background:rgba(255,140,0,1.00)}
.ex td{vertical-align:top}nav a{margin-right:1em}details{margin:.3em 0}summary{cursor:pointer}
.note{background:#fff8e1;border-left:3px solid #e0a800;padding:.3em .8em}svg text{font-size:10px;fill:#444}
.tk{font-family:ui-monospace,Menlo,monospace;white-space:pre;background:#eef1f8;border-radius:3px;padding:0 2px}
"""

SORT_JS = """
document.querySelectorAll('th[data-k]').forEach(function(th){th.onclick=function(){
 var tb=document.querySelector('#lat tbody'),i=th.cellIndex,rows=Array.from(tb.rows);
 var d=th.dataset.d=th.dataset.d==='d'?'a':'d';
 rows.sort(function(a,b){var x=parseFloat(a.cells[i].dataset.v),y=parseFloat(b.cells[i].dataset.v);
  if(isNaN(x))return 1;if(isNaN(y))return -1;return d==='a'?x-y:y-x});rows.forEach(function(r){tb.appendChild(r)})}});
var q=document.getElementById('q');q.oninput=function(){var s=q.value.toLowerCase();
 Array.from(document.querySelector('#lat tbody').rows).forEach(function(r){
  r.style.display=r.textContent.toLowerCase().indexOf(s)>=0?'':'none'})};
"""


@dataclass
class BrowserData:
    """What the browser shows, prepared by analyze.examples."""

    summary: dict[str, Any]  # examples.json content (run, cache, tokens, layers, top, context, ...)
    layers: list[int]  # model layer numbers, by position
    p_layer: Tensor  # [F, L] P(L|J)
    mean_layer: Tensor  # [F] E[L|J] (layer positions; NaN: never fired)
    var_layer: Tensor  # [F]
    density: Tensor  # [L, F] firing density per layer
    hist: Tensor  # [F, B]
    hist_edges: Tensor  # [B] lower edges of the bins (the last bin is open)
    examples: Callable[[int, int | None], list[dict[str, Any]]]  # (latent, layer position | None) -> examples
    context: Callable[[int, int], tuple[list[str], int]]  # (seq, pos) -> (token strings, index of pos)
    logits: list[dict[str, Any]] | None  # per latent {"top": [(token, value)], "bottom": [...]}, or None
    logits_note: str  # what the logits are, or why they are absent


def _e(x: Any) -> str:
    return html.escape(str(x), quote=True)


def _num(v: float, digits: int = 3) -> str:
    return "–" if not math.isfinite(v) else f"{v:.{digits}g}"


def _tok(s: str) -> str:
    """A token for display: newlines and tabs made visible, HTML escaped."""
    return _e(s.replace("\n", "↵").replace("\t", "→"))


def _chip(s: str) -> str:
    """A token on its own (index, logits): boxed, so that its spaces show."""
    return f"<span class=tk>{_tok(s)}</span>"


def _spark(p: list[float]) -> str:
    m = max(p, default=0.0)
    if m <= 0:
        return ""
    return "".join(SPARK[min(len(SPARK) - 1, int(x / m * (len(SPARK) - 1) + 0.5))] if x > 0 else " " for x in p)


def _bars(values: list[float], labels: list[str], title: str, height: int = 90, fmt: str = ".3f") -> str:
    """An inline SVG bar chart (no script, no external file)."""
    n, w = len(values), 22
    m = max([v for v in values if math.isfinite(v)], default=0.0) or 1.0
    parts = [f'<svg width="{n * w + 10}" height="{height + 34}" role="img" aria-label="{_e(title)}">']
    for i, v in enumerate(values):
        h = 0 if not math.isfinite(v) else v / m * height
        x = 5 + i * w
        parts.append(
            f'<rect x="{x}" y="{height - h + 12:.1f}" width="{w - 3}" height="{h:.1f}" fill="#4477aa">'
            f"<title>{_e(labels[i])}: {format(v, fmt)}</title></rect>"
            f'<text x="{x + (w - 3) / 2}" y="{height + 26}" text-anchor="middle">{_e(labels[i])}</text>'
        )
    parts.append("</svg>")
    return "".join(parts)


def _context_html(tokens: list[str], at: int, value: float, vmax: float) -> str:
    """The context with the activating token highlighted; opacity (10 CSS classes) = value / vmax."""
    shade = min(9, int(10 * value / vmax)) if vmax > 0 else 9
    left = "".join(_tok(t) for t in tokens[:at])
    right = "".join(_tok(t) for t in tokens[at + 1 :])
    return f"<span class=ctx>{left}<mark class=a{shade}>{_tok(tokens[at])}</mark>{right}</span>"


def _examples_table(data: BrowserData, rows: list[dict[str, Any]], vmax: float, show_layer: bool) -> str:
    if not rows:
        return "<p class=muted>no firing examples</p>"
    out = [
        "<table class=ex><tr><th>value</th>"
        + ("<th>layer</th>" if show_layer else "")
        + "<th>window:pos</th><th>context</th></tr>"
    ]
    for r in rows:
        toks, at = data.context(r["seq"], r["pos"])
        layer = f"<td class=n>{data.layers[r['layer_pos']]}</td>" if show_layer else ""
        out.append(
            f"<tr><td class=n>{r['value']:.3f}</td>{layer}<td class=n>{r['seq']}:{r['pos']}</td>"
            f"<td>{_context_html(toks, at, r['value'], vmax)}</td></tr>"
        )
    return "".join(out) + "</table>"


def top_tokens(data: BrowserData, latent: int, n: int = 3) -> list[str]:
    """The tokens that appear most often as the activating token of its top examples."""
    counts = Counter()
    for r in data.examples(latent, None):
        toks, at = data.context(r["seq"], r["pos"])
        counts[toks[at]] += 1
    return [t for t, _ in counts.most_common(n)]


def _latent_page(data: BrowserData, j: int, n_latents: int) -> str:
    L = len(data.layers)
    labels = [str(l) for l in data.layers]
    mean, var = float(data.mean_layer[j]), float(data.var_layer[j])
    dens = [float(x) for x in data.density[:, j]]
    overall = data.examples(j, None)
    vmax = overall[0]["value"] if overall else 0.0
    nav = (
        "<nav><a href='../index.html'>index</a>"
        + (f"<a href='{j - 1}.html'>&larr; latent {j - 1}</a>" if j > 0 else "")
        + (f"<a href='{j + 1}.html'>latent {j + 1} &rarr;</a>" if j + 1 < n_latents else "")
        + "</nav>"
    )
    if not overall:
        body = "<p class=note>This latent never fired (value &gt; 1e-3) on the tokens streamed: it is dead there.</p>"
        return _doc(f"latent {j}", nav + f"<h1>Latent {j}</h1>" + body)
    mean_label = f"{mean:.2f}" + (f" (≈ layer {data.layers[round(mean)]})" if math.isfinite(mean) else "")
    stats = (
        f"<p>E[L|J] = <b>{mean_label}</b> · Var(L|J) = <b>{_num(var)}</b> · density (mean over layers) = "
        f"<b>{_num(sum(dens) / L)}</b> · max activation = <b>{vmax:.4g}</b> · "
        f"fires on {int(sum(x * data.summary['tokens'] for x in dens)):,} (token, layer) vectors of "
        f"{data.summary['tokens']:,} tokens x {L} layers</p>"
    )
    charts = (
        "<h2>Where it fires</h2><div style='display:flex;gap:2em;flex-wrap:wrap'><div>"
        + _bars([float(x) for x in data.p_layer[j]], labels, "P(L|J) by layer")
        + "<div class=muted>P(L|J): share of its activation mass at each layer</div></div><div>"
        + _bars(dens, labels, "firing density by layer", fmt=".2e")
        + "<div class=muted>firing density: fraction of tokens it fires on, per layer</div></div></div>"
    )
    edges = [float(e) for e in data.hist_edges]
    hist = [float(c) for c in data.hist[j]]
    nz = [i for i, c in enumerate(hist) if c > 0]
    lo, hi = nz[0], nz[-1] + 1
    hist_html = (
        "<h2>Activation histogram</h2>"
        + _bars(hist[lo:hi], [f"{edges[i]:.2g}" for i in range(lo, hi)], "firing values per bin", fmt=".0f")
        + "<div class=muted>(token, layer) firing values per log-spaced bin (label: lower edge)</div>"
    )
    if data.logits is None:
        logits_html = f"<h2>Next-token logits</h2><p class=note>{_e(data.logits_note)}</p>"
    else:
        lg = data.logits[j]
        cell = lambda items: "".join(f"<tr><td>{_chip(t)}</td><td class=n>{v:+.3f}</td></tr>" for t, v in items)
        logits_html = (
            "<h2>Next-token logits</h2><p class=muted>"
            + _e(data.logits_note)
            + "</p><div style='display:flex;gap:3em'><table><tr><th>promoted</th><th></th></tr>"
            + cell(lg["top"])
            + "</table><table><tr><th>suppressed</th><th></th></tr>"
            + cell(lg["bottom"])
            + "</table></div>"
        )
    top_html = (
        f"<h2>Top contexts over all layers</h2><p class=muted>each token once, at the layer where it fires "
        f"most; highlight opacity = activation / {vmax:.4g}</p>" + _examples_table(data, overall, vmax, True)
    )
    per_layer = ["<h2>Top contexts at each layer</h2>"]
    per_layer.append(
        f"<p class=muted>at most {LAYER_ROWS} per layer here; examples.safetensors holds all "
        f"{data.summary['top']} per layer</p>"
    )
    for li in range(L):
        rows = data.examples(j, li)[:LAYER_ROWS]
        if rows:
            per_layer.append(
                f"<details{' open' if li == round(mean) else ''}><summary>layer {data.layers[li]}: "
                f"P = {float(data.p_layer[j, li]):.3f}, density {dens[li]:.2e}, max {rows[0]['value']:.4g}</summary>"
                + _examples_table(data, rows, vmax, False)
                + "</details>"
            )
    body = nav + f"<h1>Latent {j}</h1>" + stats + charts + hist_html + logits_html + top_html + "".join(per_layer)
    return _doc(f"latent {j}", body)


def _doc(title: str, body: str, script: str = "") -> str:
    return (
        f"<!doctype html><html lang=en><head><meta charset=utf-8><title>{_e(title)}</title>"
        f"<style>{CSS}</style></head><body>{body}{f'<script>{script}</script>' if script else ''}</body></html>"
    )


def _index(data: BrowserData, rows: list[dict[str, Any]]) -> str:
    s = data.summary
    lens = s.get("lens")
    head = (
        f"<h1>Latent browser</h1><p>{s['n_latents']:,} latents (k = {s['k']}) of <code>{_e(s['sae'])}</code>, "
        f"layers {data.layers[0]}..{data.layers[-1]} of {_e(s['model'])}; {s['tokens']:,} tokens of "
        f"<code>{_e(s['cache'])}</code>{' (tuned-lens space)' if lens else ''}; top {s['top']} examples per latent "
        f"and per layer, ±{s['context']} tokens of context.</p>"
        "<p class=muted>Click a column to sort (E[L|J]: mean layer position of a latent's activation mass, "
        "Var(L|J): its spread over layers, density: fraction of tokens it fires on, mean over layers, max: "
        "largest activation). The bars show P(L|J) over the layers. Type to filter, e.g. a token.</p>"
        "<p><input id=q placeholder='filter, e.g.  America' size=40></p>"
    )
    order = sorted(rows, key=lambda r: (r["mean_layer"] is None, r["mean_layer"] or 0.0, r["latent"]))
    cells = []
    for r in order:
        num = lambda v, d=3: f"<td class=n data-v='{'NaN' if v is None else v}'>{'–' if v is None else _num(v, d)}</td>"
        cells.append(
            f"<tr><td data-v='{r['latent']}'><a href='latent/{r['latent']}.html'>{r['latent']}</a></td>"
            + num(r["mean_layer"])
            + num(r["var_layer"])
            + num(r["density"])
            + num(r["max"])
            + f"<td class=spark>{_spark(r['p_layer'])}</td><td>{' '.join(_chip(t) for t in r['top_tokens'])}</td></tr>"
        )
    table = (
        "<table id=lat><thead><tr><th data-k>latent</th><th data-k>E[L|J]</th><th data-k>Var(L|J)</th>"
        "<th data-k>density</th><th data-k>max</th><th>P(L|J)</th><th>fires most on</th></tr></thead><tbody>"
        + "".join(cells)
        + "</tbody></table>"
    )
    return _doc("latent browser", head + table, SORT_JS)


def write_browser(out_dir: str | Path, data: BrowserData, progress: bool = False) -> dict[str, Any]:
    """Write browser/index.html, browser/latents.json and browser/latent/<j>.html for every latent.

    Pages go to a temporary folder next to it that replaces browser/ when complete: a reader sees the old
    browser or the new one, never a half-written one (one fsync per folder, not per page: 5,120 pages)."""
    from harvest.progress import progress_bar

    out_dir = Path(out_dir)
    final = out_dir / BROWSER_DIR
    tmp = Path(tempfile.mkdtemp(prefix=f".{BROWSER_DIR}.", dir=out_dir))
    try:
        (tmp / "latent").mkdir()
        F, L = data.p_layer.shape[0], len(data.layers)
        rows = []
        with progress_bar("browser", F, "pages", enabled=progress) as bar:
            for j in range(F):
                ex = data.examples(j, None)
                mean, var = float(data.mean_layer[j]), float(data.var_layer[j])
                rows.append(
                    {
                        "latent": j,
                        "mean_layer": mean if math.isfinite(mean) else None,
                        "var_layer": var if math.isfinite(var) else None,
                        "density": float(data.density[:, j].sum()) / L,
                        "density_per_layer": [float(x) for x in data.density[:, j]],
                        "max": ex[0]["value"] if ex else None,
                        "p_layer": [round(float(x), 5) for x in data.p_layer[j]],
                        "top_tokens": top_tokens(data, j) if ex else [],
                    }
                )
                (tmp / "latent" / f"{j}.html").write_text(_latent_page(data, j, F), encoding="utf-8")
                bar.advance(1)
        index = {
            "summary": data.summary,
            "layers": data.layers,
            "logits": data.logits_note,
            "fields": {
                "mean_layer": "E[L|J] in layer positions 0..L-1 (null: never fired)",
                "var_layer": "Var(L|J)",
                "density": "fraction of tokens it fires on, mean over layers",
                "density_per_layer": "fraction of tokens it fires on, per layer position",
                "max": "largest activation over all layers",
                "p_layer": "P(L|J) per layer position",
                "top_tokens": "most frequent activating tokens among its top examples over all layers",
            },
            "latents": rows,
        }
        (tmp / "latents.json").write_text(json.dumps(index, allow_nan=False), encoding="utf-8")
        (tmp / "index.html").write_text(_index(data, rows), encoding="utf-8")
        for f in [tmp / "latents.json", tmp / "index.html"]:
            fsync_file(f)
        fsync_dir(tmp / "latent")
        fsync_dir(tmp)
        old = out_dir / f".{BROWSER_DIR}.old-{os.getpid()}"
        if final.exists():
            os.rename(final, old)
        os.rename(tmp, final)
        fsync_dir(out_dir)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {"index": f"{BROWSER_DIR}/index.html", "json": f"{BROWSER_DIR}/latents.json", "pages": F}
