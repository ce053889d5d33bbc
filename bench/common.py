"""Timing helpers shared by the benchmarks (imported as `bench.common`: scripts run as modules from the repo
root, `python -m bench.NAME`, or put the repo root on sys.path themselves). Other jobs on a small machine
skew wall times, so every timing comes with a CPU share."""

from __future__ import annotations

import os
import statistics
import sys
from pathlib import Path
from typing import Sequence

import torch

if sys.path and Path(sys.path[0] or ".").resolve() == Path(__file__).resolve().parent:  # run by its path
    raise SystemExit(
        f"bench/ is first on sys.path, where bench/harvest.py and bench/analyze.py shadow the packages of those "
        f"names: run it from the repository root as a module, python -m bench.{Path(sys.argv[0]).stem}"
    )


def sync(device: str) -> None:
    """Wait for queued GPU work, so wall times cover it."""
    if str(device).startswith("cuda"):
        torch.cuda.synchronize(device)


def cpu_seconds() -> float:
    """User + system CPU time of this process, all threads."""
    t = os.times()
    return t.user + t.system


def cpu_share(cpu_s: float, wall_s: float) -> float:
    """Fraction of torch's threads' worth of CPU this process got: well below 1 means other load competed.
    (I/O threads count too, so it can exceed 1 a little.)"""
    return cpu_s / max(wall_s * torch.get_num_threads(), 1e-9)


def fmt_rate(x: float, unit: str = "tok/s") -> str:
    return f"{x:,.1f} {unit}" if x < 100 else f"{x:,.0f} {unit}"


def best_median(xs: list[float]) -> tuple[float, float]:
    """(best, median) of rates: higher is better."""
    return max(xs), statistics.median(xs)


def print_summary(rows: Sequence[tuple[str, str]]) -> None:
    """The closing table every benchmark prints: label, value."""
    print(f"\n== summary ==  (load average now {os.getloadavg()[0]:.2f})")
    width = max((len(k) for k, _ in rows), default=0)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
