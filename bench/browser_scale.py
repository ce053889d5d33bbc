"""Latent-browser scale benchmark, run by hand: prints numbers, asserts nothing (not part of the test suite).

    python bench/browser_scale.py [--latents 16384] [--layers 18] [--vocab 262144] [--out /tmp/bench-browser]
                                  [--chromium chromium]

Writes the browser of a synthetic `analyze examples` result shaped like a real MLSAE's (Gemma's vocabulary
size, 1,024-token windows, every latent firing over a few adjacent layers, top 32 per latent and per layer,
3 random samples per activation bin) with analyze.browser.write_browser, the code `analyze examples` runs,
and prints its size, its file count, the largest file and the write time; with a chromium on the PATH,
the time headless Chromium takes to load the index and a latent page until their script has rendered
(`--dump-dom`, whole process, from file://: an upper bound on what a reader waits).
"""

from __future__ import annotations

import sys
from pathlib import Path

_BENCH_DIR = Path(__file__).resolve().parent  # keep bench/harvest.py from shadowing the harvest package
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _BENCH_DIR]
sys.path.insert(0, str(_BENCH_DIR.parent))

import argparse  # noqa: E402
import math  # noqa: E402
import re  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402

from analyze.browser import BrowserData, shard_of, write_browser  # noqa: E402
from analyze.examples import hist_edges  # noqa: E402


def synthetic(F: int, L: int, vocab: int, windows: int = 1000, context: int = 1024, top: int = 32) -> BrowserData:
    g = torch.Generator().manual_seed(0)
    # Zipf-like token ids, so that the token table holds about as many distinct tokens as a real corpus's
    ranks = torch.rand(windows, context, generator=g).pow(3.0).mul(vocab).long().clamp_(max=vocab - 1)
    tokens = ranks
    centre = torch.rand(F, generator=g) * (L - 1)
    spread = 0.4 + torch.rand(F, generator=g) * 1.6
    li = torch.arange(L).float()
    p = torch.exp(-((li - centre[:, None]) ** 2) / (2 * spread[:, None] ** 2))
    p = p / p.sum(1, keepdim=True)
    mean = (p * li).sum(1)
    var = (p * li**2).sum(1) - mean**2
    base = 10 ** (-4 + 2.5 * torch.rand(F, generator=g))
    density = (base[:, None] * p * L).T.contiguous()  # [L, F]
    n_tokens = windows * context
    edges = hist_edges()
    B = len(edges)
    scale = 0.5 + 4 * torch.rand(F, generator=g)
    logc = torch.log10(edges)[None, :] - torch.log10(scale)[:, None]
    hist = (torch.exp(-(logc**2) / 0.08) * (density.sum(0) * n_tokens)[:, None] / 5).round().long()
    vmax = scale * 2.2

    def examples(j: int, layer: int | None) -> list[dict]:
        r = torch.Generator().manual_seed(j * 97 + (layer if layer is not None else L))
        vals = (vmax[j] * torch.linspace(1, 0.6, top)).tolist()
        seqs = torch.randint(windows, (top,), generator=r).tolist()
        poss = torch.randint(context, (top,), generator=r).tolist()
        lays = torch.multinomial(p[j], top, replacement=True, generator=r).tolist()
        if layer is not None:  # a token's best layer holds it in its per-layer list too
            over = [e for e in examples(j, None) if e["layer_pos"] == layer]
            rest = [
                {"value": v * p[j, layer].item() ** 0.3, "seq": s, "pos": q, "layer_pos": layer}
                for v, s, q in zip(vals, seqs, poss)
            ]
            return (over + rest)[:top]
        return [{"value": v, "seq": s, "pos": q, "layer_pos": lp} for v, s, q, lp in zip(vals, seqs, poss, lays)]

    def samples(j: int) -> list[dict]:
        r = torch.Generator().manual_seed(10**6 + j)
        counts = hist[j]
        total = int(counts.sum())
        out, above = [], 0
        nz = counts.nonzero().squeeze(1).tolist()[::-1]
        if not nz:
            return []
        per = max(1, math.ceil(len(nz) / 5))
        for s in range(0, len(nz), per):
            run = nz[s : s + per]
            n = int(counts[run].sum())
            ex = [
                {"seq": int(a), "pos": int(b), "layer_pos": int(c)}
                for a, b, c in zip(
                    torch.randint(windows, (3,), generator=r),
                    torch.randint(context, (3,), generator=r),
                    torch.multinomial(p[j], 3, replacement=True, generator=r),
                )
            ]
            hi = edges[run[0] + 1].item() if run[0] + 1 < B else math.inf
            out.append({"lo": edges[run[-1]].item(), "hi": hi, "q_lo": above / total, "q_hi": (above + n) / total,
                        "count": n, "examples": ex})  # fmt: skip
            above += n
        return out

    def contexts(items: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        w = 12
        seq, pos = items[:, 0], items[:, 1]
        q = pos[:, None] + torch.arange(-w, w + 1)
        inside = (q >= 0) & (q < context)
        ids = torch.where(inside, tokens[seq[:, None], q.clamp(0, context - 1)], -1)
        r = torch.Generator().manual_seed(1)
        acts = torch.where(torch.rand(ids.shape, generator=r) < 0.06, torch.rand(ids.shape, generator=r) * 2, 0.0)
        acts[:, w] = 1.0 + torch.rand(len(items), generator=r)
        return ids, torch.where(inside, acts, 0.0)

    words = ["the", " of", " and", "ing", " über", " 東京", "\n", " Washington", "ción", " (", "ly", " 123"]

    def token_text(ids: list[int]) -> dict[int, str]:
        return {i: words[i % len(words)] + ("" if i < 5000 else str(i % 97)) for i in ids}

    lg = torch.Generator().manual_seed(2)
    logits = (
        torch.randint(vocab, (F, 10), generator=lg),
        torch.rand(F, 10, generator=lg).sort(1, descending=True).values * 5,
        torch.randint(vocab, (F, 10), generator=lg),
        -torch.rand(F, 10, generator=lg).sort(1, descending=True).values * 5,
    )
    summary = {"n_latents": F, "k": 64, "run_name": "synthetic", "model": "google/gemma-3-270m", "tokens": n_tokens,
               "cache_name": "synthetic", "top": top, "samples": 3, "context": 12, "quantiles": 5}  # fmt: skip
    return BrowserData(
        summary=summary, layers=list(range(L)), p_layer=p, mean_layer=mean, var_layer=var, density=density,
        hist=hist, hist_edges=edges, examples=examples, samples=samples, contexts=contexts,
        token_text=token_text, vocab_size=vocab, logits=logits, logits_note="synthetic logits",
    )  # fmt: skip


def load_time(chromium: str, url: str, marker: str) -> tuple[float, float]:
    """(seconds from navigation start until the page's script had rendered it, as the page measured it
    (performance.now(), written into data-ms); seconds of the whole headless Chromium process)."""
    t0 = time.perf_counter()
    out = subprocess.run(
        [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--dump-dom", url],
        capture_output=True, text=True, timeout=120,
    ).stdout  # fmt: skip
    dt = time.perf_counter() - t0
    m = re.search(r'data-ms="(\d+)"', out)
    return (int(m.group(1)) / 1000 if m and marker in out else math.nan), dt


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--latents", type=int, default=16384)
    ap.add_argument("--layers", type=int, default=18)
    ap.add_argument("--vocab", type=int, default=262144)
    ap.add_argument("--out", type=Path, default=Path("/tmp/bench-browser"))
    ap.add_argument("--chromium", default="chromium")
    args = ap.parse_args()
    shutil.rmtree(args.out, ignore_errors=True)
    args.out.mkdir(parents=True)
    t0 = time.perf_counter()
    data = synthetic(args.latents, args.layers, args.vocab)
    t1 = time.perf_counter()
    write_browser(args.out, data)
    t2 = time.perf_counter()
    files = [f for f in (args.out / "browser").rglob("*") if f.is_file()]
    size = sum(f.stat().st_size for f in files)
    big = max(files, key=lambda f: f.stat().st_size)
    print(
        f"synthetic {args.latents:,} latents x {args.layers} layers: built in {t1 - t0:.1f} s, written in {t2 - t1:.1f} s"
    )
    print(f"browser: {size / 1e6:.1f} MB in {len(files)} files; largest {big.name} {big.stat().st_size / 1e6:.2f} MB")
    for sub in ("data", "latents"):
        part = [f for f in files if f.parent.name == sub]
        print(f"  {sub}/: {sum(f.stat().st_size for f in part) / 1e6:.1f} MB in {len(part)} files")
    if shutil.which(args.chromium):
        b = (args.out / "browser").resolve()
        j = args.latents // 2
        for label, url, marker in [
            ("index (static + searchable table)", f"file://{b}/index.html", 'data-ready="1"'),
            (f"latent page {j}", f"file://{b}/latents/{shard_of(j)}.html#{j}", f'data-ready="{j}"'),
        ]:
            times = sorted(load_time(args.chromium, url, marker) for _ in range(3))
            page, whole = times[1]
            print(f"  {label}: rendered {page:.2f} s after navigation start (median of 3; whole process {whole:.2f} s)")


if __name__ == "__main__":
    main()
