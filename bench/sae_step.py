"""SAE training-step benchmark, run by hand: prints numbers, asserts nothing (not part of the test suite).

    python bench/sae_step.py [--d-model 640] [--n-latents 5120] [-k 32] [--vectors 4096] [--layers 8]
                             [--dead 0,0.01,0.1] [--steps 5] [--repeats 5] [--device auto|cpu|cuda]
                             [--breakdown]

Measures vectors/s of ONE full training step on in-memory tensors: forward (standardize, encoder matmul,
TopK, sparse decode, AuxK over the dead latents), loss (per-layer FVU + AuxK), backward,
remove_parallel_grads_, Adam (lr 1e-4, eps 6.25e-10), renormalize_decoder_, dead-latent bookkeeping.
A batch is --layers x (vectors / layers) tokens, like an MLSAE minibatch. Dead latents are forced: a
fixed random subset of each listed fraction is passed as dead, so AuxK runs every step.
Each configuration runs --repeats timed blocks of --steps steps (after a warm-up); the best block is
reported with the median, because other processes may share the CPU.
On CUDA (when available) the forward and loss run under bf16 autocast (only the encoder matmul and
the AuxK products actually run in bf16; the sparse decode stays fp32).
"""

from __future__ import annotations

import sys
from pathlib import Path

_BENCH_DIR = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _BENCH_DIR]
sys.path.insert(0, str(_BENCH_DIR.parent))

import argparse  # noqa: E402
import contextlib  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402

from bench.common import sync  # noqa: E402
from train.objectives import DeadLatents, training_loss  # noqa: E402
from train.sae import SaeConfig, TopKSae  # noqa: E402


def synthetic_batch(n_layers: int, n_tokens: int, d: int, device: str, gen: torch.Generator) -> torch.Tensor:
    """Sparse combinations of a random dictionary plus an offset and noise: TopK has real structure to
    find (the cost of TopK and of the sparse ops does not depend on it much)."""
    n_atoms, active = 4 * d, 16
    atoms = torch.randn(n_atoms, d, generator=gen)
    idx = torch.randint(0, n_atoms, (n_layers * n_tokens, active), generator=gen)
    coef = torch.rand(n_layers * n_tokens, active, generator=gen) * 3
    x = torch.nn.functional.embedding_bag(idx, atoms, per_sample_weights=coef, mode="sum")
    x += 0.1 * torch.randn(x.shape, generator=gen) + torch.randn(d, generator=gen)
    return x.view(n_layers, n_tokens, d).to(device)


def make_step(
    sae: TopKSae,
    opt: torch.optim.Optimizer,
    tracker: DeadLatents,
    dead_mask: torch.Tensor | None,
    device: str,
    timers: dict[str, float] | None = None,
):
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if device == "cuda" else contextlib.nullcontext()

    def lap(name: str, t0: float) -> float:
        if timers is None:
            return t0
        sync(device)
        t = time.perf_counter()
        timers[name] = timers.get(name, 0.0) + t - t0
        return t

    def step(x: torch.Tensor) -> float:
        t = time.perf_counter() if timers is not None else 0.0
        with amp:
            out = sae(x, dead_mask)
            t = lap("forward", t)
            parts = training_loss(x, out, sae.cfg.aux_coef)
        t = lap("loss", t)
        opt.zero_grad(set_to_none=True)
        parts.loss.backward()
        t = lap("backward", t)
        sae.remove_parallel_grads_()
        opt.step()
        sae.renormalize_decoder_()
        t = lap("optimizer", t)
        tracker.update(DeadLatents.fired(out.values, out.indices, sae.cfg.n_latents), x.shape[1])
        lap("bookkeeping", t)
        return parts.fvu.item()

    return step


def bench(args, device: str, dead_frac: float) -> None:
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    cfg = SaeConfig(d_model=args.d_model, n_latents=args.n_latents, k=args.k)
    sae = TopKSae(cfg, device=device, generator=gen)
    n_tokens = args.vectors // args.layers
    batches = [synthetic_batch(args.layers, n_tokens, args.d_model, device, gen) for _ in range(2)]
    sae.init_b_pre(batches[0])
    # fused Adam: one kernel over all parameters (CPU and CUDA); the for-loop default took ~20 ms here
    opt = torch.optim.Adam(sae.parameters(), lr=1e-4, eps=6.25e-10, betas=(0.9, 0.999), fused=True)
    tracker = DeadLatents(cfg.n_latents, cfg.dead_tokens, device)
    n_dead = round(dead_frac * cfg.n_latents)
    dead_mask = None
    if n_dead:
        dead_mask = torch.zeros(cfg.n_latents, dtype=torch.bool, device=device)
        dead_mask[torch.randperm(cfg.n_latents, generator=gen)[:n_dead].to(device)] = True

    step = make_step(sae, opt, tracker, dead_mask, device)
    for i in range(2):  # warm-up
        step(batches[i % 2])
    sync(device)
    rates = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        for i in range(args.steps):
            step(batches[i % 2])
        sync(device)
        rates.append(args.steps * args.vectors / (time.perf_counter() - t0))
    print(
        f"{device:5s} dead={n_dead:5d} ({dead_frac:5.1%})  best {max(rates):9,.0f} vectors/s  "
        f"median {statistics.median(rates):9,.0f}  ({1e3 * args.vectors / max(rates):6.1f} ms/step)",
        flush=True,
    )

    if args.breakdown:
        timers: dict[str, float] = {}
        tstep = make_step(sae, opt, tracker, dead_mask, device, timers)
        best: dict[str, float] = {}
        for _ in range(args.repeats):
            timers.clear()
            for i in range(args.steps):
                tstep(batches[i % 2])
            for k, v in timers.items():
                best[k] = min(best.get(k, float("inf")), v / args.steps)
        print("      per step (best block): " + ", ".join(f"{k} {1e3 * v:.1f} ms" for k, v in best.items()))


def encoder_matmul_ceiling(args, device: str) -> None:
    """The one dense op alone: [vectors, d] @ [d, n_latents]."""
    x = torch.randn(args.vectors, args.d_model, device=device)
    W = torch.randn(args.n_latents, args.d_model, device=device)
    out = torch.empty(args.vectors, args.n_latents, device=device)
    dtypes = [torch.float32] + ([torch.bfloat16] if device == "cuda" else [])
    for dt in dtypes:
        xd, Wd, od = x.to(dt), W.to(dt), out.to(dt)
        torch.matmul(xd, Wd.t(), out=od)
        best = float("inf")
        for _ in range(args.repeats * 2):
            sync(device)
            t0 = time.perf_counter()
            torch.matmul(xd, Wd.t(), out=od)
            sync(device)
            best = min(best, time.perf_counter() - t0)
        print(
            f"{device:5s} encoder matmul alone ({str(dt).removeprefix('torch.')}): {1e3 * best:.1f} ms "
            f"-> ceiling {args.vectors / best:,.0f} vectors/s",
            flush=True,
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--d-model", type=int, default=640)
    ap.add_argument("--n-latents", type=int, default=5120)
    ap.add_argument("-k", type=int, default=32)
    ap.add_argument("--vectors", type=int, default=4096, help="vectors per step (tokens x layers)")
    ap.add_argument(
        "--layers", type=int, default=8, help="layers per minibatch (the batch is [layers, vectors/layers, d])"
    )
    ap.add_argument("--dead", default="0,0.01,0.05,0.1", help="comma-separated fractions of forced-dead latents")
    ap.add_argument("--steps", type=int, default=5, help="steps per timed block")
    ap.add_argument("--repeats", type=int, default=5, help="timed blocks; best and median reported")
    ap.add_argument("--device", default="auto", help="auto (cpu, and cuda when available) | cpu | cuda")
    ap.add_argument("--breakdown", action="store_true", help="also time forward/loss/backward/optimizer (synced)")
    args = ap.parse_args()
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else []) if args.device == "auto" else [args.device]
    print(
        f"d={args.d_model} n_latents={args.n_latents} k={args.k} vectors/step={args.vectors} "
        f"({args.layers} layers); torch {torch.__version__}, {torch.get_num_threads()} CPU threads"
    )
    for device in devices:
        encoder_matmul_ceiling(args, device)
        for frac in (float(f) for f in args.dead.split(",")):
            bench(args, device, frac)


if __name__ == "__main__":
    main()
