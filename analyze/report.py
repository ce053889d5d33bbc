"""One self-contained HTML report from the JSON files and PNGs that the analyses wrote into a folder.

No external assets: figures are embedded as base64 data URIs and the CSS is inline, so the file can be
mailed or attached as is. The other analyses' JSON layouts are read defensively: known headline
numbers are picked out where present (by key name), and every section also shows its whole JSON as
tables, so a renamed or new key is never lost, only shown generically.
"""

from __future__ import annotations

import base64
import html
import json
import math
import os
import time
from pathlib import Path
from typing import Any, Callable, Iterable

from train.record import RunError, read_record

REPORT_HTML = "report.html"

# name -> (json file, title, figure-name prefixes claimed by the section)
KNOWN = {
    "variance": (
        "variance.json",
        "Latents over layers: distributions and variance ratios",
        ("variance", "layer_distribution", "layer_dist", "mean_layer", "heatmap", "hist"),
    ),
    "reconstruction": (
        "reconstruction.json",
        "Reconstruction: FVU per layer, layer x layer matrix",
        ("reconstruction", "fvu", "matrix"),
    ),
    "delta_ce": ("delta_ce.json", "Downstream loss: delta CE and KL per layer", ("delta_ce", "delta-ce", "kl")),
    "resid": ("resid.json", "Residual-stream geometry", ("resid",)),
    "prompt": ("prompt.json", "One prompt: which latents fire at which layers", ("prompt",)),
}

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
# collecting what an output folder holds


def _load_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        return {"error": f"could not read {path.name}: {e}"}
    return data if isinstance(data, dict) else {"value": data}


def _png_names(obj: Any) -> list[str]:
    """Every string ending in .png anywhere in a JSON value (figures the analysis says it wrote)."""
    if isinstance(obj, str):
        return [Path(obj).name] if obj.lower().endswith(".png") else []
    if isinstance(obj, dict):
        return [n for v in obj.values() for n in _png_names(v)]
    if isinstance(obj, list):
        return [n for v in obj for n in _png_names(v)]
    return []


def collect_sections(folder: str | Path) -> dict[str, dict[str, Any]]:
    """{name: {"title", "data", "figures", "source"}} for each known JSON in `folder`; PNGs go to the
    section whose JSON names them, else whose prefix they carry, else to a final "other figures"."""
    folder = Path(folder)
    pngs = sorted(folder.glob("*.png"))
    claimed: set[Path] = set()
    sections: dict[str, dict[str, Any]] = {}
    for name, (file, title, _) in KNOWN.items():
        if (folder / file).is_file():
            data = _load_json(folder / file)
            figs = [folder / n for n in dict.fromkeys(_png_names(data)) if (folder / n).is_file()]
            claimed |= set(figs)
            sections[name] = {"title": title, "data": data, "figures": figs, "source": file}
    for name, (_file, title, prefixes) in KNOWN.items():
        mine = [p for p in pngs if p not in claimed and p.stem.lower().startswith(prefixes)]
        if mine:
            sec = sections.setdefault(name, {"title": title, "data": None, "figures": [], "source": None})
            sec["figures"] += mine
            claimed |= set(mine)
    rest = [p for p in pngs if p not in claimed]
    if rest:
        sections["other"] = {"title": "Other figures", "data": None, "figures": rest, "source": None}
    return sections


def _normalize(name: str, value: Any) -> dict[str, Any]:
    """A section given as a JSON path, a spec dict ({"data": ..., "figures": [...], "title": ...}) or
    the JSON data itself."""
    default_title = KNOWN.get(name, (None, name.replace("_", " ").capitalize()))[1]
    if isinstance(value, (str, Path)):
        p = Path(value)
        data = _load_json(p)
        figs = [p.parent / n for n in dict.fromkeys(_png_names(data)) if (p.parent / n).is_file()]
        return {"title": default_title, "data": data, "figures": figs, "source": p.name}
    if isinstance(value, dict) and "data" in value and set(value) <= {"data", "figures", "title", "source", "note"}:
        data = value["data"]
        if isinstance(data, (str, Path)):
            data = _load_json(Path(data))
        return {
            "title": value.get("title") or default_title,
            "data": data,
            "figures": [Path(f) for f in value.get("figures") or []],
            "source": value.get("source"),
            "note": value.get("note"),
        }
    return {"title": default_title, "data": value, "figures": [], "source": None}


# ---------------------------------------------------------------------------------------------
# provenance: the runs and the cache behind the numbers


def _candidate_paths(obj: Any, keys: tuple[str, ...]) -> list[str]:
    out: list[str] = []
    if isinstance(obj, dict):
        for k, v in obj.items():
            if k in keys and isinstance(v, str):
                out.append(v)
            elif k in keys and isinstance(v, list):
                out += [x for x in v if isinstance(x, str)] + _candidate_paths(
                    [x for x in v if not isinstance(x, str)], keys
                )
            else:
                out += _candidate_paths(v, keys)
    elif isinstance(obj, list):
        for v in obj:
            out += _candidate_paths(v, keys)
    return out


def provenance(
    sae_dirs: Iterable[str | Path] = (),
    cache: str | Path | None = None,
    sections: dict[str, dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Runs (config.json + summary.json) and cache (metadata) behind a report. Without explicit
    arguments, the SAE folders and cache paths named inside the sections' JSON are used."""
    datas = [s.get("data") for s in (sections or {}).values()]
    given = [str(p) for p in sae_dirs]
    runs = given or _candidate_paths(datas, ("sae", "sae_dir", "saes", "runs", "run"))
    out: dict[str, Any] = {"runs": [], "cache": None}
    caches = [str(cache)] if cache else []
    for r in dict.fromkeys(runs):
        try:
            rec = read_record(r)
        except RunError:
            if r in given:
                raise
            rec = None  # a path found inside some JSON that is not (or no longer) a run folder
        if rec is None:
            continue
        summ = rec.summary() or {}
        held = summ.get("held_out") or {}
        out["runs"].append(
            {
                "folder": str(rec.dir),
                "layers": rec.layers,
                "n_latents": rec.sae.n_latents,
                "k": rec.sae.k,
                "steps": rec.steps,
                "tokens": summ.get("tokens"),
                "held_out": rec.heldout.describe(),
                "special_tokens": rec.special_tokens,
                "held_out_fvu_mean": held.get("fvu_mean"),
                "held_out_fvu": held.get("fvu"),
                "held_out_layers": held.get("layers"),
            }
        )
        if not caches:
            caches.append(rec.cache.path)
    caches += _candidate_paths(datas, ("cache",))
    for c in dict.fromkeys(caches):
        try:
            from harvest import open_cache

            cm = open_cache(c)
        except Exception:  # a moved or foreign cache: provenance is best effort, the numbers still show
            continue
        m = cm.meta
        out["cache"] = {
            "path": str(cm.path),
            "model": (m.get("model") or {}).get("name"),
            "dataset": (m.get("spec") or {}).get("dataset"),
            "tokens": cm.layout.n_tokens,
            "context": cm.layout.context,
            "layers": list(cm.layers),
            "d_model": cm.layout.d_model,
            "dtype": cm.layout.dtype,
            "hook": (m.get("spec") or {}).get("hook"),
            "prepend_bos": (m.get("tokenizer") or {}).get("prepend_bos"),
            "lens": (m.get("lens") or {}).get("source", "none"),
            "fingerprint": str(m.get("fingerprint", ""))[:16],
            "created": m.get("created"),
        }
        break
    return out


# ---------------------------------------------------------------------------------------------
# finding numbers in JSON written by other modules


def flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}; lists stay values."""
    if not isinstance(obj, dict):
        return {prefix or "value": obj}
    out: dict[str, Any] = {}
    for k, v in obj.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, dict) and v:
            out.update(flatten(v, key))
        else:
            out[key] = v
    return out


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def pick(
    data: Any,
    names: Iterable[str] = (),
    pred: Callable[[str], bool] | None = None,
    kind: Callable[[Any], bool] = _is_num,
) -> tuple[str, Any] | None:
    """The first (key, value) of the flattened data whose last key part is one of `names`
    (case-insensitive), else whose full key satisfies `pred`; only values passing `kind`. Keys under
    a "reference" branch (the reference code's improper formulas) are never picked."""
    if not isinstance(data, dict):
        return None
    flat = {k: v for k, v in flatten(data).items() if "reference" not in k.lower() and kind(v)}
    wanted = [n.lower() for n in names]
    for n in wanted:
        for k, v in flat.items():
            if k.lower().rsplit(".", 1)[-1] == n:
                return k, v
    if pred is not None:
        for k, v in flat.items():
            if pred(k.lower()):
                return k, v
    return None


def _num_list(v: Any) -> bool:
    return isinstance(v, list) and bool(v) and all(_is_num(x) for x in v)


# The names the analyses write (analyze/layers.py, reconstruction.py, delta_ce.py, geometry.py, prompt.py)
# come first; the fuzzy predicates only catch renamed keys.
RATIO_LATENT = (("ratio_latent",), lambda k: "ratio" in k and "latent" in k)
RATIO_TOKEN = (("ratio_token",), lambda k: "ratio" in k and ("token" in k or "jt" in k))
MULTI_TOKEN = (("per_token_pooled",), lambda k: "multi" in k and "token" in k and "pool" in k)
MULTI_AGG = (("aggregated",), lambda k: "multi" in k and "aggreg" in k)
DCE_MEAN = (("delta_ce_mean",), lambda k: "delta" in k and "ce" in k and "mean" in k)

# headline numbers per section: (label, names, fuzzy predicate)
HEADLINES: dict[str, list[tuple[str, tuple[str, ...], Callable[[str], bool] | None]]] = {
    "variance": [
        ("tokens", ("tokens",), None),
        ("E[Var(L|J)] / Var(L)", *RATIO_LATENT),
        ("E[Var(L|J,T)] / E[Var(L|J)]", *RATIO_TOKEN),
        ("latents active at >= 2 layers: per token (pooled)", *MULTI_TOKEN),
        ("latents active at >= 2 layers: aggregated over tokens", *MULTI_AGG),
    ],
    "reconstruction": [
        ("held-out tokens", ("tokens",), None),
        ("MLSAE FVU / diagonal single-layer FVU (mean over layers)", ("mlsae_over_diagonal_mean",), None),
        ("layers where the MLSAE beats the best off-diagonal SAE", ("mlsae_beats_off_diagonal",), None),
        ("layers compared off-diagonal", ("off_diagonal_compared",), None),
    ],
    "delta_ce": [
        ("mean delta CE (nats)", *DCE_MEAN),
        ("mean KL (nats)", ("kl_mean",), lambda k: "kl" in k and "mean" in k),
        ("clean CE (nats)", ("clean_ce",), lambda k: "clean" in k and "ce" in k),
        ("predictions", ("tokens",), None),
    ],
    "resid": [
        ("tokens", ("tokens",), None),
        ("norm growth (last / first layer)", ("norm_growth",), None),
        ("MMCS of the decoder", ("mmcs",), None),
    ],
    "prompt": [
        ("tokens used (special excluded)", ("n_tokens_used",), None),
        ("latents active at >= 2 layers: per token (pooled)", *MULTI_TOKEN),
        ("latents active at >= 2 layers: aggregated over the prompt", *MULTI_AGG),
        ("E[Var(L|J,T)] / E[Var(L|J)] (this prompt)", *RATIO_TOKEN),
    ],
}


def headlines(name: str, data: Any) -> list[tuple[str, str, Any]]:
    """[(label, key found, value)] for a section's known headline numbers that are present."""
    out = []
    for label, names, pred in HEADLINES.get(name, []):
        hit = pick(data, names, pred)
        if hit:
            out.append((label, hit[0], hit[1]))
    for r in _recon_runs(data) if name == "reconstruction" else []:
        if _is_num((r.get("held_out") or {}).get("fvu_mean")):
            out.append(
                (
                    f"held-out mean FVU of {r.get('label', r.get('run'))}",
                    "runs[].held_out.fvu_mean",
                    r["held_out"]["fvu_mean"],
                )
            )
    return out


def _recon_runs(data: Any) -> list[dict[str, Any]]:
    runs = data.get("runs") if isinstance(data, dict) else None
    return [r for r in runs if isinstance(r, dict)] if isinstance(runs, list) else []


# ---------------------------------------------------------------------------------------------
# claims of the poster next to our numbers


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


def claims(sections: dict[str, dict[str, Any]], prov: dict[str, Any]) -> list[dict[str, str]]:
    """Rows (claim, poster, ours, verdict) for every claim whose numbers are available. Verdicts use
    stated thresholds; 'reported' where the poster's number belongs to another model and scale."""
    data = {n: s.get("data") or {} for n, s in sections.items()}
    rows: list[dict[str, str]] = []

    def row(claim: str, poster: str, ours: str, verdict: str) -> None:
        rows.append({"claim": claim, "poster": poster, "ours": ours, "verdict": verdict})

    # 1. faithfulness: MLSAE mean FVU; MLSAE vs single-layer SAEs on and off their own layer
    runs = prov.get("runs") or []
    recon = data.get("reconstruction") or {}
    ml_recon = [
        r for r in _recon_runs(recon) if r.get("multi_layer") and _is_num((r.get("held_out") or {}).get("fvu_mean"))
    ]
    ml = [
        r
        for r in runs
        if isinstance(r.get("layers"), list) and len(r["layers"]) > 1 and _is_num(r.get("held_out_fvu_mean"))
    ]
    ours_fvu = ml_recon[0]["held_out"]["fvu_mean"] if ml_recon else (ml[0]["held_out_fvu_mean"] if ml else None)
    if ours_fvu is not None:
        row(
            "A multi-layer SAE reconstructs well (held-out mean FVU over layers)",
            "0.081-0.106 (Pythia 70m-1b, R=64, k=32)",
            f"{ours_fvu:.4g}",
            "reported (model and scale differ)",
        )
    comp = (recon.get("comparison") or {}).get("fvu") if isinstance(recon.get("comparison"), dict) else None
    comp = comp if isinstance(comp, dict) else {}
    ratio = comp.get("mlsae_over_diagonal_mean")
    if not _is_num(ratio):  # fall back on the runs' own summaries: MLSAE vs single-layer SAE at that layer
        singles = [
            r for r in runs if isinstance(r.get("layers"), list) and len(r["layers"]) == 1 and r.get("held_out_fvu")
        ]
        if ml and singles and ml[0].get("held_out_fvu") and ml[0].get("held_out_layers"):
            m_layers, m_fvu = ml[0]["held_out_layers"], ml[0]["held_out_fvu"]
            ratios = [
                m_fvu[m_layers.index(r["layers"][0])] / r["held_out_fvu"][0]
                for r in singles
                if r["layers"][0] in m_layers and r["held_out_fvu"][0]
            ]
            ratio = _mean(ratios) if ratios else None
    if _is_num(ratio):
        row(
            "MLSAE ~ single-layer SAE on that SAE's own layer (diagonal)",
            "similar (70m, 160m)",
            f"MLSAE FVU / single-layer FVU = {ratio:.3g} (mean over layers)",
            "supported (ratio <= 1.25)" if ratio <= 1.25 else "not supported (ratio > 1.25)",
        )
    beats, compared = comp.get("mlsae_beats_off_diagonal"), comp.get("off_diagonal_compared")
    if _is_num(beats) and _is_num(compared) and compared > 0:
        row(
            "MLSAE better than single-layer SAEs on the other layers (off-diagonal)",
            "better (70m, 160m)",
            f"beats the best off-diagonal SAE at {beats}/{compared} layers",
            "supported" if beats == compared else ("partly" if beats > 0 else "not supported"),
        )
    dce = pick(data.get("delta_ce"), *DCE_MEAN)
    if dce:
        row(
            "Splicing in reconstructions costs little loss (mean delta CE)",
            "0.40-0.57 nats (Pythia)",
            f"{dce[1]:.4g} nats",
            "reported (model and scale differ)",
        )

    # 2. latents shared between layers across tokens, not within one token
    for src, label in (("variance", "over the cache's tokens"), ("prompt", "one prompt")):
        r2 = pick(data.get(src), *RATIO_TOKEN)
        if r2:
            v = r2[1]
            verdict = "supported (< 0.1)" if v < 0.1 else ("partly: below 1, not 10x" if v < 1 else "not supported")
            row(
                f"The layer index varies >10x less within a token: E[Var(L|J,T)]/E[Var(L|J)] ({label})",
                "<< 1 (more than an order of magnitude)",
                f"{v:.4g}",
                verdict,
            )
        pt, ag = pick(data.get(src), *MULTI_TOKEN), pick(data.get(src), *MULTI_AGG)
        if pt and ag:
            row(
                f"Most latents fire at several layers over many tokens, fewer at one token ({label})",
                "aggregated: most; per token: fewer",
                f"aggregated {ag[1]:.3f} vs per token {pt[1]:.3f}",
                ("supported" if ag[1] > 0.5 else "partly (aggregated <= 0.5)") if ag[1] > pt[1] else "not supported",
            )

    # 3. residual geometry
    res = data.get("resid") or {}
    cos = res.get("cosine_centered")
    if _num_list(cos):
        row(
            "Adjacent layers' residuals are similar (cosine of layer-mean-centered vectors)",
            "high, rising with model size",
            f"mean {_mean(cos):.3f}, min {min(cos):.3f} over {len(cos)} pairs",
            "supported (mean > 0.5)" if _mean(cos) > 0.5 else "weak (mean <= 0.5)",
        )
    norm = res.get("norm_mean")
    if _num_list(norm) and len(norm) > 1:
        ups = sum(b > a for a, b in zip(norm, norm[1:]))
        row(
            "Residual norm grows with depth",
            "grows (roughly exponentially)",
            f"x{norm[-1] / norm[0]:.3g} first to last layer; rises at {ups}/{len(norm) - 1} steps",
            "supported" if norm[-1] > norm[0] and ups >= (len(norm) - 1) / 2 else "not supported",
        )
    return rows


# ---------------------------------------------------------------------------------------------
# HTML


def _e(x: Any) -> str:
    return html.escape(str(x))


def _fmt(v: Any) -> str:
    if isinstance(v, bool) or v is None:
        return _e(v)
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        if not math.isfinite(v):
            return _e(v)
        return f"{v:.4g}" if v == 0 or 1e-3 <= abs(v) < 1e5 else f"{v:.3e}"
    return _e(v)


def _cell(v: Any, max_items: int = 24) -> str:
    if _num_list(v):
        shown = ", ".join(_fmt(x) for x in v[:max_items])
        return f"[{shown}{', …' if len(v) > max_items else ''}] <span class=muted>({len(v)})</span>"
    if isinstance(v, dict):  # nested records: their scalars and short numeric lists, compactly
        items = [f"{_e(k)}: {_cell(x, 8)}" for k, x in v.items() if not isinstance(x, (dict, list)) or _num_list(x)]
        return "<br>".join(items[:12]) + (" …" if len(items) > 12 else "")
    if isinstance(v, list):
        s = json.dumps(v)
        return _e(s if len(s) <= 300 else s[:300] + " …")
    return _fmt(v)


def _table(header: list[str], rows: list[list[str]], num_cols: set[int] = frozenset()) -> str:
    h = "".join(f"<th>{_e(c)}</th>" for c in header)
    body = "".join(
        "<tr>" + "".join(f"<td{' class=n' if i in num_cols else ''}>{c}</td>" for i, c in enumerate(r)) + "</tr>"
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


NOT_PER_LAYER = ("chunks", "windows", "positions")  # index lists that may happen to be as long as `layers`


def _per_layer(flat: dict[str, Any]) -> tuple[str, set[str]]:
    """A table of every numeric list as long as the section's layer list, and one of the lists over
    adjacent layer pairs when the section has "pairs" (resid.json)."""
    lk = next((k for k, v in flat.items() if k.rsplit(".", 1)[-1] == "layers" and _num_list(v)), None)
    if lk is None:
        return "", set()
    layers = flat[lk]
    ok = lambda k, n: (
        k != lk and _num_list(flat[k]) and len(flat[k]) == n and not any(w in k.lower() for w in NOT_PER_LAYER)
    )
    cols = [k for k in flat if ok(k, len(layers))]
    pairs = [k for k in flat if k.rsplit(".", 1)[-1] == "pairs"]
    pcols = [k for k in flat if pairs and len(layers) > 2 and ok(k, len(layers) - 1)]
    out = ""
    if cols:
        rows = [[_fmt(l)] + [_fmt(flat[c][i]) for c in cols] for i, l in enumerate(layers)]
        out += _table(["layer", *cols], rows, set(range(len(cols) + 1)))
    if pcols:
        rows = [
            [f"{_fmt(a)} → {_fmt(b)}"] + [_fmt(flat[c][i]) for c in pcols]
            for i, (a, b) in enumerate(zip(layers, layers[1:]))
        ]
        out += _table(["layers", *pcols], rows, set(range(1, len(pcols) + 1)))
    return out, {lk, *cols, *pcols, *(pairs if pcols else [])}


def _matrix(key: str, v: Any, rows: Any = None, cols: Any = None) -> str | None:
    """A small numeric matrix as a table; labelled by `rows` / `cols` when those lists fit its shape."""
    if not (
        isinstance(v, list)
        and 1 < len(v) <= 64
        and all(_num_list(r) and len(r) == len(v[0]) for r in v)
        and len(v[0]) <= 64
    ):
        return None
    rows = rows if isinstance(rows, list) and len(rows) == len(v) else list(range(len(v)))
    cols = cols if isinstance(cols, list) and len(cols) == len(v[0]) else list(range(len(v[0])))
    body = [[_e(r)] + [_fmt(x) for x in row] for r, row in zip(rows, v)]
    return f"<h3>{_e(key)}</h3>" + _table(["", *map(str, cols)], body, set(range(1, len(cols) + 1)))


def _records(key: str, v: Any, max_rows: int = 200) -> str | None:
    if isinstance(v, list) and v and all(isinstance(r, dict) for r in v):
        cols = list(dict.fromkeys(c for r in v[:max_rows] for c in r))
        rows = [[_cell(r.get(c, "")) for c in cols] for r in v[:max_rows]]
        more = f"<p class=muted>{len(v) - max_rows} more rows in the JSON</p>" if len(v) > max_rows else ""
        return f"<h3>{_e(key)}</h3>" + _table(cols, rows) + more
    return None


def _prompt_tokens(data: dict[str, Any]) -> str:
    toks = data.get("tokens")
    if not isinstance(toks, list) or not all(isinstance(t, dict) for t in toks):
        return ""
    rows = []
    for t in toks:
        top = "; ".join(
            f"{d.get('latent')} @ layers {d.get('layers')}" for d in (t.get("top") or []) if isinstance(d, dict)
        )
        name = f"<code>{_e(repr(str(t.get('text', '')))[1:-1])}</code>" + (
            " <span class=muted>(special, excluded)</span>" if t.get("special") else ""
        )
        rows.append([_fmt(t.get("pos")), name, _fmt(t.get("n_active")), _fmt(t.get("n_multi")), _e(top)])
    text = f"<p>Prompt: <code>{_e(data.get('text', ''))}</code></p>" if data.get("text") else ""
    return text + _table(
        ["#", "token", "active latents", "at >= 2 layers", "top latents and their layers"], rows, {0, 2, 3}
    )


def _section_html(name: str, sec: dict[str, Any]) -> str:
    parts = [f"<h2 id={_e(name)}>{_e(sec['title'])}</h2>"]
    if sec.get("source"):
        parts.append(f"<p class=muted>from {_e(sec['source'])}</p>")
    if sec.get("note"):
        parts.append(f"<p>{_e(sec['note'])}</p>")
    data = sec.get("data")
    if isinstance(data, dict):
        hl = headlines(name, data)
        if hl:
            parts.append(
                _table(["headline", "value", "key"], [[_e(l), _fmt(v), f"<code>{_e(k)}</code>"] for l, k, v in hl], {1})
            )
    parts += [_img(Path(f)) for f in sec.get("figures") or []]
    if isinstance(data, dict):
        body = {k: v for k, v in data.items() if k not in ("definitions", "figures")}
        if name == "prompt":
            parts.append(_prompt_tokens(data))
            body.pop("tokens", None)
            body.pop("latents", None)  # long per-latent lists: in the JSON and the heatmap
        flat = flatten(body)
        per_layer, used = _per_layer(flat)
        if per_layer:
            parts.append("<h3>Per layer</h3>" + per_layer)
        kv = []
        for k, v in flat.items():
            if k in used:
                continue
            block = _matrix(k, v, data.get("rows"), data.get("layers")) or _records(k, v)
            if block:
                parts.append(block)
            else:
                kv.append([f"<code>{_e(k)}</code>", _cell(v)])
        if kv:
            parts.append("<h3>All values</h3>" + _table(["key", "value"], kv))
        if isinstance(data.get("definitions"), dict):
            rows = [[f"<code>{_e(k)}</code>", _e(v)] for k, v in data["definitions"].items()]
            parts.append(
                "<details><summary>Definitions</summary>" + _table(["quantity", "definition"], rows) + "</details>"
            )
    return "\n".join(parts)


def _provenance_html(prov: dict[str, Any]) -> str:
    parts = []
    c = prov.get("cache")
    if c:
        parts.append("<h3>Cache</h3>" + _table(["field", "value"], [[_e(k), _cell(v)] for k, v in c.items()]))
    runs = prov.get("runs") or []
    if runs:
        cols = ["folder", "layers", "n_latents", "k", "steps", "tokens", "held_out_fvu_mean"]
        parts.append("<h3>SAE runs</h3>" + _table(cols, [[_cell(r.get(k)) for k in cols] for r in runs]))
    return "<h2 id=provenance>Provenance</h2>" + (
        "\n".join(parts) or "<p class=muted>no run or cache metadata found</p>"
    )


def _verdict_class(v: str) -> str:
    return "ok" if v.startswith("supported") else "no" if v.startswith("not") else "meh"


def write_report(
    out_html: str | Path,
    sections: dict[str, Any],
    title: str | None = None,
    prov: dict[str, Any] | None = None,
    links: Iterable[tuple[str, str]] = (),
) -> Path:
    """Write ONE self-contained HTML file. `sections`: {name: JSON path | {"data", "figures", "title"} |
    JSON data}; names in KNOWN get their headline numbers and claims. `prov`: from `provenance()`
    (derived from the sections' JSON when None). `links`: (text, relative href) shown under the title
    (the latent browser of `analyze examples`)."""
    secs = {n: _normalize(n, v) for n, v in sections.items()}
    prov = prov if prov is not None else provenance(sections=secs)
    model = (prov.get("cache") or {}).get("model")
    model = Path(model).name if model and ("/" in model and Path(model).exists()) else model  # a folder: its name
    title = title or f"Multi-layer SAE analysis{f': {model}' if model else ''}"
    rows = claims(secs, prov)
    claims_html = "<h2 id=claims>Claims checked</h2>" + (
        _table(
            ["claim (Lawson et al. 2024 poster)", "poster", "ours", "verdict"],
            [
                [
                    _e(r["claim"]),
                    _e(r["poster"]),
                    _e(r["ours"]),
                    f"<span class={_verdict_class(r['verdict'])}>{_e(r['verdict'])}</span>",
                ]
                for r in rows
            ],
        )
        if rows
        else "<p class=muted>no analysis with the numbers for a claim was found</p>"
    )
    toc = " · ".join(f"<a href='#{_e(n)}'>{_e(s['title'])}</a>" for n, s in secs.items())
    doc = (
        f"<!doctype html><html lang=en><head><meta charset=utf-8><title>{_e(title)}</title><style>{CSS}</style>"
        f"</head><body><h1>{_e(title)}</h1><p class=muted>generated {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}"
        f" · reproduces Lawson et al., Residual Stream Analysis with Multi-Layer SAEs (arXiv 2409.04185)</p>"
        f"<p>{toc}</p>"
        + "".join(f"<p><b><a href='{_e(href)}'>{_e(text)}</a></b></p>" for text, href in links)
        + f"{claims_html}{_provenance_html(prov)}"
        + "".join(_section_html(n, s) for n, s in secs.items())
        + "</body></html>"
    )
    out = Path(out_html)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(doc, encoding="utf-8")
    return out


def report_folder(
    folder: str | Path,
    out_html: str | Path | None = None,
    sae_dirs: Iterable[str | Path] = (),
    cache: str | Path | None = None,
    title: str | None = None,
) -> Path:
    """collect_sections + provenance + write_report: <folder>/report.html by default; links the latent
    browser of `analyze examples` found in <folder>/latents or <first run>/latents."""
    sae_dirs = list(sae_dirs)
    secs = collect_sections(folder)
    prov = provenance(sae_dirs, cache, secs)
    out = Path(out_html or Path(folder) / REPORT_HTML)
    found = [Path(d) / "latents" / "browser" / "index.html" for d in [folder, *sae_dirs[:1]]]
    links = [
        ("Latent browser: every latent's top examples, P(L|J), logits", os.path.relpath(p, out.parent))
        for p in found
        if p.is_file()
    ][:1]
    return write_report(out, secs, title, prov, links)
