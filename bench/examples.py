"""Max-activating-examples benchmark, run by hand: prints numbers, asserts nothing (not part of the test suite).

    python bench/examples.py --sae RUN_DIR [--tokens 4096] [--repeats 3] [--rows 4096] [--device auto]
                             [--out /tmp/bench-examples] [--memory-only | --no-memory]

1. Throughput: `analyze.examples.run_examples` (what `analyze examples` runs, browser off) against a bare
   encode of the SAME chunks: `train.latents.iter_latents` with the same reader order, keep mask, token
   budget and sub-batches, whose codes are thrown away. run_examples's own `tokens_per_s` is its streaming
   loop (reader + encode + ExampleAccumulator.update); target examples / bare >= 0.8. Repeats alternate
   the two paths, so other load hits both alike; best and median, with the CPU share each got.
2. Peak memory at --tokens, 3x and 10x --tokens: each in a fresh process (VmHWM), for run_examples and
   for the bare stream; the examples state is fixed-size and its merge queue bounded, so its peak stops
   growing once the queue has filled (a few chunks).
3. One whole call with the browser (pages written), for the time the pages take.
"""

from __future__ import annotations

import sys
from pathlib import Path

_BENCH_DIR = Path(__file__).resolve().parent  # keep bench/harvest.py from shadowing the harvest package
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _BENCH_DIR]
sys.path.insert(0, str(_BENCH_DIR.parent))

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import resource  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402

from analyze.examples import run_examples  # noqa: E402
from bench.common import best_median, cpu_seconds, cpu_share, fmt_rate, print_summary, sync  # noqa: E402
from harvest import open_cache  # noqa: E402
from harvest.models import resolve_device  # noqa: E402
from train.latents import iter_latents  # noqa: E402
from train.record import load_run  # noqa: E402

CACHE: str | None = None  # --cache: the run's cache elsewhere (e.g. a copy); None = where the run says


def time_examples(run: Path, tokens: int, out: Path, device: str, rows: int) -> tuple[float, float, float]:
    """(tokens/s of run_examples's streaming loop, CPU share of the whole call, tokens per CPU-second of the
    whole call: load, stream, write the tensors); browser off."""
    shutil.rmtree(out, ignore_errors=True)
    c0, t = cpu_seconds(), time.perf_counter()
    res = run_examples(run, CACHE, tokens, out_dir=out, device=device, rows=rows, browser=False, progress=False)
    wall, cpu = time.perf_counter() - t, cpu_seconds() - c0
    return res["tokens_per_s"], cpu_share(cpu, wall), res["tokens"] / cpu


@torch.no_grad()
def time_bare(run: Path, tokens: int, device: str, rows: int) -> tuple[float, float, float]:
    """(tokens/s of the stream, CPU share, tokens per CPU-second of the whole call) of iter_latents alone:
    load, read, keep, encode; the codes are dropped."""
    c0 = cpu_seconds()
    record = load_run(run)
    sae, cache = record.load_sae(device), open_cache(CACHE or record.cache.path)
    n = 0
    sync(device)
    c1, t = cpu_seconds(), time.perf_counter()
    for b in iter_latents(sae, cache, record.layers, tokens=tokens, rows=rows, device=device):
        n += b.n
    sync(device)
    wall = time.perf_counter() - t
    return n / wall, cpu_share(cpu_seconds() - c1, wall), n / (cpu_seconds() - c0)


def peak_rss(what: str, run: Path, tokens: int, out: Path, device: str, rows: int) -> dict:
    """Peak resident memory of one fresh process doing `what` (examples | bare) over `tokens` tokens."""
    code = f"""
import json, sys
sys.path.insert(0, {str(_BENCH_DIR.parent)!r})
from pathlib import Path
import bench.examples as b
from bench.examples import time_bare, time_examples
b.CACHE = {CACHE!r}
run, out = Path({str(run)!r}), Path({str(out)!r})
if {what!r} == "examples":
    tps = time_examples(run, {tokens}, out, {device!r}, {rows})[0]
else:
    tps = time_bare(run, {tokens}, {device!r}, {rows})[0]
hwm = next(l for l in open("/proc/self/status") if l.startswith("VmHWM"))  # ru_maxrss survives exec: not that
print(json.dumps({{"peak_mib": int(hwm.split()[1]) / 1024, "tps": tps}}))
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", "--sae", dest="sae", type=Path, required=True, help="a trained run folder")
    p.add_argument("--tokens", type=int, default=4096, help="kept tokens per throughput measurement")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--rows", type=int, default=4096, help="tokens per encoded sub-batch (x layers vectors)")
    p.add_argument("--device", default="auto")
    p.add_argument("--cache", help="the run's cache, if not where its config.json says")
    p.add_argument("--out", type=Path, default=Path("/tmp/bench-examples"), help="scratch folder (replaced)")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    p.add_argument("--memory-only", action="store_true", help="only the peak-memory measurement")
    args = p.parse_args()
    global CACHE
    CACHE = args.cache
    device = resolve_device(args.device)
    record = load_run(args.sae)
    cache = open_cache(CACHE or record.cache.path)
    kept = int(cache.read_tokens("keep").sum())
    print(
        f"# analyze examples benchmark: {args.sae} ({record.sae.n_latents:,} latents, k {record.sae.k}, "
        f"{len(record.layers)} layers); cache {cache.path} ({kept:,} kept tokens); {args.tokens:,} tokens per "
        f"measurement, sub-batch {args.rows} tokens; device {device}, torch threads {torch.get_num_threads()}, "
        f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f} (a shared machine: see the CPU shares)",
        flush=True,
    )
    rows = []
    if not args.memory_only:
        time_examples(args.sae, min(args.tokens, args.rows), args.out / "warm", device, args.rows)  # warm-up
        time_bare(args.sae, min(args.tokens, args.rows), device, args.rows)
        got: dict[str, list[tuple[float, float, float]]] = {"examples": [], "bare": []}
        for r in range(args.repeats):
            for what in ["examples", "bare"] if r % 2 == 0 else ["bare", "examples"]:
                if what == "examples":
                    m = time_examples(args.sae, args.tokens, args.out / "ex", device, args.rows)
                else:
                    m = time_bare(args.sae, args.tokens, device, args.rows)
                got[what].append(m)
                print(f"  repeat {r}: {what:8s} {fmt_rate(m[0])}  (CPU share {m[1]:.2f}; {m[2]:,.1f} tok per CPU-s)")
        for what, label in [("examples", "analyze examples (stream)"), ("bare", "bare encode, same chunks")]:
            b, m = best_median([x[0] for x in got[what]])
            share = statistics.median(x[1] for x in got[what])
            per_cpu = statistics.median(x[2] for x in got[what])
            rows.append(
                (label, f"best {fmt_rate(b)}, median {fmt_rate(m)}, CPU share {share:.2f}; {per_cpu:,.1f} tok/CPU-s")
            )
        ratio = lambda i, f: f([x[i] for x in got["examples"]]) / f([x[i] for x in got["bare"]])
        rows.append(
            (
                "examples / bare (wall)",
                f"best {ratio(0, max):.3f}, median {ratio(0, statistics.median):.3f} (target >= 0.8)",
            )
        )
        rows.append(("examples / bare (per CPU-second, whole calls)", f"median {ratio(2, statistics.median):.3f}"))
        shutil.rmtree(args.out / "pages", ignore_errors=True)
        t = time.perf_counter()
        res = run_examples(args.sae, CACHE, args.tokens, out_dir=args.out / "pages", device=device, progress=False)
        wall = time.perf_counter() - t
        files = [f for f in (args.out / "pages" / "browser").rglob("*") if f.is_file()]
        pages = sum(f.stat().st_size for f in files)
        rows.append(
            (
                "whole call with the browser",
                f"{wall:.1f} s ({res['seconds']:.1f} s streaming; {res['browser']['latents']:,} latents in {len(files)} files, "
                f"{pages / 2**20:.1f} MiB)",
            )
        )
    if not args.no_memory:
        sizes = [args.tokens, min(3 * args.tokens, kept), min(10 * args.tokens, kept)]
        for what in ("examples", "bare"):
            peaks = [peak_rss(what, args.sae, n, args.out / "mem", device, args.rows)["peak_mib"] for n in sizes]
            rows.append(
                (
                    f"peak RSS, {what}",
                    ", ".join(f"{p:,.0f} MiB at {n:,} tokens" for p, n in zip(peaks, sizes))
                    + f": x{peaks[-1] / peaks[0]:.2f} at {sizes[-1] / sizes[0]:.1f}x tokens, "
                    f"x{peaks[-1] / peaks[1]:.2f} from {sizes[1]:,}",
                )
            )
        state = json.loads((args.out / "mem" / "examples.json").read_text())["memory_bytes"]
        rows.append(("examples state (fixed size)", f"{state / 2**20:.1f} MiB"))
    print(f"# self peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:,.0f} MiB")
    print_summary(rows)


if __name__ == "__main__":
    main()
