"""The static latent browser: a folder of plain files that opens from disk (file://) or from any static web
server, can be copied or served as it is (relative links only, no path of the machine it was made on, files
0644 and folders 0755 under the usual umask 022), and stays small at the scale of a real MLSAE.

    browser/index.html          the latent table: search by token text or latent number, sort by E[L|J],
                                Var(L|J), density, max (script); without JavaScript, a static table of the
                                first PER_PAGE latents by number, with index-2.html, index-3.html, ... after it
    browser/latents/<K>.html    shard page K: latents K*per_shard ..: the viewer renders the latent named
                                in the URL's #fragment; without JavaScript, every latent of the shard with its
                                numbers and its top examples as static HTML
    browser/data/index.js       per-latent numbers of the index          } each file is one call
    browser/data/shard-<K>.js   everything a latent page shows           } MLSAE.<name>(JSON); strip
    browser/data/tokens.js      token id -> text of every token shown    } the call to read the JSON
    browser/style.css, index.js, viewer.js

A latent page (Neuronpedia's latent page plus the MLSAE view): P(L|J) and firing density per layer, the
activation histogram (axes, counts, the quantile groups), the direct next-token logits, the top
activations over all layers, random examples from each activation-quantile group, and the top examples at
each layer; every context shaded token by token by the latent's activation (value on hover), shown at a
context width chosen on the page (up to the --context stored).

Tokens are shown as what they are: control, format (bidi, zero-width), private-use and non-ASCII space
characters become a visible "U+XXXX" tag, each token is bidi-isolated, newlines and tabs are shown as arrows.
Every data file is pure ASCII (JSON escapes), so no raw control, bidi or zero-width character is in any file.
Nothing comes from the network. The numbers come from analyze.examples; this module only lays them out.
"""

from __future__ import annotations

import html
import json
import math
import os
import shutil
import unicodedata
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import Tensor

from analyze.browser_assets import CSS, INDEX_JS, VIEWER_JS
from harvest.atomic import atomic_write_text, fresh_folder, fsync_dir

BROWSER_DIR = "browser"
SPARK = "▁▂▃▄▅▆▇█"
PER_SHARD = 128  # latents per shard: 16,384 latents = 128 shard pages + 128 data files
PER_PAGE = 1024  # latents per static index page
TOP_SHOWN = 16  # top examples over all layers on a page, with --context tokens each side
LAYER_ROWS = 3  # top examples shown per layer, for the layers holding at least LAYER_MIN_P of P(L|J)
LAYER_MIN_P = 0.05
SHORT_CONTEXT = 6  # tokens each side of the quantile and per-layer examples (at most --context)
STATIC_TOP = 3  # top examples in the pages' no-script HTML, with STATIC_CONTEXT tokens each side
STATIC_CONTEXT = 6
TOP_TOKENS = 5  # activating tokens per latent in the index (what the search matches)
B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"

# characters never written raw: controls, format characters (bidi embeddings/overrides/isolates, LRM/RLM,
# zero-width space/joiners, BOM, word joiner, soft hyphen), surrogates, private use, unassigned, line and
# paragraph separators; and every space but U+0020 (look-alikes of a space)
HIDDEN_CATEGORIES = {"Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp", "Zs"}


@dataclass
class BrowserData:
    """What the browser shows, prepared by analyze.examples (or synthetic, for a size benchmark)."""

    summary: dict[str, Any]  # examples.json content (tokens, layers, top, context, n_latents, k, ...)
    layers: list[int]  # model layer numbers, by position
    p_layer: Tensor  # [F, L] P(L|J)
    mean_layer: Tensor  # [F] E[L|J] (layer positions; NaN: never fired)
    var_layer: Tensor  # [F]
    density: Tensor  # [L, F] firing density per layer
    hist: Tensor  # [F, B] firing vectors per bin
    hist_edges: Tensor  # [B] lower edges of the bins (the last bin is open)
    examples: Callable[[int, int | None], list[dict[str, Any]]]  # (latent, layer position | None) -> best first
    samples: Callable[[int], list[dict[str, Any]]]  # latent -> quantile groups (ExampleAccumulator.quantile_samples)
    # items [N, 4] (seq, pos, latent, layer position) -> token ids [N, 2c+1] (-1 outside the window) and the
    # latent's activation there at that layer [N, 2c+1] (0: does not fire, NaN: token not encoded)
    contexts: Callable[[Tensor], tuple[Tensor, Tensor]]
    token_text: Callable[[list[int]], dict[int, str]]  # token ids -> decoded text
    vocab_size: int
    logits: tuple[Tensor, Tensor, Tensor, Tensor] | None  # top ids, top values, bottom ids, bottom values [F, n]
    logits_note: str  # what the logits are, or why they are absent


# ---------------------------------------------------------------------------------------------
# text that shows what it is


def _hex(c: str) -> str:
    return f"U+{ord(c):04X}"


def visible(s: str, chip: bool = False) -> str:
    """HTML of a token's text: escaped, each hidden character as a small U+XXXX tag (name on hover), newline
    and tab as arrows, and (`chip`: a token on its own, or one made only of spaces) spaces as middle dots."""
    out = []
    for c in s:
        if c == "\n":
            out.append("<i class=ws>↵</i>")
        elif c == "\t":
            out.append("<i class=ws>→</i>")
        elif c == " ":
            out.append("<i class=ws>·</i>" if chip else " ")
        elif unicodedata.category(c) in HIDDEN_CATEGORIES:
            name = unicodedata.name(c, "")
            out.append(f"<span class=u title='{_hex(c)}{' ' + name if name else ''}'>{_hex(c)}</span>")
        else:
            out.append(html.escape(c, quote=True))
    return "".join(out)


def _e(x: Any) -> str:
    """Any other text (names, notes): escaped, hidden characters as U+XXXX."""
    return "".join(
        f"[{_hex(c)}]" if unicodedata.category(c) in HIDDEN_CATEGORIES and c != " " else html.escape(c, quote=True)
        for c in str(x)
    )


def _chip(s: str) -> str:
    return f"<span class=tk>{visible(s, chip=True)}</span>"


def _num(v: float | None, digits: int = 3) -> str:
    return "–" if v is None or not math.isfinite(v) else f"{v:.{digits}g}"


def _r(v: float, digits: int = 4) -> float | None:
    """A number for the data files: `digits` significant digits, None for NaN/inf (JSON has neither)."""
    return float(f"{v:.{digits}g}") if math.isfinite(v) else None


def _spark(p: list[float]) -> str:
    m = max(p, default=0.0)
    if m <= 0:
        return ""
    return "".join(SPARK[min(len(SPARK) - 1, int(x / m * (len(SPARK) - 1) + 0.5))] if x > 0 else " " for x in p)


def _b64(ids: list[int], width: int) -> str:
    out = []
    for i in ids:
        out.append("".join(B64[(i >> (6 * (width - 1 - k))) & 63] for k in range(width)))
    return "".join(out)


def token_width(vocab_size: int) -> int:
    """Base-64 characters per token id."""
    w = 1
    while 64**w < vocab_size:
        w += 1
    return w


def _js(name: str, *args: Any) -> str:
    """A data file: one call MLSAE.<name>(...) of JSON values, pure ASCII."""
    body = ",".join(json.dumps(a, ensure_ascii=True, allow_nan=False, separators=(",", ":")) for a in args)
    return f"MLSAE.{name}({body});\n"


# ---------------------------------------------------------------------------------------------
# what each latent page holds


def shard_of(latent: int) -> int:
    return latent // PER_SHARD


def _plan(data: BrowserData, j: int) -> dict[str, Any]:
    """The examples latent j's page shows: (seq, pos, layer_pos) keys, deduplicated across its views."""
    L = len(data.layers)
    top = data.examples(j, None)[:TOP_SHOWN]
    groups = data.samples(j)
    p = [float(x) for x in data.p_layer[j]]
    per_layer = [(li, data.examples(j, li)[:LAYER_ROWS]) for li in range(L) if p[li] >= LAYER_MIN_P]
    keys: dict[tuple[int, int, int], int] = {}
    values: dict[tuple[int, int, int], float] = {}

    def ref(e: dict[str, Any]) -> int:
        k = (e["seq"], e["pos"], e["layer_pos"])
        if "value" in e:
            values[k] = e["value"]
        return keys.setdefault(k, len(keys))

    return {
        "top": [ref(e) for e in top],
        "groups": [{**g, "refs": [ref(e) for e in g["examples"]]} for g in groups],
        "layers": [(li, [ref({**e, "layer_pos": li}) for e in rows]) for li, rows in per_layer if rows],
        "keys": list(keys),
        "values": values,
    }


def _latent_record(
    data: BrowserData, j: int, plan: dict[str, Any], ctx: Iterator[tuple[list[int], list[float]]], width: int
) -> dict:
    """Latent j's entry of its shard file (see the viewer for the field names)."""
    mean, var = float(data.mean_layer[j]), float(data.var_layer[j])
    hist = [int(c) for c in data.hist[j]]
    nz = [i for i, c in enumerate(hist) if c > 0]
    top = data.examples(j, None)
    rec: dict[str, Any] = {
        "m": _r(mean),
        "v": _r(var),
        "x": _r(top[0]["value"], 5) if top else None,
        "f": sum(hist),
        "p": [round(float(x), 4) for x in data.p_layer[j]],  # absolute: shares below 5e-5 are 0
        "d": [_r(float(x), 3) for x in data.density[:, j]],
        "h": [nz[0], hist[nz[0] : nz[-1] + 1]] if nz else [0, []],
        "g": None,
    }
    if data.logits is not None:
        ti, tv, bi, bv = data.logits
        rec["g"] = [_b64(ti[j].tolist(), width), [_r(v, 3) for v in tv[j].tolist()]]
        rec["g"] += [_b64(bi[j].tolist(), width), [_r(v, 3) for v in bv[j].tolist()]]
    contexts = []
    wide = set(plan["top"])
    for n, ((seq, pos, layer_pos), (ids, acts)) in enumerate(zip(plan["keys"], ctx)):
        mid = len(ids) // 2
        keep = mid if n in wide else min(mid, SHORT_CONTEXT)
        inside = [i for i, t in enumerate(ids) if t >= 0 and abs(i - mid) <= keep]
        lo, hi = inside[0], inside[-1] + 1
        at = len(ids) // 2 - lo
        value = plan["values"].get((seq, pos, layer_pos), acts[len(ids) // 2])
        nonzero = [  # the example's own value is c[3]
            [i - lo, -1 if math.isnan(a) else _r(a, 3)] for i, a in enumerate(acts[lo:hi], lo) if a != 0 and i != mid
        ]
        tokens = _b64(ids[lo:hi], width)
        contexts.append([seq, pos, layer_pos, _r(value, 5) if math.isfinite(value) else None, at, tokens, nonzero])
    rec["c"] = contexts
    rec["t"] = plan["top"]
    rec["q"] = [[_r(g["lo"]), _r(g["hi"]), _r(g["q_lo"]), _r(g["q_hi"]), g["count"], g["refs"]] for g in plan["groups"]]
    rec["l"] = [[li, refs] for li, refs in plan["layers"]]
    return rec if top else {**rec, "x": None, "c": [], "t": [], "q": [], "l": []}


# ---------------------------------------------------------------------------------------------
# static HTML (readable without JavaScript)


def _doc(title: str, body: str, scripts: list[str] = (), attrs: str = "", depth: int = 0) -> str:
    up = "../" * depth
    tags = "".join(f"<script src='{s}'></script>" for s in scripts)
    return (
        f"<!doctype html><html lang=en><head><meta charset=utf-8><title>{_e(title)}</title>"
        f"<meta name=viewport content='width=device-width'><link rel=stylesheet href='{up}style.css'></head>"
        f"<body{attrs}>{body}{tags}</body></html>\n"
    )


def _static_context(ids: list[int], text: dict[int, str]) -> str:
    """The context around the middle token, which is marked; each side in one bidi-isolated <bdi>."""
    mid = len(ids) // 2
    side = lambda r: "".join(visible(text[ids[i]]) for i in r if ids[i] >= 0)
    left = side(range(max(0, mid - STATIC_CONTEXT), mid))
    right = side(range(mid + 1, min(len(ids), mid + STATIC_CONTEXT + 1)))
    at = text[ids[mid]]
    return f"<bdi>{left}</bdi><mark class=t>{visible(at, chip=not at.strip(' '))}</mark><bdi>{right}</bdi>"


def _static_latent(data: BrowserData, j: int, rec: dict, ctx: list, text: dict[int, str]) -> str:
    """Latent j's rows in a shard page's no-script table: its numbers, then its top examples."""
    head = f"<tr id='{j}'><th colspan=3><a href='#{j}'>Latent {j}</a> "  # index links land here without JS
    if rec["x"] is None:
        return head + "never fired on the tokens streamed (dead there)</th></tr>"
    dens = sum(x or 0 for x in rec["d"]) / len(rec["d"])
    rows = [
        head + f"E[L|J] = {_num(rec['m'])}, Var(L|J) = {_num(rec['v'])}, density {dens:.2e}, max "
        f"{_num(rec['x'], 4)}, P(L|J) by layer <span class=spark>{_e(_spark([x or 0 for x in rec['p']]))}</span>"
        "</th></tr>"
    ]
    for ref in rec["t"][:STATIC_TOP]:
        c = rec["c"][ref]
        rows.append(
            f"<tr><td class=n>{_num(c[3], 4)}</td><td class=n>{data.layers[c[2]]}</td>"
            f"<td class=ctx>{_static_context(ctx[ref][0], text)}</td></tr>"
        )
    return "".join(rows)


def _shard_page(data: BrowserData, k: int, n: int, static: list[str]) -> str:
    first, last = k * PER_SHARD, min(n, (k + 1) * PER_SHARD) - 1
    attrs = (
        f" data-shard={k} data-per={PER_SHARD} data-n={n} data-width={data.summary['context']}"
        f" data-layers='{json.dumps(data.layers)}'"
    )
    body = (
        "<div id=app><noscript><p class=note>JavaScript is off: this page lists every latent of the shard with "
        "its top examples; turn scripts on for the full latent pages (shaded contexts, quantile examples, "
        "histogram, per-layer examples).</p></noscript></div>"
        f"<div id=static><nav><a href='../index.html'>index</a></nav><h1>Latents {first}–{last}</h1>"
        f"<p class=muted>each latent's numbers and its top {STATIC_TOP} examples (value, layer, context)</p><table>"
        + "".join(static)
        + "</table></div>"
    )
    return _doc(
        f"latents {first}-{last}", body, ["../viewer.js", "../data/tokens.js", f"../data/shard-{k}.js"], attrs, 1
    )


def _index_row(r: list) -> str:
    j, mean, var, dens, vmax, spark, toks = r
    return (
        f"<tr><td><a href='latents/{shard_of(j)}.html#{j}'>{j}</a></td><td class=n>{_num(mean)}</td>"
        f"<td class=n>{_num(var)}</td><td class=n>{dens:.2e}</td><td class=n>{_num(vmax)}</td>"
        f"<td class=spark>{_e(spark)}</td><td>{''.join(_chip(t) for t in toks)}</td></tr>"
    )


COLUMNS = [
    ["latent", "latent number"],
    ["E[L|J]", "mean layer position of its activation mass"],
    ["Var(L|J)", "spread of its activation mass over layers"],
    ["density", "fraction of tokens it fires on, mean over layers"],
    ["max", "largest activation"],
    ["P(L|J)", "share of its activation mass at each layer"],
    ["fires most on", "the most frequent activating tokens of its top examples"],
]


def _index_page(data: BrowserData, rows: list[list], page: int, pages: int) -> str:
    s = data.summary
    pager = "<p class=pager>static pages: " + " ".join(
        f"<b>{p + 1}</b>" if p == page else f"<a href='{'index' if p == 0 else f'index-{p + 1}'}.html'>{p + 1}</a>"
        for p in range(pages)
    )
    pager += "</p>"
    first = page * PER_PAGE
    table = (
        "<table><thead><tr>"
        + "".join(f"<th title='{_e(t)}'>{_e(c)}</th>" for c, t in COLUMNS)
        + "</tr></thead><tbody>"
        + "".join(_index_row(r) for r in rows[first : first + PER_PAGE])
        + "</tbody></table>"
    )
    head = (
        f"<h1>Latent browser</h1><p>{s['n_latents']:,} latents (k = {s['k']}) of run <code>{_e(s['run_name'])}</code>, "
        f"layers {data.layers[0]}..{data.layers[-1]} of {_e(s['model'])}; {s['tokens']:,} tokens of cache "
        f"<code>{_e(s['cache_name'])}</code>{' (tuned-lens space)' if s.get('lens') else ''}; top {s['top']} examples "
        f"per latent and per layer, {s.get('samples', 0)} random examples per activation bin, ±{s['context']} tokens "
        "of context.</p>"
    )
    if page > 0:
        return _doc(f"latent browser, page {page + 1}", head + pager + table + pager)
    body = (
        head + "<p class=muted>Search by token (the tokens a latent fires on most) or by latent number; click a "
        "column to sort. E[L|J]: mean layer position of a latent's activation mass, Var(L|J): its spread over "
        "layers, density: fraction of tokens it fires on (mean over layers), max: largest activation; the bars "
        "show P(L|J) over the layers.</p><div id=app><noscript><p class=note>JavaScript is off: below is the "
        f"static table, {PER_PAGE:,} latents per page by number.</p></noscript></div><div id=static>"
        + pager
        + table
        + pager
        + "</div>"
    )
    return _doc("latent browser", body, ["index.js", "data/index.js"])


# ---------------------------------------------------------------------------------------------
# the folder


def write_browser(out_dir: str | Path, data: BrowserData, progress: bool = False) -> dict[str, Any]:
    """Write the browser (see the module doc) into a fresh folder that replaces out_dir/browser when complete:
    a reader sees the old browser or the new one, never a half-written one."""
    from harvest.progress import progress_bar

    out_dir = Path(out_dir)
    final = out_dir / BROWSER_DIR
    F, L = data.p_layer.shape[0], len(data.layers)
    plans = [_plan(data, j) for j in range(F)]
    items = torch.tensor(
        [[s, p, j, lp] for j, plan in enumerate(plans) for s, p, lp in plan["keys"]], dtype=torch.int64
    ).reshape(-1, 4)
    tok_ids, acts = data.contexts(items)  # one pass over the windows every page needs
    used = torch.unique(tok_ids[tok_ids >= 0])
    if data.logits is not None:
        used = torch.unique(torch.cat([used, data.logits[0].reshape(-1), data.logits[2].reshape(-1)]))
    text = data.token_text(used.tolist())
    width = token_width(max(data.vocab_size, int(used.max()) + 1 if len(used) else 1))  # base-64 digits per id
    tmp = fresh_folder(out_dir, f".{BROWSER_DIR}.")
    try:
        for sub in ("latents", "data"):
            (tmp / sub).mkdir()
        rows, at = [], 0
        shards = -(-F // PER_SHARD)
        edges = [_r(float(e)) for e in data.hist_edges]
        with progress_bar("browser", shards, "shards", enabled=progress) as bar:
            for k in range(shards):
                records, static = [], []
                for j in range(k * PER_SHARD, min(F, (k + 1) * PER_SHARD)):
                    n = len(plans[j]["keys"])
                    ctx = list(zip(tok_ids[at : at + n].tolist(), acts[at : at + n].tolist()))
                    at += n
                    rec = _latent_record(data, j, plans[j], iter(ctx), width)
                    records.append(rec)
                    static.append(_static_latent(data, j, rec, ctx, text))
                    counts = Counter(text[ctx[i][0][len(ctx[i][0]) // 2]] for i in rec["t"])
                    dens = float(data.density[:, j].sum()) / L
                    rows.append(
                        [j, rec["m"], rec["v"], _r(dens, 3), rec["x"], _spark([x or 0 for x in rec["p"]])]
                        + [[t for t, _ in counts.most_common(TOP_TOKENS)]]
                    )
                shard = {
                    "first": k * PER_SHARD,
                    "edges": edges,
                    "quantiles": data.summary.get("quantiles", 5),
                    "top": data.summary["top"],
                    "layer_rows": LAYER_ROWS,
                    "layer_min_p": LAYER_MIN_P,
                    "logits_note": data.logits_note,
                    "latents": records,
                }
                atomic_write_text(tmp / "data" / f"shard-{k}.js", _js("shard", k, shard))
                atomic_write_text(tmp / "latents" / f"{k}.html", _shard_page(data, k, F, static))
                bar.advance(1)
        atomic_write_text(
            tmp / "data" / "tokens.js", _js("tokens", {"w": width, "t": {str(i): t for i, t in text.items()}})
        )
        index = {"columns": COLUMNS, "per_shard": PER_SHARD, "layers": data.layers, "rows": rows}
        atomic_write_text(tmp / "data" / "index.js", _js("index", index))
        pages = -(-F // PER_PAGE)
        for p in range(pages):
            atomic_write_text(
                tmp / ("index.html" if p == 0 else f"index-{p + 1}.html"), _index_page(data, rows, p, pages)
            )
        atomic_write_text(tmp / "style.css", CSS)
        atomic_write_text(tmp / "index.js", INDEX_JS)
        atomic_write_text(tmp / "viewer.js", VIEWER_JS)
        old = out_dir / f".{BROWSER_DIR}.old-{os.getpid()}"
        if final.exists():
            os.rename(final, old)
        os.rename(tmp, final)
        fsync_dir(out_dir)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {"index": f"{BROWSER_DIR}/index.html", "shards": shards, "latents": F}
