"""Training benchmark, run by hand: prints numbers, asserts nothing (not part of the test suite).

    python -m bench.train_loop --cache caches/gemma-3-270m-sotu [--expansion-factor 8] [-k 32] [--batch-tokens 256]
                               [--steps 20] [--layers all|L] [--device auto] [--eval-tokens 0] [--dead-tokens N]
                               [--sweep-expansion 4,8] [--sweep-k 16,32] [--repeats 1] [--out DIR]

(from the repository root, as a module: run by its path, bench/ would come first on sys.path, where
bench/harvest.py and bench/analyze.py shadow the packages of those names).

Everything runs on the SAME cache, the same shapes (d = the cache's d_model, n_latents = expansion_factor
x d, k) and the same batches (batch_tokens tokens x n_layers vectors):

  1. in-memory step: vectors/s of train.loop._step (forward with AuxK over the dead latents, training
     loss, backward, remove_parallel_grads_, Adam, renormalize_decoder_, DeadLatents update) on batches
     read from the cache into memory beforehand, by a MinibatchStream with the run's seed, so they are
     the very batches train() sees, in the same order (the numerics, and so the dead fraction, match);
  2. train from cache: tokens/s of train.loop.train([one TrainConfig]), timed from inside: step 0
     (b_pre init, initial held-out evaluation, first step, first round read) and everything after the
     last step (final checkpoint, final evaluation, saving) are excluded; the ratio to (1) says whether
     the data path starves the SAE (target >= 0.9);
  3. sweep: train() with 4 TrainConfigs (expansion factor x k) in one pass, vs the same 4 configs run one
     after another; wall times and their ratio (target <= 0.5 where reading the cache dominates), and
     what dominates: the MinibatchStream alone over the same batches vs the pure step time of (1), and
     the data waits vs the step time inside the training runs.

Dead latents: TrainConfig.dead_tokens (paper: 10M tokens) never kills a latent in a run this short, so AuxK
would never run; --dead-tokens (default 4 x batch_tokens: a latent idle for four batches is dead) gives a
realistic few % of dead latents from step 4 on (about 4% on the Gemma 3 270M cache at 256 tokens per batch,
fewer with bigger batches), identically in (1), (2) and (3): both replay the same batches and numerics.
Timers wrap train.loop functions without changing what they do, and are removed afterwards.
Other processes sharing the CPU skew wall times: every timing comes with its CPU share (process CPU time /
(wall x torch threads)); --repeats N alternates the measurements N times and keeps the best of each.
Run outputs go to a temporary folder (removed afterwards) unless --out is given.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import statistics
import subprocess
import tempfile
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch

from bench.common import cpu_seconds, cpu_share, fmt_rate, print_summary, sync
from harvest import open_cache
from harvest.env import Dist
from harvest.models import resolve_device
from train import loop as tloop
from train.config import TrainConfig
from train.data import MinibatchStream
from train.record import CacheRef, RunRecord
from train.sae import SaeConfig
from train.special import SpecialTokens
from train.split import HeldOut, choose_heldout

ORIG = {name: getattr(tloop, name) for name in ["_step", "evaluate", "_init_b_pre", "_checkpoint", "MinibatchStream"]}


# ---------------------------------------------------------------------------------------------
# small helpers (as bench/harvest.py)


def settle(timeout: float = 120.0) -> float:
    """Wait for background reads a closed stream left running, so they do not load the next measurement.

    MinibatchStream reads round r+1 on a 'round-loader' thread while round r is consumed; closing the stream
    (or train() returning) shuts its pool down without waiting, so a read in progress goes on. Returns the
    seconds waited."""
    gc.collect()  # close unreferenced stream generators first
    t = time.perf_counter()
    for th in threading.enumerate():
        if th is not threading.current_thread() and th.name.startswith(("round-loader", "chunk-reader")):
            th.join(max(0.0, timeout - (time.perf_counter() - t)))
    return time.perf_counter() - t


def autocast_for(device: str) -> Any:
    """The loop's own choice (train.loop._train)."""
    return (
        torch.autocast("cuda", dtype=torch.bfloat16)
        if device.startswith("cuda")
        else torch.autocast("cpu", enabled=False)
    )


def tree_note() -> str:
    """Uncommitted changes under train/ and harvest/ (what was measured is the working tree, not HEAD)."""
    try:
        out = subprocess.run(
            ["git", "status", "--porcelain", "--", "train", "harvest"],
            cwd=Path(__file__).resolve().parent.parent,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.split()
        changed = [p for p in out if "/" in p]
        return f"uncommitted changes in {', '.join(changed)}" if changed else "train/ and harvest/ as committed"
    except Exception:
        return "git status unavailable"


@dataclass
class Shapes:
    cache: Any
    device: str
    layers: list[int]
    train_chunks: list[int]
    heldout: HeldOut
    d_model: int


def shapes_of(args: argparse.Namespace) -> Shapes:
    """What train.loop._train derives from the cache and a config (same split, same layer list)."""
    cache = open_cache(args.cache)
    cache.require_complete()
    cfg = base_config(args, "unused")
    layers = cfg.layer_list(cache.layers)
    heldout = choose_heldout(cache, cfg.eval_tokens, cfg.heldout_seed)
    return Shapes(cache, resolve_device(args.device), layers, cache.complete_chunks(), heldout, cache.layout.d_model)


def base_config(args: argparse.Namespace, out: str, **kw: Any) -> TrainConfig:
    fields = dict(
        cache=args.cache,
        layers=args.layers,
        expansion_factor=args.expansion_factor,
        k=args.k,
        tokens=args.steps * args.batch_tokens,
        batch_tokens=args.batch_tokens,
        eval_tokens=args.eval_tokens,
        dead_tokens=args.dead_tokens,
        round_chunks=args.round_chunks,
        seed=args.seed,
        device=args.device,
        prefetch=args.prefetch,
        checkpoint_every=args.checkpoint_every,
        out=out,
    )
    fields.update(kw)
    return TrainConfig(**fields).validate()


def make_stream(sh: Shapes, cfg: TrainConfig) -> MinibatchStream:
    """The stream train.loop._train builds for a single-process run."""
    return MinibatchStream(
        sh.cache,
        sh.train_chunks,
        sh.layers,
        cfg.batch_tokens,
        cfg.round_chunks,
        sh.device,
        seed=cfg.seed,
        special=SpecialTokens.of(cfg.special_tokens, sh.cache),
        prefetch=cfg.prefetch,
        heldout=sh.heldout,
    )


def make_run(sh: Shapes, cfg: TrainConfig, out: Path) -> tloop.Run:
    """A Run built exactly as train.loop builds a new one (same seed -> same initial SAE)."""
    sae_cfg = SaeConfig.from_expansion(
        sh.d_model, cfg.expansion_factor, cfg.k, k_aux=cfg.k_aux, aux_coef=cfg.aux_coef, dead_tokens=cfg.dead_tokens
    )
    special = SpecialTokens.of(cfg.special_tokens, sh.cache)
    p = tloop.Pass(sh.cache, sh.device, sh.heldout, special, sh.layers, 1, cfg.batch_tokens)
    lr = 2e-4 / (sae_cfg.n_latents / 2**14) ** 0.5 if cfg.lr_scaling else cfg.lr
    record = RunRecord(out, cfg, sae_cfg, sh.layers, CacheRef.of(sh.cache), sh.heldout, special.mode, 1, lr, 1, {})
    return tloop._build_run(record, p)


# ---------------------------------------------------------------------------------------------
# 1. the bare step on in-memory batches


@dataclass
class StepResult:
    n_layers: int
    n_latents: int
    vectors_per_step: int
    n_pool: int
    replays_train: bool  # the pool covers every step: exactly train()'s batches, in order
    step_s: list[float]  # timed steps 1..steps-1
    cpu_s: float  # CPU time of the timed steps
    dead: list[float]  # dead fraction entering each timed step
    last_loss: float
    read_s: float  # reading the pool (not timed in the rate)
    cpu_share: float

    @property
    def total_s(self) -> float:
        return sum(self.step_s)

    @property
    def vectors_per_s(self) -> float:
        return len(self.step_s) * self.vectors_per_step / self.total_s

    @property
    def median_vectors_per_s(self) -> float:
        return self.vectors_per_step / statistics.median(self.step_s)


def read_pool(sh: Shapes, cfg: TrainConfig, steps: int, pool_bytes: float) -> tuple[list[torch.Tensor], float]:
    """The first batches train() will see (same stream, same seed), kept in the cache dtype on the device."""
    itemsize = torch.empty((), dtype=sh.cache.dtype).element_size()
    batch_bytes = len(sh.layers) * cfg.batch_tokens * sh.d_model * itemsize
    n_pool = max(2, min(steps, int(pool_bytes // batch_bytes)))
    t = time.perf_counter()
    it = iter(make_stream(sh, cfg))
    pool = [next(it).acts for _ in range(n_pool)]  # bf16: half the memory of fp32
    it.close()
    sync(sh.device)
    read_s = time.perf_counter() - t
    settle()
    return pool, read_s


def measure_step(
    sh: Shapes, cfg: TrainConfig, steps: int, pool: list[torch.Tensor], read_s: float, tmp: Path
) -> StepResult:
    n_layers, n_pool = len(sh.layers), len(pool)
    run = make_run(sh, cfg, tmp / "in-memory")
    dist, autocast = Dist(), autocast_for(sh.device)
    x = pool[0].float()  # the loop: batch.acts.float(), then index_select of the run's layers
    tloop._init_b_pre(run, x, dist)
    tloop._step(run, x, 0, autocast, dist)  # step 0: the warm-up, as train()'s step 0 (not timed there either)
    step_s, dead, parts = [], [], None
    cpu_s = 0.0
    for step in range(1, steps):
        x = pool[step % n_pool].float().index_select(0, run.layer_idx)
        dead.append(run.dead.fraction)
        sync(sh.device)
        c0, t = cpu_seconds(), time.perf_counter()
        parts = tloop._step(run, x, step, autocast, dist)
        sync(sh.device)
        step_s.append(time.perf_counter() - t)
        cpu_s += cpu_seconds() - c0
    share = cpu_share(cpu_s, sum(step_s))
    return StepResult(
        n_layers,
        run.sae.cfg.n_latents,
        n_layers * cfg.batch_tokens,
        n_pool,
        n_pool >= steps,
        step_s,
        cpu_s,
        dead,
        parts.loss if parts else float("nan"),
        read_s,
        share,
    )


# ---------------------------------------------------------------------------------------------
# instrumentation of train.loop


@dataclass
class Trace:
    """Timestamps and seconds collected inside one train() call."""

    device: str
    steps: list[tuple[float, float]] = field(default_factory=list)  # (start, end) of every _step call
    step_cpu: list[float] = field(default_factory=list)  # process CPU time at the end of every _step call
    waits: list[tuple[float, float]] = field(default_factory=list)  # (start, end) of every next(batches)
    evals: list[float] = field(default_factory=list)
    init_s: float = 0.0
    checkpoints: list[tuple[float, float]] = field(default_factory=list)


@contextmanager
def instrument(trace: Trace) -> Iterator[None]:
    """Wrap train.loop's _step, evaluate, _init_b_pre, _checkpoint and the stream's iterator with timers."""
    dev = trace.device

    def step(*a: Any, **kw: Any) -> Any:
        t = time.perf_counter()
        try:
            return ORIG["_step"](*a, **kw)  # ends with .tolist(): synchronized
        finally:
            trace.steps.append((t, time.perf_counter()))
            trace.step_cpu.append(cpu_seconds())

    def evaluate(*a: Any, **kw: Any) -> Any:
        t = time.perf_counter()
        try:
            return ORIG["evaluate"](*a, **kw)
        finally:
            sync(dev)
            trace.evals.append(time.perf_counter() - t)

    def init_b_pre(*a: Any, **kw: Any) -> Any:
        t = time.perf_counter()
        try:
            return ORIG["_init_b_pre"](*a, **kw)
        finally:
            sync(dev)
            trace.init_s += time.perf_counter() - t

    def checkpoint(*a: Any, **kw: Any) -> Any:
        t = time.perf_counter()
        try:
            return ORIG["_checkpoint"](*a, **kw)
        finally:
            trace.checkpoints.append((t, time.perf_counter()))

    class TimedStream(ORIG["MinibatchStream"]):  # type: ignore[misc, valid-type]
        def __iter__(self) -> Iterator[Any]:
            it = super().__iter__()
            try:
                while True:
                    t = time.perf_counter()
                    batch = next(it)
                    sync(dev)  # a batch moved to the GPU asynchronously counts as data time
                    trace.waits.append((t, time.perf_counter()))
                    yield batch
            finally:
                it.close()

    patches = {
        "_step": step,
        "evaluate": evaluate,
        "_init_b_pre": init_b_pre,
        "_checkpoint": checkpoint,
        "MinibatchStream": TimedStream,
    }
    for name, fn in patches.items():
        setattr(tloop, name, fn)
    try:
        yield
    finally:
        for name in patches:
            setattr(tloop, name, ORIG[name])


@dataclass
class TrainResult:
    n_runs: int
    steps: int
    batch_tokens: int
    wall_s: float  # the whole train() call
    setup_s: float  # call -> first batch requested (open cache, keep counts, SAEs, optimizers, stream)
    first_batch_s: float  # the first round's read (before step 0)
    step0_s: float  # b_pre init + initial evaluation + step 0 of every run
    loop_s: float  # end of step 0 -> end of the last step: steps 1..steps-1, all work of the loop
    tail_s: float  # after the last step: final checkpoint, final evaluation, saving
    eval_s: float  # all held-out evaluations (initial + final, every run)
    init_s: float
    checkpoint_s: float
    checkpoints_in_loop: int
    step_in_loop_s: float  # _step calls inside loop_s
    wait_in_loop_s: float  # next(batches) inside loop_s
    loop_step_s: list[float]  # wall time of each of steps 1..steps-1 (end of one step to the end of the next)
    loop_cpu_s: float  # process CPU time inside loop_s (all threads: the background round reads too)
    cpu_s: float
    cpu_share: float
    leftover_s: float  # a round read still running after train() returned (waited for, not in wall_s)
    summaries: list[dict]
    metrics_last: list[dict]

    @property
    def loop_tokens_per_s(self) -> float:
        return (self.steps - 1) * self.batch_tokens / self.loop_s

    @property
    def median_tokens_per_s(self) -> float:
        return self.batch_tokens / statistics.median(self.loop_step_s)


def run_train(configs: list[TrainConfig], device: str) -> TrainResult:
    trace = Trace(device)
    with instrument(trace):
        c0, t0 = cpu_seconds(), time.perf_counter()
        summaries = tloop.train(configs, show_progress=False, log=lambda s: None)
        end = time.perf_counter()
        cpu_s = cpu_seconds() - c0
    leftover = settle()
    n_runs = len(configs)
    steps = len(trace.steps) // n_runs
    step0_end = trace.steps[n_runs - 1][1]
    last_end = trace.steps[-1][1]
    ends = [trace.steps[i * n_runs + n_runs - 1][1] for i in range(steps)]
    cpus = [trace.step_cpu[i * n_runs + n_runs - 1] for i in range(steps)]
    in_loop = lambda iv: step0_end <= iv[0] and iv[1] <= last_end
    metrics_last = []
    for c in configs:
        lines = [l for l in map(json.loads, (Path(c.out) / "metrics.jsonl").read_text().splitlines()) if "loss" in l]
        metrics_last.append(lines[-1] if lines else {})  # the last training step (held-out evaluations have no loss)
    first_wait = trace.waits[0]
    return TrainResult(
        n_runs,
        steps,
        configs[0].batch_tokens,
        end - t0,
        first_wait[0] - t0,
        first_wait[1] - first_wait[0],
        step0_end - first_wait[1],
        last_end - step0_end,
        end - last_end,
        sum(trace.evals),
        trace.init_s,
        sum(b - a for a, b in trace.checkpoints),
        sum(1 for iv in trace.checkpoints if in_loop(iv)),
        sum(b - a for a, b in trace.steps if in_loop((a, b))),
        sum(b - a for a, b in trace.waits if in_loop((a, b))),
        [b - a for a, b in zip(ends, ends[1:])],
        cpus[-1] - cpus[0],
        cpu_s,
        cpu_share(cpu_s, end - t0),
        leftover,
        summaries,
        metrics_last,
    )


def print_train(tr: TrainResult, label: str) -> None:
    other = tr.loop_s - tr.step_in_loop_s - tr.wait_in_loop_s
    line = lambda name, s, extra="": print(f"  {name:<52s}{s:7.2f} s{extra}")
    print(f"{label}: train() wall {tr.wall_s:.2f} s, CPU {tr.cpu_s:.2f} s  (CPU share {tr.cpu_share:.2f})")
    line("setup (open cache, keep counts, SAEs, stream)", tr.setup_s)
    line("first batch (first round read)", tr.first_batch_s)
    line(f"step 0 (b_pre init {tr.init_s:.2f} s, initial eval, step 0)", tr.step0_s)
    line(
        f"loop: steps 1..{tr.steps - 1}",
        tr.loop_s,
        f"  {fmt_rate(tr.loop_tokens_per_s, 'tok/s')}  (median step "
        f"{fmt_rate(tr.median_tokens_per_s, 'tok/s')}; CPU share "
        f"{cpu_share(tr.loop_cpu_s, tr.loop_s):.2f})",
    )
    line("  _step calls", tr.step_in_loop_s)
    line("  waiting for batches (next(batches))", tr.wait_in_loop_s)
    line(f"  rest (float cast, index_select, metrics, {tr.checkpoints_in_loop} ckpt)", other)
    line("tail (final checkpoint, final eval, save)", tr.tail_s)
    line("held-out evaluations, all (in step 0 and tail)", tr.eval_s, f";  checkpoints, all {tr.checkpoint_s:.2f} s")
    line("after train() returned: a round read still running", tr.leftover_s, "  (not in the wall; waited for)")


# ---------------------------------------------------------------------------------------------
# 3. the data stream alone


@dataclass
class StreamResult:
    n_batches: int
    first_s: float  # the first batch: the first round's read
    rest_s: list[float]  # each later batch (later rounds are read on a background thread)
    cpu_share: float

    @property
    def total_s(self) -> float:
        return self.first_s + sum(self.rest_s)


def measure_stream(sh: Shapes, cfg: TrainConfig, n_batches: int) -> StreamResult:
    """Iterate a MinibatchStream as the loop does (next(batches), .float(), index_select), no SAE."""
    idx = torch.arange(len(sh.layers), device=sh.device)
    times = []
    c0, w0 = cpu_seconds(), time.perf_counter()
    it = iter(make_stream(sh, cfg))
    for _ in range(n_batches):
        t = time.perf_counter()
        x = next(it).acts.float().index_select(0, idx)
        sync(sh.device)
        times.append(time.perf_counter() - t)
        del x
    it.close()
    share = cpu_share(cpu_seconds() - c0, time.perf_counter() - w0)
    settle()
    return StreamResult(n_batches, times[0], times[1:], share)


# ---------------------------------------------------------------------------------------------
# main


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cache", required=True, help="an existing, complete cache")
    p.add_argument("--expansion-factor", type=int, default=8)
    p.add_argument("-k", type=int, default=32)
    p.add_argument("--batch-tokens", type=int, default=256, help="tokens per step (x n_layers vectors)")
    p.add_argument("--steps", type=int, default=20, help="steps of every run; step 0 is the untimed warm-up")
    p.add_argument("--layers", default="all", help="all (multi-layer SAE) or one layer number")
    p.add_argument("--device", default="auto")
    p.add_argument(
        "--eval-tokens",
        type=int,
        default=0,
        help="held-out tokens of every train() call (0: none; the evaluations are timed either way)",
    )
    p.add_argument("--dead-tokens", type=int, help="TrainConfig.dead_tokens (default 4 x batch tokens)")
    p.add_argument("--round-chunks", type=int, default=TrainConfig.round_chunks)
    p.add_argument("--prefetch", type=int, default=TrainConfig.prefetch)
    p.add_argument("--checkpoint-every", type=int, default=TrainConfig.checkpoint_every)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sweep-expansion", help="two expansion factors (default: expansion_factor/2, expansion_factor)")
    p.add_argument("--sweep-k", help="two k (default: k/2, k)")
    p.add_argument(
        "--repeats",
        type=int,
        default=1,
        help="repeat (1)+(2) and (3), alternating; the best of each is reported (other load skews timings)",
    )
    p.add_argument("--pool-gb", type=float, default=2.0, help="memory for the in-memory batches of (1)")
    p.add_argument("--out", help="scratch folder for run outputs (default: a temporary folder, removed)")
    p.add_argument(
        "--skip",
        choices=["step", "train", "sweep"],
        action="append",
        default=[],
        help="skip a measurement (repeatable)",
    )
    args = p.parse_args()
    if args.dead_tokens is None:
        args.dead_tokens = 4 * args.batch_tokens
    ints = lambda s: [int(v) for v in s.split(",")]
    args.sweep_expansion = (
        ints(args.sweep_expansion)
        if args.sweep_expansion
        else sorted({max(1, args.expansion_factor // 2), args.expansion_factor})
    )
    args.sweep_k = ints(args.sweep_k) if args.sweep_k else sorted({max(1, args.k // 2), args.k})
    return args


def main() -> None:
    args = parse_args()
    tmp = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="bench-train-"))
    if args.out:
        shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True, exist_ok=True)
    try:
        _main(args, tmp)
    finally:
        if not args.out:
            shutil.rmtree(tmp, ignore_errors=True)


def _main(args: argparse.Namespace, tmp: Path) -> None:
    sh = shapes_of(args)
    cfg = base_config(args, str(tmp / "train"))
    lay = sh.cache.layout
    n_layers = len(sh.layers)
    vectors = args.batch_tokens * n_layers
    print(
        f"# train benchmark: cache {sh.cache.path} ({lay.n_tokens:,} tokens x {len(lay.layers)} layers x d "
        f"{lay.d_model}, {lay.dtype}, chunk {lay.chunk_tokens}); {len(sh.train_chunks)} training chunks, "
        f"held out: {sh.heldout.describe()}"
    )
    print(
        f"# SAE: layers {args.layers} ({n_layers}), n_latents {args.expansion_factor * sh.d_model:,} "
        f"(x{args.expansion_factor}), k {args.k}, batch {args.batch_tokens} tokens = {vectors:,} vectors, "
        f"{args.steps} steps, dead_tokens {args.dead_tokens:,}, round_chunks {args.round_chunks}"
    )
    print(
        f"# device {sh.device}, torch {torch.__version__}, torch threads {torch.get_num_threads()}, "
        f"{os.cpu_count()} CPUs, cuda {torch.cuda.get_device_name() if torch.cuda.is_available() else 'none'}, "
        f"load average {os.getloadavg()[0]:.2f} (other processes skew timings); {tree_note()}",
        flush=True,
    )
    rows: list[tuple[str, str]] = []

    st = tr = None
    pool, read_s = read_pool(sh, cfg, args.steps, args.pool_gb * 1e9) if "step" not in args.skip else ([], 0.0)
    sts: list[StepResult] = []
    trs: list[TrainResult] = []
    for r in range(args.repeats):  # (1) and (2) alternate, so that load from elsewhere hits both alike
        if "step" not in args.skip:
            sts.append(measure_step(sh, cfg, args.steps, pool, read_s, tmp))
        if "train" not in args.skip:
            trs.append(run_train([base_config(args, str(tmp / f"train-{r}"))], sh.device))
        if args.repeats > 1:
            print(
                f"# repeat {r + 1}/{args.repeats}: "
                + (
                    f"in-memory {fmt_rate(sts[-1].vectors_per_s / n_layers, 'tok/s')} (CPU share "
                    f"{sts[-1].cpu_share:.2f})  "
                    if sts
                    else ""
                )
                + (
                    f"train loop {fmt_rate(trs[-1].loop_tokens_per_s, 'tok/s')} (CPU share "
                    f"{cpu_share(trs[-1].loop_cpu_s, trs[-1].loop_s):.2f})"
                    if trs
                    else ""
                ),
                flush=True,
            )
    del pool
    best = " (the best of --repeats)" if args.repeats > 1 else ""

    if sts:
        st = max(sts, key=lambda x: x.vectors_per_s)
        print(f"\n== 1. bare training step on in-memory batches (train.loop._step){best} ==", flush=True)
        ms = [1e3 * s for s in st.step_s]
        print(
            f"{st.n_pool} batches read into memory in {st.read_s:.2f} s ("
            + (
                "exactly train()'s batches, in order"
                if st.replays_train
                else f"cycled over {args.steps} steps: --pool-gb too small to replay train()'s batches"
            )
            + ")"
        )
        print(
            f"steps 1..{args.steps - 1}: {st.total_s:.2f} s  {fmt_rate(st.vectors_per_s, 'vectors/s')}  "
            f"= {fmt_rate(st.vectors_per_s / n_layers, 'tok/s')}  (per step: median {statistics.median(ms):.1f} "
            f"ms, min {min(ms):.1f}, max {max(ms):.1f}; CPU share {st.cpu_share:.2f})"
        )
        print(
            f"dead fraction entering the timed steps: mean {statistics.mean(st.dead):.1%}, min {min(st.dead):.1%}, "
            f"max {max(st.dead):.1%}  (AuxK runs whenever > 0); last loss {st.last_loss:.6f}",
            flush=True,
        )
        rows += [
            (
                "in-memory step",
                f"{fmt_rate(st.vectors_per_s, 'vectors/s')} = {fmt_rate(st.vectors_per_s / n_layers, 'tok/s')}",
            )
        ]

    if trs:
        tr = max(trs, key=lambda x: x.loop_tokens_per_s)
        print(f"\n== 2. train.loop.train from the cache, one SAE{best} ==", flush=True)
        print_train(tr, "one SAE")
        m, s = tr.metrics_last[0], tr.summaries[0]
        print(
            f"metrics.jsonl, last line: tokens_per_s {m.get('tokens_per_s', float('nan')):,.0f}, loss "
            f"{m.get('loss', float('nan')):.6f}, dead_fraction {m.get('dead_fraction', float('nan')):.1%}; "
            f"summary.json tokens_per_s {s['tokens_per_s']:,.0f}"
        )
        print(
            "  (those two include step 0: the b_pre init, the initial evaluation and the first round read;\n"
            "   the loop rate above excludes them and everything after the last step)"
        )
        rows.append(("train from cache (loop)", fmt_rate(tr.loop_tokens_per_s, "tok/s")))
        if st is not None:
            ratio = tr.loop_tokens_per_s * n_layers / st.vectors_per_s
            med = tr.median_tokens_per_s * n_layers / st.median_vectors_per_s
            n = len(st.step_s)
            cpu_ratio = (st.cpu_s / n) / (tr.loop_cpu_s / (tr.steps - 1))
            loop_share = cpu_share(tr.loop_cpu_s, tr.loop_s)
            print(
                f"train-from-cache / in-memory step throughput: {ratio:.3f}  (target >= 0.9; from total times; "
                f"CPU shares {loop_share:.2f} / {st.cpu_share:.2f})"
            )
            print(
                f"  same from median step times (robust to load spikes): {med:.3f}  (median step "
                f"{1e3 * statistics.median(tr.loop_step_s):.1f} ms in the loop, "
                f"{1e3 * statistics.median(st.step_s):.1f} ms in memory)"
            )
            print(
                f"  CPU time per step, in memory / in the loop (all threads): {cpu_ratio:.3f}  "
                f"({st.cpu_s / n:.3f} s / {tr.loop_cpu_s / (tr.steps - 1):.3f} s; < 1: the data path costs CPU)"
            )
            # bit-identical on the CPU; CUDA's atomics (index_add_, embedding_bag backward) drift a little
            tol = 1e-6 if sh.device == "cpu" else 1e-2
            same = st.replays_train and abs(st.last_loss - m.get("loss", float("nan"))) <= tol * abs(st.last_loss)
            print(
                f"same work: last-step loss in-memory {st.last_loss:.6f} vs train() {m.get('loss', float('nan')):.6f}"
                f" -> {'same batches and numerics' if same else 'DIFFERENT (see the pool note in 1)'}",
                flush=True,
            )
            rows += [
                ("train from cache / in-memory step", f"{ratio:.3f}  (target >= 0.9)"),
                ("  same, median steps / CPU per step", f"{med:.3f} / {cpu_ratio:.3f}"),
            ]

    if "sweep" not in args.skip:
        grid = [(e, k) for e in args.sweep_expansion for k in args.sweep_k]
        print(
            f"\n== 3. sweep of {len(grid)} SAEs (expansion x k = {grid}): one pass vs one after another ==", flush=True
        )
        sws: list[TrainResult] = []
        seps: list[list[TrainResult]] = [[] for _ in grid]
        for r in range(args.repeats):  # one pass, then the same configs one after another; alternating
            sws.append(
                run_train(
                    [base_config(args, str(tmp / f"sweep{r}-x{e}-k{k}"), expansion_factor=e, k=k) for e, k in grid],
                    sh.device,
                )
            )
            for i, (e, k) in enumerate(grid):
                seps[i].append(
                    run_train([base_config(args, str(tmp / f"alone{r}-x{e}-k{k}"), expansion_factor=e, k=k)], sh.device)
                )
            if args.repeats > 1:
                print(
                    f"# repeat {r + 1}/{args.repeats}: one pass {sws[-1].wall_s:.2f} s (CPU share "
                    f"{sws[-1].cpu_share:.2f}), separately {sum(x[-1].wall_s for x in seps):.2f} s (CPU shares "
                    f"{', '.join(f'{x[-1].cpu_share:.2f}' for x in seps)})",
                    flush=True,
                )
        sw = min(sws, key=lambda x: x.wall_s)
        sep = [min(x, key=lambda y: y.wall_s) for x in seps]
        print_train(sw, f"one pass, {len(grid)} SAEs{best}")
        for (e, k), x in zip(grid, sep):
            print(
                f"alone x{e} k{k}{best}: wall {x.wall_s:6.2f} s (setup {x.setup_s:.2f}, first batch "
                f"{x.first_batch_s:.2f}, step 0 {x.step0_s:.2f}, loop {x.loop_s:.2f}: steps {x.step_in_loop_s:.2f} "
                f"+ waits {x.wait_in_loop_s:.2f}, tail {x.tail_s:.2f}, evals {x.eval_s:.2f}; CPU {x.cpu_s:.2f} s, "
                f"share {x.cpu_share:.2f})",
                flush=True,
            )
        sep_wall = sum(r.wall_s for r in sep)
        sep_cpu = sum(r.cpu_s for r in sep)
        sep_noeval = sum(r.wall_s - r.eval_s for r in sep)
        print(
            f"wall: one pass {sw.wall_s:.2f} s, separately {sep_wall:.2f} s -> ratio sweep/separate "
            f"{sw.wall_s / sep_wall:.3f}  (target <= 0.5 when reading the cache dominates)"
        )
        print(
            f"wall without held-out evaluations: one pass {sw.wall_s - sw.eval_s:.2f} s, separately "
            f"{sep_noeval:.2f} s -> ratio {(sw.wall_s - sw.eval_s) / sep_noeval:.3f}"
        )
        print(
            f"CPU time: one pass {sw.cpu_s:.2f} s, separately {sep_cpu:.2f} s -> ratio {sw.cpu_s / sep_cpu:.3f}  "
            f"(less sensitive to light load; heavy load inflates it too: OpenMP threads spin)"
        )
        shares = [sw.cpu_share] + [x.cpu_share for x in sep]
        if max(shares) - min(shares) > 0.15:
            print(
                f"  (CPU shares range {min(shares):.2f}..{max(shares):.2f}: other load skewed the wall times; "
                f"trust the CPU-time ratio more, or use --repeats)"
            )
        rows += [
            (
                "sweep wall, one pass / separate",
                f"{sw.wall_s:.2f} / {sep_wall:.2f} s = {sw.wall_s / sep_wall:.3f}  (target <= 0.5 if data-bound)",
            ),
            ("sweep CPU time, one pass / separate", f"{sw.cpu_s:.2f} / {sep_cpu:.2f} s = {sw.cpu_s / sep_cpu:.3f}"),
        ]

        # what dominates: the data path alone vs the SAE compute alone
        print("\n-- what dominates: data vs SAE compute --", flush=True)
        ds = min((measure_stream(sh, cfg, args.steps) for _ in range(args.repeats)), key=lambda x: x.total_s)
        rest_mean = statistics.mean(ds.rest_s) if ds.rest_s else 0.0
        print(
            f"MinibatchStream alone, {ds.n_batches} batches (+ .float(), index_select, as the loop){best}: "
            f"{ds.total_s:.2f} s = first batch {ds.first_s:.2f} s (first round read) + "
            f"{1e3 * rest_mean:.1f} ms per later batch  (CPU share {ds.cpu_share:.2f})"
        )
        round_chunks = min(args.round_chunks, len(sh.train_chunks))
        per_round = round_chunks * lay.chunk_tokens / args.batch_tokens
        steady = ds.first_s / per_round + rest_mean
        print(
            f"  a round is {round_chunks} chunks = ~{per_round:.0f} batches: amortized over a long run, the data "
            f"path costs ~{1e3 * steady:.1f} ms per step (round read / batches per round + later batch)"
        )
        if st is not None:
            one_step, src = statistics.mean(st.step_s), "bare step of (1), mean"
        elif tr is not None:
            one_step, src = tr.step_in_loop_s / (tr.steps - 1), "in-loop _step of (2), mean"
        else:
            one_step, src = sw.step_in_loop_s / (sw.steps - 1) / len(grid), "the sweep's in-loop _step / SAEs"
        sweep_step = sw.step_in_loop_s / (sw.steps - 1)
        data, c_one, c_sweep = ds.total_s, one_step * args.steps, sweep_step * args.steps
        who = f"one x{args.expansion_factor} k{args.k} SAE" if st or tr else "one SAE (sweep average)"
        print(
            f"over {args.steps} steps: data alone {data:.2f} s vs SAE compute of {who} {c_one:.2f} s "
            f"({src} {1e3 * one_step:.1f} ms) -> data/compute {data / c_one:.3f}; "
            f"vs compute of the {len(grid)}-SAE sweep {c_sweep:.2f} s -> data/compute {data / c_sweep:.3f}"
        )
        print(
            f"long run, per step: data ~{1e3 * steady:.1f} ms vs one SAE's step {1e3 * one_step:.1f} ms -> "
            f"data/compute {steady / one_step:.3f}"
        )
        fixed = sum(r.setup_s + r.first_batch_s for r in sep)
        print(
            f"inside the sweep's loop: waiting for batches {sw.wait_in_loop_s:.2f} s "
            f"({sw.wait_in_loop_s / max(sw.loop_s, 1e-9):.1%} of the loop), _step {sw.step_in_loop_s:.2f} s; "
            f"setup + first round read: one pass {sw.setup_s + sw.first_batch_s:.2f} s, separately {fixed:.2f} s"
        )
        # one pass does the data work once and the compute of every SAE; separate runs do the data work n times
        bound = (data + c_sweep) / (len(grid) * data + c_sweep)
        dominant = "SAE compute" if c_one > data else "reading the cache"
        print(
            f"-> on {sh.device}, for this cache and these shapes, {dominant} dominates (data alone is "
            f"{data / c_one:.0%} of one SAE's compute). Expected sweep/separate from these parts: "
            f"(data + compute of all) / ({len(grid)} x data + compute of all) = {bound:.2f}"
            + ("; a ratio <= 0.5 needs data to dominate" if bound > 0.5 and c_one > data else ""),
            flush=True,
        )
        rows += [
            (
                "data alone / compute (one SAE)",
                f"{data / c_one:.3f} over {args.steps} steps, {steady / one_step:.3f} amortized",
            ),
            ("expected sweep/separate from parts", f"{bound:.3f}"),
            ("dominant", dominant),
        ]

    print_summary(rows)


if __name__ == "__main__":
    main()
