"""The harvest: context windows -> one forward pass with hooks on every requested block -> cache blocks.

Each write block is a fixed set of context windows, permuted with a permutation seeded by (seed, block),
so the cache is the same whether it was written in one go, resumed after a kill, or split over ranks.
Writing happens on a background thread while the next block's forward passes run.
"""

from __future__ import annotations

import json
import queue
import shutil  # noqa: F401  (the tests fake a full disk through harvest.run.shutil.disk_usage)
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch

from . import float8
from .cache import (
    CACHE_NAMES,
    FLOAT16_MAX,
    LOCK_KEY,
    STORAGE_DTYPES,
    CacheWriter,
    Decoder,
    Layout,
    create_cache,
    location_state,
    open_cache,
    to_storage,
)
from .env import Dist, library_versions
from .errors import CacheError, NonFiniteError, SpecError, StorageError, human_bytes
from .lens import Lens, LensSource, resolve_lens
from .lock import Lock
from .models import (
    ModelSource,
    check_context,
    load_bridge,
    load_config,
    load_tokenizer,
    resolve_device,
    resolve_model,
)
from .progress import progress_bar
from .spec import CacheSpec, fingerprint
from .stats import LayerStats
from .store import Store, open_store
from .text import DatasetSource, Documents, adds_bos, read_windows, resolve_dataset, special_token_ids

TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# ---------------------------------------------------------------------------------------------
# forward pass


class _StopForward(Exception):
    """Raised by the last requested layer's hook: later blocks and the unembedding never run."""


def forward_layers(bridge: Any, ids: torch.Tensor, layers: list[int], hook: str) -> torch.Tensor:
    """Residuals [n_layers, batch, context, d] (float32) at blocks.{l}.hook_{hook}, stopping after the last."""
    out: list[torch.Tensor | None] = [None] * len(layers)

    def make(i: int) -> Callable:
        def fn(x: torch.Tensor, hook: Any) -> torch.Tensor:
            out[i] = x.detach().to(torch.float32, copy=True)
            if i == len(layers) - 1:
                raise _StopForward
            return x

        return fn

    try:
        with torch.inference_mode():
            bridge.run_with_hooks(
                ids, fwd_hooks=[(f"blocks.{l}.hook_{hook}", make(i)) for i, l in enumerate(layers)], return_type=None
            )
    except _StopForward:
        pass
    return torch.stack(out)  # type: ignore[arg-type]


def block_permutation(seed: int, block: int, n: int) -> np.ndarray:
    """perm[i] = block-local source position of the vector stored at block-local cache position i."""
    return np.random.default_rng([seed, block]).permutation(n)


# ---------------------------------------------------------------------------------------------
# one write block: computed on the main thread, written on a background thread


@dataclass
class Block:
    index: int
    acts: np.ndarray  # [n_layers, block_len, d] in the storage dtype, permuted into cache order
    tokens: dict[str, np.ndarray]  # the TOKEN_ARRAYS columns, in the same order
    stats: LayerStats


class BackgroundWriter:
    """One thread writing whole blocks while the next block is computed; errors surface on the caller.
    Leaving the `with` waits for the blocks already submitted."""

    def __init__(self, writer: CacheWriter):
        self.writer = writer
        self.queue: queue.Queue = queue.Queue(maxsize=1)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._loop, name="cache-writer", daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        while (block := self.queue.get()) is not None:
            if self.error is None:
                try:
                    self.writer.write_block(block.index, block.acts, block.tokens, block.stats)
                except BaseException as e:
                    self.error = e

    def _check(self) -> None:
        if self.error is not None:
            raise self.error

    def submit(self, block: Block) -> None:
        self._check()
        self.queue.put(block)

    def close(self) -> None:
        self.queue.put(None)
        self.thread.join()
        self._check()

    def __enter__(self) -> BackgroundWriter:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


# ---------------------------------------------------------------------------------------------
# setup: everything resolved and checked before any work


@dataclass
class HarvestPlan:
    """A validated spec with everything resolved from it: bad input has failed before one exists."""

    spec: CacheSpec
    out: Store  # where the cache is (a folder or a bucket prefix), locked by this job
    model: ModelSource
    config: Any  # the model's Hugging Face config
    tokenizer: Any
    data: DatasetSource
    lens: LensSource | None
    layers: list[int]
    prepend_bos: bool
    device: str
    identity: dict[str, Any]  # what the fingerprint hashes: the spec's data fields + model/data/lens identities
    fingerprint: str
    layout: Layout
    bridge: Any = None  # the model, once loaded (a float8 creation loads it for the scales; the harvest reuses it)

    def load_bridge(self) -> Any:
        if self.bridge is None:
            self.bridge = load_bridge(self.model, self.tokenizer, self.device, TORCH_DTYPES[self.spec.model_dtype])
        return self.bridge


def plan_harvest(spec: CacheSpec, dist: Dist, lock: Lock) -> HarvestPlan:
    """Take the lock of --out, then resolve and check every input, cheapest first; nothing is created but the
    lock (and a converted GGUF, a memo of weight hashes under MLSAE_HOME)."""

    def locked_resolve() -> ModelSource:  # the lock first: a second harvest of this --out stops here, naming
        lock.acquire()  # the holder (the lock object is written inside --out: it is also the write probe)
        return resolve_model(spec.model)  # rank 0 converts a GGUF and hashes the weights once

    model = dist.run_on_rank0(locked_resolve)
    if dist.rank != 0:
        model = resolve_model(spec.model)
    cfg = load_config(model)
    layers = spec.layer_list(cfg.num_hidden_layers)
    check_context(cfg, spec.context, spec.model)
    device = resolve_device(spec.device)
    data = resolve_dataset(spec.dataset)
    lens = resolve_lens(spec.lens, model.identity.get("hub_id"))
    if lens is not None:
        lens.load(cfg.hidden_size, cfg.num_hidden_layers)  # a lens for another model fails here, not later
    tokenizer = load_tokenizer(model)
    prepend_bos = {"auto": adds_bos(tokenizer), "always": True, "never": False}[spec.prepend_bos]
    identity = _json_safe(
        {
            **spec.identity(),
            "model_identity": model.identity,
            "dataset_identity": data.identity,
            "layers": layers,
            "prepend_bos": prepend_bos,
            "lens": "none" if lens is None else {"params_sha256": lens.sha256},  # its content, not its path
        }
    )
    same_names = {k: getattr(spec, k) for k in ("context", "dtype", "chunk_tokens", "shard_tokens", "compression")}
    n_tokens = spec.n_sequences() * spec.context
    layout = Layout(
        n_tokens, layers=tuple(layers), d_model=cfg.hidden_size, block_tokens=spec.shuffle_tokens, **same_names
    )
    return HarvestPlan(
        spec,
        lock.store,
        model,
        cfg,
        tokenizer,
        data,
        lens,
        layers,
        prepend_bos,
        device,
        identity,
        fingerprint(identity),
        layout,
    )


def _json_safe(obj: Any) -> Any:
    return json.loads(json.dumps(obj, default=str))


def _check_existing(out: Store, identity: dict[str, Any], fp: str) -> bool:
    """True if `out` is a cache of this spec (resume); error if it is anything else non-empty."""
    state = location_state(out)
    if state in ("absent", "partial"):
        return False
    if state == "foreign":
        raise CacheError(f"{out.location} exists and is not an mlsae cache: choose another --out or remove it")
    cache = open_cache(out)
    if cache.fingerprint != fp:
        old = cache.meta.get("identity", {})
        diffs = [f"{k}: {old.get(k)!r} -> {v!r}" for k, v in identity.items() if old.get(k) != v]
        raise CacheError(
            f"{out.location} holds a cache of a different spec ({'; '.join(diffs[:4]) or 'fingerprint differs'}): "
            f"use another --out, or remove the old cache to replace it"
        )
    return True


def _check_disk_space(out: Store, layout: Layout, remaining_tokens: int) -> None:
    per_token = layout.bytes_per_token() + 13  # + token_ids, keep, seq, pos
    need = remaining_tokens * per_token / (1.2 if layout.compression != "none" else 1.0)
    free = out.free_space()  # None on an object store
    if free is not None and need > free:
        raise StorageError(
            f"not enough disk space at {out.location}: the cache needs ~{human_bytes(need)}, "
            f"{human_bytes(free)} are free; free space, lower --tokens, or choose another --out"
        )


def _metadata(plan: HarvestPlan) -> dict[str, Any]:
    """The cache's zarr.json attributes (cache.py adds the format and layout)."""
    spec, cfg, tok = plan.spec, plan.config, plan.tokenizer
    return {
        "fingerprint": plan.fingerprint,
        "identity": plan.identity,
        "spec": spec.to_dict(),
        "model": {
            "name": plan.model.name,
            "path": plan.model.path,
            "identity": plan.model.identity,
            "architecture": (cfg.architectures or [type(cfg).__name__])[0],
            "n_layers": cfg.num_hidden_layers,
            "d_model": cfg.hidden_size,
            "config": _json_safe(cfg.to_dict()),
        },
        "tokenizer": {
            "class": type(tok).__name__,
            "vocab_size": len(tok),
            "bos_token_id": tok.bos_token_id,
            "eos_token_id": tok.eos_token_id,
            "pad_token_id": tok.pad_token_id,
            "special_ids": sorted(set(tok.all_special_ids)),
            "prepend_bos": plan.prepend_bos,
        },
        "hooks": [f"blocks.{l}.hook_{spec.hook}" for l in plan.layers],
        "storage_dtype": str(STORAGE_DTYPES[spec.dtype][0]),
        "float8": None
        if spec.dtype != "float8"
        else {
            "format": "float8_e4m3fn",
            "decode": "value = float8_e4m3fn(acts code) * scales[layer, dim]",
            "scales": "scales",
            "headroom": float8.HEADROOM,
            "calibration_tokens": _calibration_windows(plan.layout) * plan.layout.context,
        },
        "versions": library_versions(),
        "lens": None if plan.lens is None else plan.lens.record(plan.layers, cfg.num_hidden_layers),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def create_or_resume(plan: HarvestPlan, show_progress: bool, log: Callable[[str], None]) -> bool:
    """Create the cache (tokenized windows and metadata) unless `out` already holds this spec's cache; True if
    this call created it."""
    out, spec, layout = plan.out, plan.spec, plan.layout
    if _check_existing(out, plan.identity, plan.fingerprint):
        return False
    _check_disk_space(out, layout, layout.n_tokens)
    docs = Documents(plan.data, spec.split, spec.text_column, spec.dataset_config, strict=spec.strict_text)
    with progress_bar("tokenizing", layout.n_tokens, "tokens", enabled=show_progress, transient=True) as bar:
        windows = read_windows(
            docs, plan.tokenizer, spec.context, layout.n_sequences, plan.prepend_bos, bar.advance, log
        )
    scales = None
    if spec.dtype == "float8":  # fixed before the cache (and so before any block) exists
        lens = None if plan.lens is None else plan.lens.load(layout.d_model, plan.config.num_hidden_layers)
        scales = BlockComputer(plan, windows, lens, None).calibrate()
    create_cache(out, _metadata(plan), layout, windows, plan.lens, scales)
    return True


def _calibration_windows(layout: Layout) -> int:
    """Context windows (the first of block 0) whose absolute maxima set the float8 scales."""
    start, stop = layout.block_range(0)
    return max(1, min(float8.CALIBRATION_TOKENS, stop - start) // layout.context)


# ---------------------------------------------------------------------------------------------
# the run


@dataclass
class Summary:
    path: str
    tokens_total: int
    tokens_this_run: int
    blocks_total: int
    blocks_this_run: int
    seconds: float  # everything: resolving, tokenizing, loading the model, harvesting
    loop_seconds: float  # forward passes and writes only
    tokens_per_s: float  # this process's harvested tokens / loop_seconds
    bytes_on_disk: int
    resumed: bool
    layers: list[int] = field(default_factory=list)


def harvest(spec: CacheSpec, show_progress: bool = True, log: Callable[[str], None] = print) -> Summary:
    spec = spec.validate()
    dist = Dist.init()
    lock = Lock(open_store(spec.out), "harvest run")  # rank 0 takes it in its setup step, for the whole job
    try:
        return _harvest(spec, dist, lock, show_progress and dist.rank == 0, log if dist.rank == 0 else lambda s: None)
    finally:
        lock.release()
        dist.close()


def _harvest(spec: CacheSpec, dist: Dist, lock: Lock, show_progress: bool, log: Callable[[str], None]) -> Summary:
    t0 = time.time()
    plan = plan_harvest(spec, dist, lock)
    layout, out = plan.layout, plan.out
    created = dist.run_on_rank0(lambda: create_or_resume(plan, show_progress, log))
    writer = CacheWriter(out)
    done = set(writer.complete_blocks())
    todo = [b for b in range(layout.n_blocks) if b % dist.world_size == dist.rank and b not in done]
    my_tokens = _tokens_in(layout, todo)
    if dist.rank == 0 and todo:
        _check_disk_space(out, layout, _tokens_in(layout, [b for b in range(layout.n_blocks) if b not in done]))
    if done:
        log(f"resuming {out.location}: {len(done)}/{layout.n_blocks} blocks already complete")

    t_loop = time.time()
    try:
        if todo:
            # loads the model (unless creating a float8 cache did): before the loop's clock starts
            compute = BlockComputer(plan, writer.windows().numpy(), writer.lens(), writer.scales)
            label = f"harvest{f' rank 0/{dist.world_size}' if dist.world_size > 1 else ''}"
            t_loop = time.time()
            with (
                progress_bar(label, my_tokens, "tokens", enabled=show_progress, rate_unit="tok/s") as bar,
                BackgroundWriter(writer) as background,
            ):
                for b in todo:
                    lock.check()  # the lease was lost (a suspended process taken over): stop writing
                    background.submit(compute(b, bar.advance))
        dist.barrier()
    except BaseException:
        if created and dist.rank == 0 and not writer.complete_blocks():
            for top in CACHE_NAMES - {LOCK_KEY}:  # nothing of value was written by this run: leave no trace
                out.delete_prefix(top)
        raise
    now = time.time()
    return Summary(
        out.location,
        layout.n_tokens,
        my_tokens * dist.world_size,
        layout.n_blocks,
        layout.n_blocks - len(done),
        now - t0,
        now - t_loop,
        my_tokens / max(now - t_loop, 1e-9),
        open_cache(out).size_on_disk(),
        bool(done) or not created,
        list(plan.layers),
    )


def _tokens_in(layout: Layout, blocks: list[int]) -> int:
    return sum(stop - start for start, stop in map(layout.block_range, blocks))


# ---------------------------------------------------------------------------------------------
# one block: forward passes -> stored values, permuted


class BlockComputer:
    """The model (and the cache's lens) loaded; calling it with b turns write block b into a Block.
    `windows`, `lens` (the cache's own copy: a resume uses the lens the cache was begun with) and `scales`
    (float8; None while calibrating them) come from the cache."""

    def __init__(self, plan: HarvestPlan, windows: np.ndarray, lens: Lens | None, scales: torch.Tensor | None):
        spec = plan.spec
        self.spec, self.layout, self.device = spec, plan.layout, plan.device
        self.bridge = plan.load_bridge()
        hooks = [f"blocks.{l}.hook_{spec.hook}" for l in plan.layers]
        missing = [h for h in hooks if h not in self.bridge.hook_dict]
        if missing:
            raise SpecError(f"{plan.model.name!r} has no hook point {missing[0]}: use --hook resid_post")
        self.windows = windows
        self.lens = None if lens is None else lens.to(plan.device)
        # exclude: every special id (keep=False); reference: the reference's BOS/EOS/PAD (zeroed, kept)
        self.special_ids = np.array(special_token_ids(plan.tokenizer, spec.special_tokens), dtype=np.int64)
        self.scales = None if scales is None else scales.to(plan.device)
        self.decoder = Decoder(spec.dtype, self.scales)  # statistics are of the decoded values, as readers see them

    def calibrate(self) -> torch.Tensor:
        """float8 scales [L, d] from the absolute maxima over the first windows of block 0, every position as
        it will be stored (special tokens too); non-finite values are left out."""
        n = _calibration_windows(self.layout)
        seqs = self.windows[:n]
        special = np.isin(seqs, self.special_ids)
        absmax = torch.zeros(len(self.layout.layers), self.layout.d_model)
        for i in range(0, n, self.spec.batch_size):
            x = self._values(seqs[i : i + self.spec.batch_size], special[i : i + self.spec.batch_size])
            x = torch.nan_to_num(x.abs(), nan=0.0, posinf=0.0)
            absmax = torch.maximum(absmax, x.amax(dim=1).cpu())
        return float8.scales_from_absmax(absmax)

    def __call__(self, b: int, advance: Callable[[int], None]) -> Block:
        spec, layout = self.spec, self.layout
        start, stop = layout.block_range(b)
        n, ctx = stop - start, layout.context
        first_seq = start // ctx
        perm = block_permutation(spec.seed, b, n)
        dest = torch.from_numpy(np.argsort(perm))  # block-local source position -> cache position
        torch_dtype = STORAGE_DTYPES[spec.dtype][1]
        buf = torch.empty(
            (len(layout.layers), n, layout.d_model), dtype=torch_dtype, pin_memory=self.device.startswith("cuda")
        )
        seqs = self.windows[first_seq : first_seq + n // ctx]
        special = np.isin(seqs, self.special_ids)
        keep = ~special if spec.special_tokens == "exclude" else np.ones_like(special)
        stats = LayerStats.zeros(len(layout.layers), layout.d_model)
        for i in range(0, len(seqs), spec.batch_size):
            rows = slice(i, i + spec.batch_size)
            stored, out_of_range = self._stored(seqs[rows], special[rows], b)  # [L, rows x ctx, d]
            kept = torch.from_numpy(keep[rows].reshape(-1)).to(self.device)
            block_stats = LayerStats.of(self.decoder(stored), kept)  # statistics of the values as stored
            block_stats.out_of_range = out_of_range
            stats = stats.merge(block_stats)
            buf.index_copy_(1, dest[i * ctx : i * ctx + stored.shape[1]], stored.cpu())
            advance(stored.shape[1])
        seq = (first_seq + perm // ctx).astype(np.int32)  # perm: the source position of every cache position
        pos = (perm % ctx).astype(np.int32)
        tokens = {
            "token_ids": self.windows[seq, pos].astype(np.int32),
            "keep": keep.reshape(-1)[perm],
            "seq": seq,
            "pos": pos,
        }
        return Block(b, to_storage(buf, spec.dtype), tokens, stats)

    def _values(self, ids: np.ndarray, special: np.ndarray) -> torch.Tensor:
        """The values to store for windows `ids` [B, ctx], float32 [L, B*ctx, d]: block outputs, through the
        lens, special positions zeroed in `reference` mode."""
        spec, layers = self.spec, list(self.layout.layers)
        x = forward_layers(self.bridge, torch.from_numpy(ids.astype(np.int64)).to(self.device), layers, spec.hook)
        x = x.flatten(1, 2)  # [L, B*ctx, d]
        if self.lens is not None:
            with torch.no_grad():
                x = torch.stack([self.lens.transform(x[j], l) for j, l in enumerate(layers)])
        if spec.special_tokens == "reference":  # the reference code zeroes BOS/EOS/PAD vectors and keeps them
            x[:, torch.from_numpy(special.reshape(-1)).to(self.device)] = 0
        return x

    def _stored(self, ids: np.ndarray, special: np.ndarray, b: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The values stored for windows `ids` [B, ctx] in the storage dtype (float8: uint8 codes), and the
        number of values per layer beyond the float8 scales' range; stops on values the storage cannot hold."""
        spec, layers = self.spec, list(self.layout.layers)
        x = self._values(ids, special)
        if spec.dtype == "float16":
            peak = x.abs().amax(dim=(1, 2))
            if (peak > FLOAT16_MAX).any():
                l = int(torch.argmax(peak))
                raise StorageError(
                    f"layer {layers[l]} reaches |x| = {peak[l]:.3g}, beyond float16's maximum "
                    f"{FLOAT16_MAX:.0f}: use --dtype bfloat16 (default) or float32"
                )
        stored = x if spec.dtype == "float8" else x.to(STORAGE_DTYPES[spec.dtype][1])
        if not spec.allow_nonfinite:
            bad = (~torch.isfinite(stored)).sum(dim=(1, 2))
            if bad.any():
                l = int(bad.nonzero()[0])
                raise NonFiniteError(
                    f"block {b}, layer {layers[l]}: the model produced {int(bad[l]):,} NaN/inf activation values "
                    f"(in {int((bad > 0).sum())} of {len(layers)} layers): check the model's weights and "
                    f"--model-dtype, or pass --allow-nonfinite to store them (counted in `harvest info`)"
                )
        out_of_range = torch.zeros(len(layers), dtype=torch.float64)
        if spec.dtype == "float8":
            stored, out_of_range = float8.encode(x, self.scales)
            if out_of_range.any() and not spec.allow_out_of_range:
                l = int(out_of_range.nonzero()[0])
                raise StorageError(
                    f"block {b}, layer {layers[l]}: {int(out_of_range[l]):,} values lie beyond the float8 range their "
                    f"channels' scales allow (|x / scale| > {float8.E4M3_MAX:.0f}; in "
                    f"{int((out_of_range > 0).sum())} of {len(layers)} layers): use --dtype bfloat16, or pass "
                    f"--allow-out-of-range to store them saturated (counted in `harvest info`)"
                )
        return stored, out_of_range
