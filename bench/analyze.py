"""Variance-analysis benchmark, run by hand: prints numbers, asserts nothing (not part of the test suite).

    python bench/analyze.py --sae RUN_DIR [--cache CACHE] [--tokens 8192] [--device auto] [--threads N]
                            [--rows 4096] [--repeats 3] [--out /tmp/bench-analyze] [--no-figures]

Tokens/s of `analyze.layers.run_variance` (what `analyze variance` runs) against a bare SAE encode of the
SAME tokens: the same ChunkReader order (layers of the run's config.json, seed 0, all complete chunks),
the same keep mask and token budget, the same sub-batches of `--rows` tokens x L layers, on the same
device, calling `sae.encode` and nothing else. The cost of the analysis should be the encoder: target
run_variance / bare encode >= 0.8.

Four measurements, each after a warm-up on a small token budget; (1)-(3) are repeated --repeats times,
interleaved (1 2 3, 2 3 1, 3 1 2, ...) so load from other processes hits them alike; best and median:
  1. run_variance: the whole call (load the SAE, open the cache, stream, write variance.json, the
     safetensors and, unless --no-figures, the two PNGs into a scratch folder), and its own streaming
     time (the `seconds` it reports: reader + copies + encode + LayerDistribution.update);
  2. bare encode, streamed: ChunkReader -> keep mask -> device -> sae.encode per sub-batch (as
     analyze.layers._stream, minus the accumulators and the progress bar);
  3. bare encode alone: the same kept tokens read beforehand onto the device (storage dtype, at most
     --preload-gb), so only the cast to float and sae.encode are timed: the encoder's own speed;
  4. one instrumented run_variance and one instrumented (2): time inside TopKSae.encode,
     LayerDistribution.update and waiting for ChunkReader's chunks, within one stream (on CUDA each
     wrapped call is synchronized, so these runs are a little slower than (1) and (2)).
Then the wall time for 10M tokens (the poster's budget) extrapolated from the measured speeds.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

# `python bench/analyze.py` puts bench/ first on sys.path, where bench/harvest.py would shadow the
# `harvest` package: put the repository root there instead.
_BENCH_DIR = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _BENCH_DIR]
sys.path.insert(0, str(_BENCH_DIR.parent))

import argparse  # noqa: E402
import inspect  # noqa: E402
import json  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from contextlib import contextmanager  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from typing import Any, Iterator  # noqa: E402

import torch  # noqa: E402

from analyze.layers import LayerDistribution, run_variance  # noqa: E402
from bench.common import best_median, cpu_seconds, cpu_share, fmt_rate, sync  # noqa: E402
from harvest import ChunkReader, open_cache  # noqa: E402
from harvest.models import resolve_device  # noqa: E402
from train import load_sae  # noqa: E402
from train.sae import TopKSae  # noqa: E402

RV_DEFAULTS = {
    n: p.default
    for n, p in inspect.signature(run_variance).parameters.items()
    if p.default is not inspect.Parameter.empty
}
POSTER_TOKENS = 10_000_000


# ---------------------------------------------------------------------------------------------
# small helpers (as bench/harvest.py)


def fmt_duration(s: float) -> str:
    if s < 120:
        return f"{s:.1f} s"
    if s < 2 * 3600:
        return f"{s / 60:.1f} min"
    if s < 2 * 86400:
        return f"{s / 3600:.1f} h"
    return f"{s / 86400:.1f} days"


@dataclass
class Series:
    """Repeated measurements of one path: tokens/s per repeat, CPU share per repeat."""

    tps: list[float] = field(default_factory=list)
    share: list[float] = field(default_factory=list)
    extra: list[float] = field(default_factory=list)  # path-specific seconds (run_variance: whole-call wall)

    def line(self) -> str:
        b, m = best_median(self.tps)
        return (
            f"best {fmt_rate(b):>14s}  median {fmt_rate(m):>14s}   [{', '.join(f'{x:,.0f}' for x in self.tps)}]"
            f"  CPU share {statistics.median(self.share):.2f}"
        )


# ---------------------------------------------------------------------------------------------
# the paths


@dataclass
class VarianceRun:
    tokens: int
    wall_s: float  # the whole run_variance call
    stream_s: float  # run_variance's own `seconds`: the streaming loop
    share: float
    notes: list[str]


def time_run_variance(
    sae_dir: Path, cache: Path, tokens: int, out: Path, device: str, rows: int, figures: bool
) -> VarianceRun:
    notes: list[str] = []
    shutil.rmtree(out, ignore_errors=True)
    sync(device)
    c0, t = cpu_seconds(), time.perf_counter()
    summary = run_variance(
        sae_dir, cache, tokens, out, device=device, progress=False, rows=rows, figures=figures, log=notes.append
    )
    sync(device)
    wall = time.perf_counter() - t
    return VarianceRun(summary.tokens, wall, summary.seconds, cpu_share(cpu_seconds() - c0, wall), notes)


def kept_chunks(reader: ChunkReader, budget: int, device: str) -> Iterator[torch.Tensor]:
    """The kept tokens of each chunk, [L, n, d] on `device` in the cache's dtype, exactly as
    analyze.layers._stream selects and moves them, until `budget` tokens."""
    done = 0
    for chunk in reader.epoch(0):
        kept = chunk.keep.nonzero().squeeze(1)[: budget - done]
        x_all = chunk.vectors(kept, device, non_blocking=True)
        yield x_all
        done += len(kept)
        if device != "cpu":
            # the reader soon refills this pinned buffer (ChunkReader's hold): let the async copy land
            # first (run_variance gets the same from the syncs inside LayerDistribution.update)
            torch.cuda.synchronize(device)
        if done >= budget:
            break


@torch.no_grad()
def time_bare_stream(
    sae: TopKSae, cache: Any, layers: list[int], budget: int, rows: int, device: str, seed: int
) -> tuple[int, float, float]:
    """(tokens, seconds, CPU share) of reader -> keep -> device -> sae.encode; the reader's construction
    (buffer allocation) is outside the time, as it is outside run_variance's `seconds`."""
    reader = ChunkReader(cache, layers=layers, seed=seed, pin_memory=device.startswith("cuda"))
    done = 0
    sync(device)
    c0, t = cpu_seconds(), time.perf_counter()
    for x_all in kept_chunks(reader, budget, device):
        for s in range(0, x_all.shape[1], rows):
            sae.encode(x_all[:, s : s + rows].float())
        done += x_all.shape[1]
    sync(device)
    wall = time.perf_counter() - t
    return done, wall, cpu_share(cpu_seconds() - c0, wall)


@torch.no_grad()
def time_bare_encode(sae: TopKSae, chunks: list[torch.Tensor], rows: int, device: str) -> tuple[int, float, float]:
    """(tokens, seconds, CPU share) of sae.encode alone over chunks already on the device."""
    sync(device)
    c0, t = cpu_seconds(), time.perf_counter()
    for x_all in chunks:
        for s in range(0, x_all.shape[1], rows):
            sae.encode(x_all[:, s : s + rows].float())
    sync(device)
    wall = time.perf_counter() - t
    return sum(x.shape[1] for x in chunks), wall, cpu_share(cpu_seconds() - c0, wall)


@contextmanager
def instrument(timers: dict[str, float], device: str) -> Iterator[None]:
    """Time every TopKSae.encode and LayerDistribution.update call (synchronized on CUDA) and the waits for
    ChunkReader chunks; restore the originals afterwards."""
    patches: list[tuple[Any, str, Any]] = []

    def wrap(owner: Any, name: str, label: str) -> None:
        orig = getattr(owner, name)

        def timed(*a: Any, **kw: Any) -> Any:
            sync(device)
            t = time.perf_counter()
            try:
                return orig(*a, **kw)
            finally:
                sync(device)
                add(label, t)

        patches.append((owner, name, orig))
        setattr(owner, name, timed)

    def add(label: str, t: float) -> None:
        timers[label] = timers.get(label, 0.0) + time.perf_counter() - t

    orig_epoch = ChunkReader.epoch

    def timed_epoch(self: ChunkReader, *a: Any, **kw: Any) -> Iterator[Any]:
        """The consumer's wait for each chunk, and for the reader's pool to shut down when the loop ends."""
        it = orig_epoch(self, *a, **kw)
        try:
            while True:
                t = time.perf_counter()
                try:
                    chunk = next(it)
                except StopIteration:
                    return
                finally:
                    add("read wait", t)
                yield chunk
        finally:
            t = time.perf_counter()
            it.close()  # a loop that stops early leaves reads in flight: the pool waits for them
            add("read wait", t)

    patches.append((ChunkReader, "epoch", orig_epoch))
    ChunkReader.epoch = timed_epoch  # type: ignore[method-assign]
    wrap(TopKSae, "encode", "encode")
    wrap(LayerDistribution, "update", "update")
    try:
        yield
    finally:
        for owner, name, orig in reversed(patches):
            setattr(owner, name, orig)


# ---------------------------------------------------------------------------------------------
# main


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--run", "--sae", dest="sae", type=Path, required=True, help="a trained run folder (train run --out)"
    )
    p.add_argument("--cache", type=Path, help="cache (default: the one named in the run's config.json)")
    p.add_argument("--tokens", type=int, default=8192, help="kept tokens per measurement")
    p.add_argument("--device", default="auto", help="auto (cuda when present), cpu, cuda or cuda:N")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    p.add_argument(
        "--rows",
        type=int,
        default=RV_DEFAULTS["rows"],
        help=f"tokens per sub-batch (run_variance's default: {RV_DEFAULTS['rows']})",
    )
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument(
        "--warmup-tokens", type=int, help="token budget of the warm-up runs (default: min(--tokens, --rows))"
    )
    p.add_argument(
        "--out",
        type=Path,
        default=Path("/tmp/bench-analyze"),
        help="scratch folder for run_variance's outputs (replaced; never the run folder)",
    )
    p.add_argument("--no-figures", action="store_true", help="run_variance without its two PNG figures")
    p.add_argument(
        "--preload-gb",
        type=float,
        default=4.0,
        help="skip measurement 3 when the kept tokens (storage dtype) exceed this on the device",
    )
    return p.parse_args()


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    run = args.sae
    cfg = json.loads((run / "config.json").read_text())
    cache_path = args.cache or Path(cfg["cache"]["path"])
    layers = list(cfg["layers"])
    device = resolve_device(args.device)
    seed = RV_DEFAULTS["seed"]
    figures = not args.no_figures
    out = args.out / "variance"
    if out.resolve() == run.resolve():
        raise SystemExit("--out must not be the run folder")
    cache = open_cache(cache_path)
    sae = load_sae(run, device)
    warm = args.warmup_tokens or min(args.tokens, args.rows)
    L, d, n_lat = len(layers), sae.cfg.d_model, sae.cfg.n_latents
    cuda_name = torch.cuda.get_device_name(device) if device.startswith("cuda") else "none"
    print(
        f"# analyze variance benchmark: run {run} (n_latents {n_lat:,}, k {sae.cfg.k}, d {d}), "
        f"{L} layers {layers[0]}..{layers[-1]}"
    )
    print(
        f"# cache {cache_path} ({cache.layout.n_tokens:,} tokens, chunk {cache.layout.chunk_tokens}, "
        f"{cache.layout.dtype}); {args.tokens:,} kept tokens per measurement, sub-batch {args.rows} tokens "
        f"x {L} layers, seed {seed}"
    )
    print(
        f"# device {device} (cuda {cuda_name}), torch threads {torch.get_num_threads()}, {os.cpu_count()} CPUs, "
        f"load average {os.getloadavg()[0]:.2f} (other processes skew timings); {args.repeats} repeats "
        f"after a {warm:,}-token warm-up; figures {'on' if figures else 'off'}",
        flush=True,
    )

    # warm-up: imports (matplotlib, rich), CUDA context and kernels, the SAE's CPU workspace, page cache
    t = time.perf_counter()
    time_run_variance(run, cache_path, warm, out, device, args.rows, figures)
    time_bare_stream(sae, cache, layers, warm, args.rows, device, seed)
    print(f"# warm-up took {time.perf_counter() - t:.1f} s", flush=True)

    # the kept tokens on the device, for the encode-only path
    preload_bytes = args.tokens * L * d * cache.dtype.itemsize
    chunks: list[torch.Tensor] | None = None
    if preload_bytes <= args.preload_gb * 1e9:
        reader = ChunkReader(cache, layers=layers, seed=seed, pin_memory=device.startswith("cuda"))
        chunks = list(kept_chunks(reader, args.tokens, device))  # indexing copied them out of the reader's buffers
        del reader
        time_bare_encode(sae, [chunks[0][:, :warm]], args.rows, device)

    rv, stream, bare, alone = Series(), Series(), Series(), Series()
    rv_tokens: set[int] = set()
    bare_tokens: set[int] = set()
    notes: set[str] = set()

    def measure_rv() -> str:
        res = time_run_variance(run, cache_path, args.tokens, out, device, args.rows, figures)
        rv.tps.append(res.tokens / res.wall_s)
        rv.share.append(res.share)
        rv.extra.append(res.wall_s)
        stream.tps.append(res.tokens / res.stream_s)
        stream.share.append(res.share)
        stream.extra.append(res.stream_s)
        rv_tokens.add(res.tokens)
        notes.update(res.notes)
        return f"run_variance call {res.wall_s:.2f} s (stream {res.stream_s:.2f} s; CPU share {res.share:.2f})"

    def measure_bare() -> str:
        n, s, share = time_bare_stream(sae, cache, layers, args.tokens, args.rows, device, seed)
        bare.tps.append(n / s)
        bare.share.append(share)
        bare_tokens.add(n)
        return f"bare streamed encode {s:.2f} s ({share:.2f})"

    def measure_alone() -> str:
        n, s, share = time_bare_encode(sae, chunks, args.rows, device)
        alone.tps.append(n / s)
        alone.share.append(share)
        return f"encode alone {s:.2f} s ({share:.2f})"

    paths = [measure_rv, measure_bare, *([measure_alone] if chunks is not None else [])]
    for r in range(args.repeats):
        order = paths[r % len(paths) :] + paths[: r % len(paths)]  # rotated: no path always follows the same one
        print(f"  repeat {r + 1}: " + ", ".join(f() for f in order), flush=True)

    # 4. breakdown inside one run_variance stream, and inside one bare streamed encode
    timers: dict[str, float] = {}
    with instrument(timers, device):
        inst = time_run_variance(run, cache_path, args.tokens, out, device, args.rows, figures)
    bare_timers: dict[str, float] = {}
    with instrument(bare_timers, device):
        _, bare_s, bare_share = time_bare_stream(sae, cache, layers, args.tokens, args.rows, device, seed)

    tokens = min(rv_tokens)
    vectors = tokens * L
    print(f"\n== results: {tokens:,} kept tokens x {L} layers = {vectors:,} vectors ==")
    for note in sorted(notes):
        print(f"note (run_variance): {note}")
    if rv_tokens != bare_tokens or len(rv_tokens) != 1:
        print(f"WARNING: token counts differ: run_variance {sorted(rv_tokens)}, bare encode {sorted(bare_tokens)}")
    print(f"1. run_variance, whole call        {rv.line()}")
    print(f"   run_variance, stream (seconds)  {stream.line()}")
    print(f"2. bare encode, streamed           {bare.line()}")
    if chunks is not None:
        print(f"3. bare encode alone (preloaded)   {alone.line()}")
        gflop = 2 * vectors * d * n_lat / 1e9
        b, m = best_median(alone.tps)
        print(
            f"   encoder matmul: {2 * d * n_lat / 1e6:.1f} MFLOP per vector; best {b * L * 2 * d * n_lat / 1e9:,.1f} "
            f"GFLOP/s, median {m * L * 2 * d * n_lat / 1e9:,.1f} GFLOP/s ({gflop:,.0f} GFLOP per pass)"
        )
    else:
        print(
            f"3. bare encode alone: skipped ({preload_bytes / 1e9:.1f} GB of kept tokens > --preload-gb "
            f"{args.preload_gb})"
        )

    def ratio(a: Series, b: Series) -> tuple[float, float]:
        return max(a.tps) / max(b.tps), statistics.median(a.tps) / statistics.median(b.tps)

    print("\nratios (tokens/s over tokens/s; best with best, median with median):")
    rows: list[tuple[str, float, float, str]] = [
        ("run_variance stream / bare streamed encode", *ratio(stream, bare), "  (target >= 0.8)"),
        ("run_variance whole call / bare streamed encode", *ratio(rv, bare), "  (incl. load + outputs)"),
    ]
    if chunks is not None:
        rows += [
            ("run_variance stream / encode alone", *ratio(stream, alone), ""),
            ("bare streamed encode / encode alone", *ratio(bare, alone), "  (cost of reading + copies)"),
        ]
    width = max(len(r[0]) for r in rows)
    for name, b, m, tail in rows:
        print(f"  {name:<{width}}  best {b:.3f}  median {m:.3f}{tail}")

    print("\n4. inside one instrumented run (on CUDA every wrapped call is synchronized):")
    print(f"  {'':28s} {'run_variance stream':>21s} {'bare streamed encode':>21s}")
    cols = [(timers, inst.stream_s), (bare_timers, bare_s)]
    for label, key in [
        ("sae.encode", "encode"),
        ("LayerDistribution.update", "update"),
        ("waiting for the reader", "read wait"),
        ("rest (keep, copies, cast)", None),
    ]:
        cells = []
        for tm, total in cols:
            x = tm.get(key, 0.0) if key else total - sum(tm.values())
            cells.append(f"{x:8.2f} s {x / total:7.1%}")
        print(f"  {label:<28s} {cells[0]:>21s} {cells[1]:>21s}")
    print(
        f"  {'total':<28s} {inst.stream_s:8.2f} s {'':7s} {bare_s:8.2f} s {'':7s}   "
        f"(CPU share {inst.share:.2f} / {bare_share:.2f})"
    )
    enc = timers.get("encode", 0.0)
    print(
        f"  in-run ratio encode / run_variance stream: {enc / inst.stream_s:.3f}  (one run, so less exposed to "
        f"load elsewhere; target >= 0.8)"
    )
    print(
        "  reader wait: mostly the first chunk (the reader starts up to 8 reads at once, into fresh buffers) and,\n"
        "  when the budget ends before the chunks do, the reads still in flight (the pool waits for them)"
    )
    print(
        f"  run_variance outside its stream: {inst.wall_s - inst.stream_s:.2f} s (load SAE, open cache, reader "
        f"buffers, write files{', figures' if figures else ''})"
    )

    fixed = statistics.median([w - s for w, s in zip(rv.extra, stream.extra)])
    print(f"\nextrapolated wall time for {POSTER_TOKENS:,} tokens ({L} layers, n_latents {n_lat:,}, device {device}):")
    for name, series, add in [
        ("run_variance", stream, fixed),
        ("bare streamed encode", bare, 0.0),
        *([("bare encode alone", alone, 0.0)] if chunks is not None else []),
    ]:
        b, m = best_median(series.tps)
        extra = f" + {fixed:.1f} s setup/outputs" if add else ""
        print(
            f"  {name:<22s} at best {fmt_duration(POSTER_TOKENS / b + add):>10s}, at median "
            f"{fmt_duration(POSTER_TOKENS / m + add):>10s}{extra}"
        )
    print(f"\n(load average now {os.getloadavg()[0]:.2f})")
    print(
        "note: (1) and (2) read the same chunks in the same seeded order with the same keep mask and token\n"
        "      budget, cut the same sub-batches and encode them on the same device; (2) skips the accumulator\n"
        "      (LayerDistribution.update) and the progress bar (run_variance runs here with progress=False).\n"
        "      The stream ratio is the fair one: the whole call adds fixed costs (loading the SAE, allocating\n"
        "      the reader's buffers, writing outputs and figures) that do not scale with tokens. The\n"
        "      instrumented run's encode share is measured within one run, so load from other processes\n"
        "      affects it less than the cross-run ratios. On a CPU the reader's threads compete with the\n"
        "      encoder for cores."
    )


if __name__ == "__main__":
    main()
