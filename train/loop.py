"""The training loop: one pass over cache minibatches feeds one or more SAEs (a sweep), with
checkpoints that resume exactly, NaN guards, and data-parallel ranks under torchrun.

    setup      cache, held-out windows, special tokens, step count; per SAE its run folder (locked),
               record, SAE, optimizer and resume state (_setup, _open_run)
    each step  one minibatch; per SAE: [first step: b_pre + initial held-out evaluation] -> _step -> log;
               then the evaluation and checkpoint cadences
    finish     final held-out evaluation, weights, summary.json, heldout.csv / heldout.png

Per step and per SAE (_step, docs/method.md Sec. 2): forward (TopK, sparse decode, AuxK over dead latents) ->
loss = mean over layers of the minibatch FVU + aux_coef * AuxK -> backward -> gradients averaged over
ranks -> remove the decoder-parallel gradient -> Adam at the step's learning rate (_lr_at) ->
renormalize decoder rows -> update the global dead-latent counters.
"""

from __future__ import annotations

import math
import time
from contextlib import ExitStack
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import torch

from harvest import Cache, open_cache
from harvest.atomic import atomic_write_json
from harvest.cache import LOCK_KEY
from harvest.env import Dist, library_versions
from harvest.errors import SpecError, UserError
from harvest.lock import Lock, exclusive
from harvest.memory import require
from harvest.models import resolve_device
from harvest.progress import progress_bar
from train.checkpoint import Checkpoint
from train.config import TrainConfig
from train.data import MinibatchStream, StreamState, count_guard_tokens, count_training_tokens
from train.evaluate import evaluate, read_metrics, write_heldout_curve
from train.logging import RunLogger, StepMetrics, open_logger
from train.objectives import FIRE_THRESHOLD, DeadLatents, training_loss
from train.record import CHECKPOINT, METRICS, SUMMARY, CacheRef, RunRecord, read_record
from train.sae import SaeConfig, TopKSae
from train.special import SpecialTokens
from train.split import HeldOut, choose_heldout

SHARED_FIELDS = (
    "cache",
    "tokens",
    "batch_tokens",
    "eval_tokens",
    "heldout_seed",
    "round_chunks",
    "special_tokens",
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
    record: RunRecord  # its config.json
    layer_idx: torch.Tensor  # rows of the minibatch's layer axis this SAE trains on
    sae: TopKSae
    opt: torch.optim.Adam
    dead: DeadLatents
    resume: Checkpoint | None  # the state it resumes from, None when it starts fresh
    fvu_initial: dict[str, Any] | None = None
    logger: RunLogger | None = None  # rank 0 only
    lock: Lock | None = None  # rank 0 only: this process is the folder's one writer

    @property
    def out(self) -> Path:
        return self.record.dir

    @property
    def layers(self) -> list[int]:
        return self.record.layers


@dataclass
class Pass:
    """What every SAE of the pass shares, fixed by setup."""

    cache: Cache
    device: str
    heldout: HeldOut
    special: SpecialTokens
    layers: list[int]  # the union of the runs' layers: the minibatch's layer axis
    steps: int
    batch_tokens: int
    train_tokens: int = 0  # the training split: tokens one epoch trains on
    guard_tokens: int = 0  # tokens of the guard windows (sharing a document with held-out text): not trained on
    runs: list[Run] = field(default_factory=list)
    start_step: int = 0

    def evaluate(self, run: Run) -> dict[str, Any]:
        return evaluate(run.sae, self.cache, self.heldout, run.layers, self.device, self.special.mode).to_dict()


class Throughput:
    """Training tokens per second of this session, from the end of its first step (b_pre, the initial
    evaluation and the first round read are one-off costs) and without the time spent evaluating."""

    def __init__(self, tokens: int):
        self.t0, self.tokens0, self.paused_s = time.time(), tokens, 0.0

    def restart(self, tokens: int) -> None:
        self.t0, self.tokens0, self.paused_s = time.time(), tokens, 0.0

    def seconds(self) -> float:
        return max(time.time() - self.t0 - self.paused_s, 1e-9)

    def rate(self, tokens: int) -> float:
        return (tokens - self.tokens0) / self.seconds()


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
        with ExitStack() as locks:
            return _train(configs, dist, locks, show_progress and dist.rank == 0, log if dist.rank == 0 else _quiet)
    finally:
        dist.close()


def _quiet(_: str) -> None:
    pass


def _train(
    configs: list[TrainConfig], dist: Dist, locks: ExitStack, show_progress: bool, log: Callable[[str], None]
) -> list[dict]:
    p = _setup(configs, dist, locks, log)
    if not p.runs:
        return []
    stream = _stream(p, configs[0], dist)
    autocast = _autocast(p.device)
    clock = Throughput(p.start_step * p.batch_tokens)
    batches = iter(stream)
    bar_args = {"enabled": show_progress, "completed": p.start_step, "fields": {"loss": ".4f"}, "rate_unit": "tok/s"}
    # steps after which every SAE is evaluated and saved under snapshots/ (the last step: the run itself)
    snapshots = {t // p.batch_tokens for t in configs[0].snapshot_list() if 0 < t // p.batch_tokens < p.steps}
    with progress_bar("train", p.steps, "steps", **bar_args) as bar:
        for step in range(p.start_step, p.steps):
            x_all = next(batches).acts.float()
            for run in p.runs:
                x = x_all.index_select(0, run.layer_idx)
                if step == 0:
                    _first_batch(run, x, p, dist)
                metrics = _step(run, x, step, autocast, dist)
                if _due(step, run.cfg.log_every) or step == p.steps - 1:
                    _log_step(run, metrics, step, p, clock)
            done = step + 1
            if step == p.start_step and p.steps - p.start_step > 1:
                clock.restart(done * p.batch_tokens)
            if done in snapshots:
                _snapshot_all(p, dist, done, clock)
            elif configs[0].eval_every and done % configs[0].eval_every == 0 and done < p.steps:
                _evaluate_all(p, dist, done, clock)
            if done % configs[0].checkpoint_every == 0 or done == p.steps:
                _checkpoint(p.runs, done, stream, dist)
            bar.advance(1, rate_amount=p.batch_tokens, loss=metrics.loss)
    return _finish(p, dist, clock)


# ---------------------------------------------------------------------------------------------
# setup: everything decided once, before the first step


def _setup(configs: list[TrainConfig], dist: Dist, locks: ExitStack, log: Callable[[str], None]) -> Pass:
    """The pass and its runs: folders locked and checked, records written, resume states loaded."""
    p = _plan(configs, dist, log)
    _check_memory(configs, p, dist)
    for cfg in configs:
        run = _open_run(cfg, cfg.layer_list(p.cache.layers), p, dist, locks, log)
        if run is None:
            continue
        step = run.resume.step if run.resume else 0
        if p.runs and step != p.start_step:
            raise TrainingError(
                f"{run.out} would start at step {step}, the other runs of this sweep at step {p.start_step}: "
                f"resume them separately"
            )
        p.start_step = step
        p.runs.append(run)
    dist.run_on_rank0(lambda: _start_writing(p.runs))
    if p.runs:
        log(
            f"training {len(p.runs)} SAE(s) on {p.cache.location}: {p.steps:,} steps of {p.batch_tokens:,} tokens, "
            f"layers {p.layers if len(p.layers) < 8 else f'{p.layers[0]}..{p.layers[-1]}'}, held out: "
            f"{p.heldout.describe()}, special tokens: {p.special.mode}, {p.device}"
            + (f"; resuming at step {p.start_step}" if p.start_step else "")
        )
    return p


def sae_config(cfg: TrainConfig, d_model: int) -> SaeConfig:
    """The SAE a config trains on vectors of width d_model; SpecError if its k does not fit."""
    try:
        return SaeConfig.from_expansion(
            d_model, cfg.expansion_factor, cfg.k, k_aux=cfg.k_aux, aux_coef=cfg.aux_coef, dead_tokens=cfg.dead_tokens
        )
    except ValueError as e:
        raise SpecError(f"{e}: lower -k or raise --expansion-factor")


def training_bytes(configs: list[TrainConfig], p: Pass, world_size: int = 1) -> int:
    """What a pass allocates on its device, estimated from the shapes before anything is allocated: per SAE
    its weights, their gradients and Adam's two moments (float32), the pre-activation chunk, and one batch's
    activations and TopK results; shared, the shuffle buffer of two rounds of chunks and the batch."""
    layout, d = p.cache.layout, p.cache.layout.d_model
    per_rank = p.batch_tokens // world_size
    need = 0
    for cfg in configs:
        n_latents, layers = sae_config(cfg, d).n_latents, len(cfg.layer_list(p.cache.layers))
        need += 16 * (2 * n_latents * d + d) + 8 * n_latents  # weights, gradients, Adam moments; dead counters
        need += min(n_latents * per_rank * layers, 2**25) * 4  # the encoder's pre-activation chunk
        need += per_rank * layers * (4 * d * 4 + cfg.k * 12 * 3)  # x, x~, x_hat, their gradients; TopK
    itemsize = p.cache.dtype.itemsize
    round_chunks = min(configs[0].round_chunks, layout.n_chunks)  # as the stream caps it
    need += 2 * round_chunks * layout.chunk_tokens * len(p.layers) * d * itemsize  # this round and the next
    need += per_rank * len(p.layers) * d * 4  # the batch in float32
    return need


def _check_memory(configs: list[TrainConfig], p: Pass, dist: Dist) -> None:
    need = training_bytes(configs, p, dist.world_size)
    latents = max(c.expansion_factor for c in configs) * p.cache.layout.d_model
    what = f"training {len(configs)} SAE(s) of up to {latents:,} latents"
    lower = "--expansion-factor, --batch-tokens or --round-chunks"
    require(need, p.device, what, lower + (" (or train fewer SAEs at once)" if len(configs) > 1 else ""))


def _plan(configs: list[TrainConfig], dist: Dist, log: Callable[[str], None]) -> Pass:
    """What the SAEs of a pass share: the cache, held-out windows, special tokens, layers, steps."""
    first = configs[0]
    cache = open_cache(first.cache, first.local_cache or None)
    cache.require_complete()
    if first.batch_tokens % dist.world_size:
        raise SpecError(f"batch_tokens = {first.batch_tokens} must be divisible by the {dist.world_size} ranks")
    heldout = choose_heldout(cache, first.eval_tokens, first.heldout_seed)
    special = SpecialTokens.of(first.special_tokens, cache)
    train_tokens = count_training_tokens(cache, special, heldout)
    guard_tokens = count_guard_tokens(cache, special, heldout)
    if heldout.windows:
        log(
            f"held-out set document-disjoint: {len(heldout.excluded_windows)} guard windows cost {guard_tokens:,} "
            f"training tokens ({guard_tokens / max(1, train_tokens + guard_tokens):.1%} of the training split)"
            if heldout.guards == "documents"
            else f"held-out set NOT document-disjoint ({heldout.guards})"
        )
    tokens = first.tokens or train_tokens
    if tokens > train_tokens:
        log(f"{tokens:,} training tokens from a training split of {train_tokens:,}: {tokens / train_tokens:.2f} epochs")
    if first.batch_tokens // dist.world_size > train_tokens:
        raise SpecError(
            f"batch_tokens = {first.batch_tokens} exceeds the {train_tokens:,} training tokens of the "
            f"cache: lower --batch-tokens or harvest more"
        )
    layers = sorted({l for c in configs for l in c.layer_list(cache.layers)})
    steps = max(1, tokens // first.batch_tokens)
    device = resolve_device(first.device)
    return Pass(cache, device, heldout, special, layers, steps, first.batch_tokens, train_tokens, guard_tokens)


def _start_writing(runs: list[Run]) -> None:
    """Rank 0, once every folder is checked and locked: the loggers (a tracker that cannot start stops
    here, before any work), then config.json."""
    for run in runs:
        run.out.mkdir(parents=True, exist_ok=True)
        log_to, project = run.cfg.log_to, run.cfg.log_project
        run.logger = open_logger(run.out, run.resume is None, log_to, project, run.record.to_json(), run.layers)
        run.record.save()


def _open_run(
    cfg: TrainConfig, layers: list[int], p: Pass, dist: Dist, locks: ExitStack, log: Callable[[str], None]
) -> Run | None:
    """One SAE: its folder locked and checked, its record, SAE, optimizer and checkpoint; None when done."""
    out = Path(cfg.out or cfg.default_out())
    if out.exists() and not out.is_dir():
        raise SpecError(f"--out {out} is a file: choose a folder")
    held: list[Lock | None] = []
    dist.run_on_rank0(lambda: held.append(locks.enter_context(exclusive(out, "train run"))))
    sae_cfg = sae_config(cfg, p.cache.layout.d_model)
    record = RunRecord(
        dir=out,
        train=cfg,
        sae=sae_cfg,
        layers=layers,
        cache=CacheRef.of(p.cache),
        heldout=p.heldout,
        special_tokens=p.special.mode,
        steps=p.steps,
        lr_effective=2e-4 / math.sqrt(sae_cfg.n_latents / 2**14) if cfg.lr_scaling else cfg.lr,
        world_size=dist.world_size,
        versions=library_versions(),
    )
    state = _check_out(out, record)
    if state == "done":
        log(f"{out}: already finished ({SUMMARY}); remove it to train again")
        return None
    run = _build_run(record, p)
    run.lock = held[0] if held else None
    run.resume = Checkpoint.load(out, p.device) if state == "resume" else None
    if run.resume is not None:
        _restore(run, run.resume, dist)
    return run


def _build_run(record: RunRecord, p: Pass) -> Run:
    """A fresh SAE (seeded: the same on any device), its optimizer and dead-latent counters."""
    cfg = record.train
    sae = TopKSae(record.sae, device=p.device, generator=torch.Generator().manual_seed(cfg.seed))
    opt = torch.optim.Adam(sae.parameters(), lr=record.lr_effective, betas=(0.9, 0.999), eps=6.25e-10, fused=True)
    dead = DeadLatents(record.sae.n_latents, cfg.dead_tokens, p.device)
    layer_idx = torch.tensor([p.layers.index(l) for l in record.layers], device=p.device)
    return Run(cfg, record, layer_idx, sae, opt, dead, resume=None)


def _check_out(out: Path, record: RunRecord) -> str:
    """'new', 'resume' or 'done'; error if `out` holds another run or differing hyperparameters."""
    old = read_record(out)
    if old is None:
        if out.exists() and any(not f.name.startswith(LOCK_KEY) for f in out.iterdir()):
            raise SpecError(f"{out} exists and holds no training run: choose another --out or remove it")
        return "new"
    mine, theirs = record.train.hyperparameters(), old.train.hyperparameters()
    diffs = [f"{k}: {theirs.get(k)!r} -> {v!r}" for k, v in mine.items() if theirs.get(k) != v]
    if old.cache.fingerprint != record.cache.fingerprint:
        diffs.insert(0, "cache fingerprint differs")
    elif not old.finished and (old.heldout.windows, old.heldout.excluded_windows) != (
        record.heldout.windows,
        record.heldout.excluded_windows,
    ):
        diffs.insert(0, f"held-out windows or their guards differ ({old.heldout.describe()})")
    if diffs:
        raise SpecError(
            f"{out} holds a run with other settings ({'; '.join(diffs[:4])}): resume with the same "
            f"settings, or choose another --out"
        )
    return "done" if old.finished else "resume"


def _restore(run: Run, ck: Checkpoint, dist: Dist) -> None:
    if len(ck.stream) != dist.world_size:
        raise TrainingError(
            f"{run.out} was checkpointed with {len(ck.stream)} ranks: resume with the same number of ranks"
        )
    try:
        run.sae.load_state_dict(ck.sae)
        run.opt.load_state_dict(ck.opt)
        run.dead.load_state_dict(ck.dead)
    except (RuntimeError, KeyError, ValueError, TypeError) as e:
        raise TrainingError(
            f"{run.out / CHECKPOINT} does not fit this run's SAE ({str(e).splitlines()[0][:120]}): delete it to "
            f"restart the run from scratch"
        )
    run.fvu_initial = ck.fvu_initial
    if ck.run is not None and ck.run != run.record.binding():
        mine = run.record.binding()
        diff = sorted(k for k in set(mine) | set(ck.run) if mine.get(k) != ck.run.get(k))
        raise TrainingError(
            f"{run.out / CHECKPOINT} was written by a run whose {', '.join(diff)} differ from this one's (its "
            f"config.json was edited, or the checkpoint belongs to another run): restore config.json, or delete "
            f"{CHECKPOINT} to restart the run from scratch"
        )


def _stream(p: Pass, first: TrainConfig, dist: Dist) -> MinibatchStream:
    per_rank = p.batch_tokens // dist.world_size
    what = (p.cache, p.cache.complete_chunks(), p.layers, per_rank, first.round_chunks, p.device)
    how = {"seed": first.seed, "special": p.special, "prefetch": first.prefetch, "heldout": p.heldout}
    stream = MinibatchStream(*what, rank=dist.rank, world_size=dist.world_size, **how)
    resume = p.runs[0].resume
    if resume is not None:
        stream.state = StreamState(**resume.stream[dist.rank])
    return stream


def _autocast(device: str) -> Any:
    """On CUDA the encoder matmul runs in bfloat16 (sae.py keeps the rest in float32)."""
    if device.startswith("cuda"):
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


# ---------------------------------------------------------------------------------------------
# one step


def _all_reduce(t: torch.Tensor, dist: Dist, op: str = "sum") -> torch.Tensor:
    if dist.world_size > 1:
        import torch.distributed as tdist

        tdist.all_reduce(t, op={"sum": tdist.ReduceOp.SUM, "max": tdist.ReduceOp.MAX}[op])
    return t


def _first_batch(run: Run, x: torch.Tensor, p: Pass, dist: Dist) -> None:
    """Before the first step: b_pre from the first batch, then the held-out evaluation before training."""
    _init_b_pre(run, x, dist)
    run.fvu_initial = _evaluate(run, p, dist, 0)


@torch.no_grad()
def _init_b_pre(run: Run, x: torch.Tensor, dist: Dist) -> None:
    """Geometric median of the first batch's standardized vectors (rank 0's batch under DDP)."""
    run.sae.init_b_pre(x)
    if dist.world_size > 1:
        import torch.distributed as tdist

        tdist.broadcast(run.sae.b_pre.data, src=0)


def _lr_at(run: Run, step: int) -> float:
    """The learning rate of a step: the run's lr after a linear warm-up (no decay: the paper's schedule)."""
    if run.cfg.warmup_steps:
        return run.record.lr_effective * min(1.0, (step + 1) / run.cfg.warmup_steps)
    return run.record.lr_effective


@dataclass
class StepStats:
    """A step's minibatch numbers, averaged over ranks (what _log_step reports)."""

    loss: float
    fvu: float
    fvu_per_layer: list[float]
    auxk: float
    l0: float


def _step(run: Run, x: torch.Tensor, step: int, autocast: Any, dist: Dist) -> StepStats:
    sae = run.sae
    dead_mask = run.dead.mask
    with autocast:
        out = sae(x, dead_mask=dead_mask if bool(dead_mask.any()) else None)
    parts = training_loss(x, out, run.cfg.aux_coef)
    if _all_reduce(torch.isfinite(parts.loss).float(), dist).item() < dist.world_size:
        kept = run.out / CHECKPOINT
        where = f"the last good checkpoint is kept in {kept}" if kept.is_file() else "no checkpoint was written yet"
        raise TrainingError(
            f"{run.out}: the loss became {parts.loss.item()} at step {step}; {where}: lower --lr or check the "
            f"cache (harvest verify)"
        )
    run.opt.zero_grad(set_to_none=True)
    parts.loss.backward()
    if dist.world_size > 1:
        for param in sae.parameters():
            _all_reduce(param.grad, dist).div_(dist.world_size)
    sae.remove_parallel_grads_()
    if run.cfg.warmup_steps:
        for g in run.opt.param_groups:
            g["lr"] = _lr_at(run, step)
    run.opt.step()
    sae.renormalize_decoder_()
    fired = DeadLatents.fired(out.values, out.indices, sae.cfg.n_latents)
    fired = _all_reduce(fired.to(torch.int32), dist, "max").bool()
    run.dead.update(fired, x.shape[1] * dist.world_size)
    l0 = (out.values.detach() > FIRE_THRESHOLD).sum(-1).float().mean()
    stats = torch.stack([parts.loss.detach(), parts.fvu.detach(), parts.auxk.detach().float(), l0])
    loss, fvu, auxk, l0_mean = (_all_reduce(stats, dist) / dist.world_size).tolist()
    per_layer = (_all_reduce(parts.fvu_per_layer.detach().clone(), dist) / dist.world_size).tolist()
    return StepStats(loss, fvu, per_layer, auxk, l0_mean)


# ---------------------------------------------------------------------------------------------
# cadences: logging, evaluation, checkpoints


def _due(step: int, every: int) -> bool:
    return step % every == 0


def _log_step(run: Run, s: StepStats, step: int, p: Pass, clock: Throughput) -> None:
    if run.logger is None:
        return
    tokens = (step + 1) * p.batch_tokens
    dead = int(run.dead.mask.sum())
    run.logger.step(
        StepMetrics(
            step,
            tokens,
            s.loss,
            s.fvu,
            s.fvu_per_layer,
            s.auxk,
            s.l0,
            dead / run.sae.cfg.n_latents,
            dead,
            run.opt.param_groups[0]["lr"],
            clock.rate(tokens),
        )
    )


def _evaluate(run: Run, p: Pass, dist: Dist, step: int) -> dict[str, Any] | None:
    """Held-out metrics of one SAE after `step` steps (rank 0 only), logged."""
    if dist.rank != 0:
        return None
    result = p.evaluate(run)
    assert run.logger is not None
    run.logger.evaluation(step, step * p.batch_tokens, result)
    return result


def _evaluate_all(p: Pass, dist: Dist, step: int, clock: Throughput) -> None:
    t = time.time()
    for run in p.runs:
        _evaluate(run, p, dist, step)
    clock.paused_s += time.time() - t


SNAPSHOTS = "snapshots"


def _snapshot_all(p: Pass, dist: Dist, step: int, clock: Throughput) -> None:
    """Evaluate every SAE after `step` steps and save it as a loadable run folder
    <out>/snapshots/tokens-<n> (config.json with this step count, weights, summary.json)."""
    t = time.time()
    for run in p.runs:
        result = _evaluate(run, p, dist, step)
        if dist.rank != 0:
            continue
        folder = run.out / SNAPSHOTS / f"tokens-{step * p.batch_tokens:09d}"
        folder.mkdir(parents=True, exist_ok=True)
        replace(run.record, dir=folder, steps=step).save_with_weights(run.sae)  # bound like the run's own weights
        summary = {"out": str(folder), "snapshot_of": str(run.out), "layers": run.layers, "steps": step}
        summary |= {"tokens": step * p.batch_tokens, "held_out_initial": run.fvu_initial, "held_out": result}
        atomic_write_json(folder / SUMMARY, summary)
    clock.paused_s += time.time() - t


def _checkpoint(runs: list[Run], step: int, stream: MinibatchStream, dist: Dist) -> None:
    """All ranks' stream states go into every run's checkpoint, written by rank 0, atomically."""
    states: list[Any] = [stream.state.to_dict()]
    if dist.world_size > 1:
        import torch.distributed as tdist

        states = [None] * dist.world_size
        tdist.all_gather_object(states, stream.state.to_dict())

    def save() -> None:
        for run in runs:
            if run.lock is not None:
                run.lock.check()  # another process took the folder over (this one was suspended): stop writing
            ck = Checkpoint(
                step,
                run.sae.state_dict(),
                run.opt.state_dict(),
                run.dead.state_dict(),
                states,
                run.fvu_initial,
                run.record.binding(),
            )
            ck.save(run.out)

    dist.run_on_rank0(save)  # a failed write (full disk, lost lock) stops every rank with its one line


# ---------------------------------------------------------------------------------------------
# finish


def _finish(p: Pass, dist: Dist, clock: Throughput) -> list[dict]:
    """Final held-out evaluation, weights, summary.json and the held-out curve of every run (rank 0)."""
    summaries = []
    seconds = clock.seconds()  # the training steps after this session's first one
    tokens = p.steps * p.batch_tokens
    for run in p.runs if dist.rank == 0 else []:
        final = _evaluate(run, p, dist, p.steps)
        run.record.save_with_weights(run.sae)  # bound both ways: an edit of either is refused on load
        summary = {
            "out": str(run.out),
            "layers": run.layers,
            "steps": p.steps,
            "tokens": tokens,
            "seconds_training": seconds,
            "tokens_per_s": clock.rate(tokens),
            "held_out_initial": run.fvu_initial,
            "held_out": final,
            "heldout_split": {
                "windows": len(p.heldout.windows),
                "guard_windows": len(p.heldout.excluded_windows),
                "guards": p.heldout.guards,
                "guard_tokens": p.guard_tokens,  # training tokens the guards cost
                "training_split_tokens": p.train_tokens,
            },
        }
        assert run.logger is not None
        run.logger.close()
        write_heldout_curve(run.out, read_metrics(run.out / METRICS))
        atomic_write_json(run.out / SUMMARY, summary)
        summaries.append(summary)
    dist.barrier()
    return summaries
