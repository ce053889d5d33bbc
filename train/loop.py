"""The training loop: one pass over cache minibatches feeds one or more SAEs (a sweep), with
checkpoints that resume exactly, NaN guards, and data-parallel ranks under torchrun.

Per step and per SAE (method.md Sec. 2): forward (TopK, sparse decode, AuxK over dead latents) ->
loss = mean over layers of the minibatch FVU + aux_coef * AuxK -> backward -> gradients averaged over
ranks -> remove the decoder-parallel gradient -> Adam -> renormalize decoder rows -> update the
global dead-latent counters.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, TextIO

import torch

from harvest import open_cache
from harvest.atomic import atomic_write
from harvest.env import Dist, library_versions
from harvest.errors import SpecError, UserError
from harvest.models import resolve_device
from harvest.progress import progress_bar
from train.config import TrainConfig
from train.data import MinibatchStream, StreamState, split_chunks
from train.evaluate import evaluate
from train.objectives import DeadLatents, training_loss
from train.record import CacheRef, RunRecord, read_record
from train.sae import SaeConfig, TopKSae
from train.split import HeldOut

CHECKPOINT = "checkpoint.pt"
SHARED_FIELDS = (
    "cache",
    "tokens",
    "batch_tokens",
    "eval_tokens",
    "round_chunks",
    "include_special",
    "seed",
    "device",
    "prefetch",
)


class TrainingError(UserError):
    """The run cannot go on (NaN loss, inconsistent resume)."""


@dataclass
class Run:
    """One SAE of the pass, with everything it owns."""

    cfg: TrainConfig
    out: Path
    layer_idx: torch.Tensor  # rows of the minibatch's layer axis this SAE trains on
    layers: list[int]
    sae: TopKSae
    opt: torch.optim.Adam
    dead: DeadLatents
    lr: float
    fvu_initial: dict[str, Any] | None = None
    metrics: TextIO | None = None


def _lr(cfg: TrainConfig, n_latents: int) -> float:
    return 2e-4 / math.sqrt(n_latents / 2**14) if cfg.lr_scaling else cfg.lr


def _check_out(out: Path, record: RunRecord) -> str:
    """'new', 'resume' or 'done'; error if `out` holds another run or differing hyperparameters."""
    old = read_record(out)
    if old is None:
        if out.exists() and any(out.iterdir()):
            raise SpecError(f"{out} exists and holds no training run: choose another --out or remove it")
        return "new"
    mine, theirs = record.train.hyperparameters(), old.train.hyperparameters()
    diffs = [f"{k}: {theirs.get(k)!r} -> {v!r}" for k, v in mine.items() if theirs.get(k) != v]
    if old.cache.fingerprint != record.cache.fingerprint:
        diffs.insert(0, "cache fingerprint differs")
    if diffs:
        raise SpecError(
            f"{out} holds a run with other settings ({'; '.join(diffs[:4])}): resume with the same "
            f"settings, or choose another --out"
        )
    return "done" if old.finished else "resume"


def train(configs: list[TrainConfig], show_progress: bool = True, log: Callable[[str], None] = print) -> list[dict]:
    """Train every config in one pass over the cache; returns one summary per config."""
    configs = [c.validate() for c in configs]
    first = configs[0]
    for c in configs[1:]:
        bad = [f for f in SHARED_FIELDS if getattr(c, f) != getattr(first, f)]
        if bad:
            raise SpecError(f"the SAEs of one pass must share {', '.join(bad)}: run them separately")
    dist = Dist.init()
    try:
        return _train(configs, dist, show_progress and dist.rank == 0, log if dist.rank == 0 else lambda s: None)
    finally:
        dist.close()


def _all_reduce(t: torch.Tensor, dist: Dist, op: str = "sum") -> torch.Tensor:
    if dist.world_size > 1:
        import torch.distributed as tdist

        tdist.all_reduce(t, op={"sum": tdist.ReduceOp.SUM, "max": tdist.ReduceOp.MAX}[op])
    return t


def _train(configs: list[TrainConfig], dist: Dist, show_progress: bool, log: Callable[[str], None]) -> list[dict]:
    first = configs[0]
    cache = open_cache(first.cache)
    cache.require_complete()
    device = resolve_device(first.device)
    layers_of = [c.layer_list(cache.layers) for c in configs]
    union = sorted({l for ls in layers_of for l in ls})
    train_chunks, eval_chunks = split_chunks(cache, min(first.eval_tokens, cache.layout.n_tokens // 2))
    if first.batch_tokens % dist.world_size:
        raise SpecError(f"batch_tokens = {first.batch_tokens} must be divisible by the {dist.world_size} ranks")
    keep = cache.read_tokens("keep")
    train_tokens = sum(
        int(keep[slice(*cache.layout.chunk_range(c))].sum())
        if not first.include_special
        else len(range(*cache.layout.chunk_range(c)))
        for c in train_chunks
    )
    tokens = first.tokens or train_tokens
    steps = max(1, tokens // first.batch_tokens)
    if tokens > train_tokens:
        log(f"{tokens:,} training tokens from a training split of {train_tokens:,}: {tokens / train_tokens:.2f} epochs")
    if first.batch_tokens // dist.world_size > train_tokens:
        raise SpecError(
            f"batch_tokens = {first.batch_tokens} exceeds the {train_tokens:,} training tokens of the "
            f"cache: lower --batch-tokens or harvest more"
        )

    # -- the runs ----------------------------------------------------------------------------------
    runs: list[Run] = []
    start_step, stream_states = 0, None
    for cfg, layers in zip(configs, layers_of):
        out = Path(cfg.out or cfg.default_out())
        try:
            sae_cfg = SaeConfig.from_expansion(
                cache.layout.d_model,
                cfg.expansion_factor,
                cfg.k,
                k_aux=cfg.k_aux,
                aux_coef=cfg.aux_coef,
                dead_tokens=cfg.dead_tokens,
            )
        except ValueError as e:
            raise SpecError(f"{e}: lower -k or raise --expansion-factor")
        lr = _lr(cfg, sae_cfg.n_latents)
        record = RunRecord(
            dir=out,
            train=cfg,
            sae=sae_cfg,
            layers=layers,
            cache=CacheRef.of(cache, cfg.cache),
            heldout=HeldOut.legacy(eval_chunks, sum(b - a for a, b in map(cache.layout.chunk_range, eval_chunks))),
            special_tokens="include-real" if cfg.include_special else "cache",
            steps=steps,
            lr_effective=lr,
            world_size=dist.world_size,
            versions=library_versions(),
        )
        state = _check_out(out, record)
        if state == "done":
            log(f"{out}: already finished (summary.json); remove it to train again")
            continue
        gen = torch.Generator().manual_seed(cfg.seed)
        sae = TopKSae(sae_cfg, device=device, generator=gen)
        opt = torch.optim.Adam(sae.parameters(), lr=lr, betas=(0.9, 0.999), eps=6.25e-10, fused=True)
        run = Run(
            cfg,
            out,
            torch.tensor([union.index(l) for l in layers], device=device),
            layers,
            sae,
            opt,
            DeadLatents(sae_cfg.n_latents, cfg.dead_tokens, device),
            lr,
        )
        if state == "resume" and (out / CHECKPOINT).is_file():
            ck = torch.load(out / CHECKPOINT, map_location=device, weights_only=False)
            sae.load_state_dict(ck["sae"])
            opt.load_state_dict(ck["opt"])
            run.dead.load_state_dict(ck["dead"])
            run.fvu_initial = ck["fvu_initial"]
            if len(ck["stream"]) != dist.world_size:
                raise TrainingError(
                    f"{out} was checkpointed with {len(ck['stream'])} ranks: resume with the same number of ranks"
                )
            if runs and (ck["step"] != start_step):
                raise TrainingError(
                    "the runs of this sweep were checkpointed at different steps: resume them separately"
                )
            start_step, stream_states = ck["step"], ck["stream"]
        elif runs and start_step:
            raise TrainingError(
                f"{out} is new but other runs of this sweep resume at step {start_step}: resume them separately"
            )
        if dist.rank == 0:
            out.mkdir(parents=True, exist_ok=True)
            record.save()
            if start_step == 0:
                (out / "metrics.jsonl").write_text("")
            run.metrics = open(out / "metrics.jsonl", "a")  # noqa: SIM115 (open for the whole run)
        runs.append(run)
    if not runs:
        return []

    per_rank = first.batch_tokens // dist.world_size
    stream = MinibatchStream(
        cache,
        train_chunks,
        union,
        per_rank,
        first.round_chunks,
        device,
        seed=first.seed,
        rank=dist.rank,
        world_size=dist.world_size,
        include_special=first.include_special,
        prefetch=first.prefetch,
    )
    if stream_states is not None:
        stream.state = StreamState(**stream_states[dist.rank])
    log(
        f"training {len(runs)} SAE(s) on {cache.path}: {steps:,} steps of {first.batch_tokens:,} tokens, layers "
        f"{union if len(union) < 8 else f'{union[0]}..{union[-1]}'}, {len(eval_chunks)} held-out chunks, {device}"
        + (f"; resuming at step {start_step}" if start_step else "")
    )

    autocast = (
        torch.autocast("cuda", dtype=torch.bfloat16)
        if device.startswith("cuda")
        else torch.autocast("cpu", enabled=False)
    )
    # throughput counts from the end of this session's first step: b_pre init, the initial held-out
    # evaluation and the first round read are one-off costs, not the training rate
    t0, tokens_at_t0 = time.time(), start_step * first.batch_tokens
    batches = iter(stream)
    bar_args = {"enabled": show_progress, "completed": start_step, "fields": {"loss": ".4f"}, "rate_unit": "tok/s"}
    with progress_bar("train", steps, "steps", **bar_args) as bar:
        for step in range(start_step, steps):
            batch = next(batches)
            x_all = batch.acts.float()
            for run in runs:
                x = x_all.index_select(0, run.layer_idx)
                if step == 0:
                    _init_b_pre(run, x, dist)
                    run.fvu_initial = (
                        evaluate(run.sae, cache, eval_chunks, run.layers, device, run.cfg.include_special)
                        if dist.rank == 0
                        else None
                    )
                parts = _step(run, x, step, autocast, dist)
                if dist.rank == 0 and (step % run.cfg.log_every == 0 or step == steps - 1):
                    rate = (step + 1) * first.batch_tokens - tokens_at_t0
                    run.metrics.write(
                        json.dumps(
                            {
                                "step": step,
                                "tokens": (step + 1) * first.batch_tokens,
                                "loss": parts[0],
                                "fvu": parts[1],
                                "fvu_per_layer": parts[2],
                                "auxk": parts[3],
                                "dead_fraction": run.dead.fraction,
                                "lr": run.opt.param_groups[0]["lr"],
                                "tokens_per_s": rate / max(time.time() - t0, 1e-9),
                            }
                        )
                        + "\n"
                    )
                    run.metrics.flush()
            done = step + 1
            if step == start_step and steps - start_step > 1:
                t0, tokens_at_t0 = time.time(), done * first.batch_tokens
            if done % first.checkpoint_every == 0 or done == steps:
                _checkpoint(runs, done, stream, dist)
            bar.advance(1, rate_amount=first.batch_tokens, loss=parts[0])

    # -- held-out evaluation and outputs --------------------------------------------------------------
    summaries = []
    seconds = time.time() - t0  # the training steps after this session's first one
    for run in runs:
        if dist.rank != 0:
            continue
        final = evaluate(run.sae, cache, eval_chunks, run.layers, device, run.cfg.include_special)
        run.sae.save(run.out)
        summary = {
            "out": str(run.out),
            "layers": run.layers,
            "steps": steps,
            "tokens": steps * first.batch_tokens,
            "seconds_training": seconds,
            "tokens_per_s": (steps * first.batch_tokens - tokens_at_t0) / max(seconds, 1e-9),
            "held_out_initial": run.fvu_initial,
            "held_out": final,
        }
        (run.out / "summary.json").write_text(json.dumps(summary, indent=1))
        run.metrics.close()
        summaries.append(summary)
    dist.barrier()
    return summaries


@torch.no_grad()
def _init_b_pre(run: Run, x: torch.Tensor, dist: Dist) -> None:
    """Geometric median of the first batch's standardized vectors (rank 0's batch under DDP)."""
    run.sae.init_b_pre(x)
    if dist.world_size > 1:
        import torch.distributed as tdist

        tdist.broadcast(run.sae.b_pre.data, src=0)


def _step(run: Run, x: torch.Tensor, step: int, autocast: Any, dist: Dist) -> tuple[float, float, list, float]:
    sae, cfg = run.sae, run.cfg
    dead_mask = run.dead.mask
    with autocast:
        out = sae(x, dead_mask=dead_mask if bool(dead_mask.any()) else None)
    parts = training_loss(x, out, cfg.aux_coef)
    finite = torch.isfinite(parts.loss).float()
    if _all_reduce(finite.clone(), dist).item() < dist.world_size:
        raise TrainingError(
            f"{run.out}: the loss became {parts.loss.item()} at step {step}; the last good "
            f"checkpoint is kept in {run.out / CHECKPOINT}: lower --lr or check the cache "
            f"(harvest verify)"
        )
    run.opt.zero_grad(set_to_none=True)
    parts.loss.backward()
    if dist.world_size > 1:
        for p in sae.parameters():
            _all_reduce(p.grad, dist).div_(dist.world_size)
    sae.remove_parallel_grads_()
    if cfg.warmup_steps:
        for g in run.opt.param_groups:
            g["lr"] = run.lr * min(1.0, (step + 1) / cfg.warmup_steps)
    run.opt.step()
    sae.renormalize_decoder_()
    fired = DeadLatents.fired(out.values, out.indices, sae.cfg.n_latents)
    fired = _all_reduce(fired.to(torch.int32), dist, "max").bool()
    run.dead.update(fired, x.shape[1] * dist.world_size)
    stats = torch.stack([parts.loss.detach(), parts.fvu.detach(), parts.auxk.detach().float()])
    stats = (_all_reduce(stats, dist) / dist.world_size).tolist()
    per_layer = (_all_reduce(parts.fvu_per_layer.detach().clone(), dist) / dist.world_size).tolist()
    return stats[0], stats[1], per_layer, stats[2]


def _checkpoint(runs: list[Run], step: int, stream: MinibatchStream, dist: Dist) -> None:
    """All ranks' stream states go into every run's checkpoint, written by rank 0, atomically."""
    states: list[Any] = [stream.state.to_dict()]
    if dist.world_size > 1:
        import torch.distributed as tdist

        states = [None] * dist.world_size
        tdist.all_gather_object(states, stream.state.to_dict())
    if dist.rank == 0:
        for run in runs:
            ck = {
                "step": step,
                "sae": run.sae.state_dict(),
                "opt": run.opt.state_dict(),
                "dead": run.dead.state_dict(),
                "stream": states,
                "fvu_initial": run.fvu_initial,
            }
            atomic_write(run.out / CHECKPOINT, lambda p, ck=ck: torch.save(ck, p))
    dist.barrier()
