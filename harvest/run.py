"""The harvest: context windows -> one forward pass with hooks on every requested block -> cache blocks.

Each write block is a fixed set of context windows, permuted with a permutation seeded by (seed, block),
so the cache is the same whether it was written in one go, resumed after a kill, or split over ranks.
Writing happens on a background thread while the next block's forward passes run.
"""

from __future__ import annotations

import queue
import shutil  # noqa: F401  (the tests fake a full disk through harvest.run.shutil.disk_usage)
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch

from .cache import (
    CACHE_NAMES,
    FLOAT16_MAX,
    LOCK_KEY,
    STORAGE_DTYPES,
    CacheWriter,
    Layout,
    create_cache,
    location_state,
    open_cache,
    to_storage,
)
from .env import Dist, library_versions
from .errors import CacheError, SpecError, StorageError, UserError
from .lens import Lens, resolve_lens
from .lock import Lock
from .models import ModelSource, load_bridge, load_config, load_tokenizer, resolve_device, resolve_model
from .progress import progress_bar
from .spec import CacheSpec, fingerprint
from .stats import LayerStats
from .store import Store, open_store
from .text import adds_bos, iter_documents, make_windows, resolve_dataset

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
# background writer


class BackgroundWriter:
    """One thread writing whole blocks while the next block is computed; errors surface on the caller."""

    def __init__(self, writer: CacheWriter, on_done: Callable[[int], None] | None = None):
        self.writer, self.on_done = writer, on_done
        self.queue: queue.Queue = queue.Queue(maxsize=1)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._loop, name="cache-writer", daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        while (item := self.queue.get()) is not None:
            if self.error is None:
                try:
                    self.writer.write_block(*item)
                    if self.on_done:
                        self.on_done(item[0])
                except BaseException as e:
                    self.error = e

    def _check(self) -> None:
        if self.error is not None:
            raise self.error

    def submit(self, b: int, acts: np.ndarray, tokens: dict[str, np.ndarray], stats: LayerStats) -> None:
        self._check()
        self.queue.put((b, acts, tokens, stats))

    def close(self) -> None:
        self.queue.put(None)
        self.thread.join()
        self._check()


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


def _json_safe(obj: Any) -> Any:
    import json

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
            f"not enough disk space at {out.location}: the cache needs ~{need / 1e9:.2f} GB, "
            f"{free / 1e9:.2f} GB are free; free space, lower --tokens, or choose another --out"
        )


def harvest(spec: CacheSpec, show_progress: bool = True, log: Callable[[str], None] = print) -> Summary:
    spec.validate()
    dist = Dist.init()
    lock = Lock(open_store(spec.out), "harvest run")  # rank 0 takes it in its setup step, for the whole job
    try:
        return _harvest(spec, dist, lock, show_progress and dist.rank == 0, log if dist.rank == 0 else lambda s: None)
    finally:
        lock.release()
        dist.close()


def _harvest(spec: CacheSpec, dist: Dist, lock: Lock, show_progress: bool, log: Callable[[str], None]) -> Summary:
    t0 = time.time()
    out = lock.store
    # -- resolve everything cheap first: bad input fails before any work -------------------------
    source: list[ModelSource] = []

    def locked_resolve() -> None:  # the lock first: a second harvest of this --out stops here, naming the holder
        lock.acquire()  # (also the write probe: the lock object is written inside --out)
        source.append(resolve_model(spec.model))  # rank 0 converts a GGUF once

    dist.run_on_rank0(locked_resolve)
    model = source[0] if source else resolve_model(spec.model)
    cfg = load_config(model)
    layers = spec.layer_list(cfg.num_hidden_layers)
    data = resolve_dataset(spec.dataset)
    lens_source = resolve_lens(spec.lens, model.identity.get("hub_id"))
    if lens_source is not None:
        lens_source.load(cfg.hidden_size, cfg.num_hidden_layers)  # a lens for another model fails here, not later
    tokenizer = load_tokenizer(model)
    prepend_bos = {"auto": adds_bos(tokenizer), "always": True, "never": False}[spec.prepend_bos]
    # The lens's identity is its content, not where the folder is.
    identity = {
        **spec.identity(),
        "model_identity": model.identity,
        "dataset_identity": data.identity,
        "layers": layers,
        "prepend_bos": prepend_bos,
        "lens": "none" if lens_source is None else {"params_sha256": lens_source.sha256},
    }
    identity = _json_safe(identity)
    fp = fingerprint(identity)
    layout = Layout(
        n_tokens=spec.n_sequences() * spec.context,
        context=spec.context,
        layers=tuple(layers),
        d_model=cfg.hidden_size,
        dtype=spec.dtype,
        chunk_tokens=spec.chunk_tokens,
        shard_tokens=spec.shard_tokens,
        block_tokens=spec.shuffle_tokens,
        compression=spec.compression,
    )
    created = [False]

    def create() -> None:
        if _check_existing(out, identity, fp):
            return
        _check_disk_space(out, layout, layout.n_tokens)
        with progress_bar("tokenizing", layout.n_tokens, "tokens", enabled=show_progress, transient=True) as bar:
            windows = make_windows(
                iter_documents(data, spec.split, spec.text_column, spec.dataset_config),
                tokenizer,
                spec.context,
                layout.n_sequences,
                prepend_bos,
                progress=bar.advance,
                dataset_name=f"dataset {spec.dataset!r}",
            )
        meta = {
            "fingerprint": fp,
            "identity": identity,
            "spec": spec.to_dict(),
            "model": {
                "name": model.name,
                "path": model.path,
                "identity": model.identity,
                "architecture": (cfg.architectures or [type(cfg).__name__])[0],
                "n_layers": cfg.num_hidden_layers,
                "d_model": cfg.hidden_size,
                "config": _json_safe(cfg.to_dict()),
            },
            "tokenizer": {
                "class": type(tokenizer).__name__,
                "vocab_size": len(tokenizer),
                "bos_token_id": tokenizer.bos_token_id,
                "eos_token_id": tokenizer.eos_token_id,
                "pad_token_id": tokenizer.pad_token_id,
                "special_ids": sorted(set(tokenizer.all_special_ids)),
                "prepend_bos": prepend_bos,
            },
            "hooks": [f"blocks.{l}.hook_{spec.hook}" for l in layers],
            "storage_dtype": str(STORAGE_DTYPES[spec.dtype][0]),
            "versions": library_versions(),
            "lens": None if lens_source is None else lens_source.record(layers, cfg.num_hidden_layers),
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        create_cache(out, meta, layout, windows, lens_source)
        created[0] = True

    dist.run_on_rank0(create)
    writer = CacheWriter(out)
    done = set(writer.complete_blocks())
    resumed = bool(done) or not created[0]
    todo = [b for b in range(layout.n_blocks) if b % dist.world_size == dist.rank and b not in done]
    if dist.rank == 0 and todo:
        remaining = sum(np.subtract(*layout.block_range(b)[::-1]) for b in range(layout.n_blocks) if b not in done)
        _check_disk_space(out, layout, int(remaining))
    if resumed and done:
        log(f"resuming {out.location}: {len(done)}/{layout.n_blocks} blocks already complete")

    # -- the loop --------------------------------------------------------------------------------
    tokens_this_run, t_loop = 0, time.time()
    try:
        if todo:
            device = resolve_device(spec.device)
            bridge = load_bridge(model, tokenizer, device, TORCH_DTYPES[spec.model_dtype])
            missing = [h for h in (f"blocks.{l}.hook_{spec.hook}" for l in layers) if h not in bridge.hook_dict]
            if missing:
                raise SpecError(f"{model.name!r} has no hook point {missing[0]}: use --hook resid_post")
            windows = writer.windows().numpy()
            lens = writer.lens()  # the cache's own copy: a resume uses the lens the cache was begun with
            if lens is not None:
                lens = lens.to(device)
            special = np.array(sorted(set(tokenizer.all_special_ids)), dtype=np.int64)
            my_tokens = sum(layout.block_range(b)[1] - layout.block_range(b)[0] for b in todo)
            label = f"harvest{f' rank 0/{dist.world_size}' if dist.world_size > 1 else ''}"
            t_loop = time.time()  # after model loading
            with progress_bar(label, my_tokens, "tokens", enabled=show_progress, rate_unit="tok/s") as bar:
                bg = BackgroundWriter(writer)
                try:
                    for b in todo:
                        lock.check()  # stop if another process took the location over (our lease expired)
                        acts, tokens, stats = _compute_block(
                            b,
                            bridge,
                            lens,
                            windows,
                            layout,
                            spec,
                            special,
                            device,
                            bar.advance,
                        )
                        bg.submit(b, acts, tokens, stats)
                        tokens_this_run += acts.shape[1]
                finally:
                    bg.close()
        dist.barrier()
    except UserError:
        if created[0] and dist.rank == 0 and not writer.complete_blocks():
            for top in CACHE_NAMES - {LOCK_KEY}:  # nothing of value was written by this run: leave no trace
                out.delete_prefix(top)
        raise
    now = time.time()
    cache = open_cache(out)
    return Summary(
        out.location,
        layout.n_tokens,
        tokens_this_run * dist.world_size,
        layout.n_blocks,
        layout.n_blocks - len(done),
        now - t0,
        now - t_loop,
        tokens_this_run / max(now - t_loop, 1e-9),
        cache.size_on_disk(),
        resumed,
        list(layers),
    )


def _compute_block(
    b: int,
    bridge: Any,
    lens: Lens | None,
    windows: np.ndarray,
    layout: Layout,
    spec: CacheSpec,
    special: np.ndarray,
    device: str,
    advance: Callable[[int], None],
) -> tuple[np.ndarray, dict[str, np.ndarray], LayerStats]:
    """Forward every window of block b (through the lens, if any); return its permuted storage array, token
    columns and statistics."""
    start, stop = layout.block_range(b)
    n, ctx = stop - start, layout.context
    first_seq = start // ctx
    perm = block_permutation(spec.seed, b, n)
    dest = torch.from_numpy(np.argsort(perm))  # block-local source position -> cache position
    torch_dtype = STORAGE_DTYPES[spec.dtype][1]
    buf = torch.empty((len(layout.layers), n, layout.d_model), dtype=torch_dtype, pin_memory=device.startswith("cuda"))
    seqs = windows[first_seq : first_seq + n // ctx]
    is_kept = ~np.isin(seqs, special) if spec.special_tokens == "exclude" else np.ones(seqs.shape, bool)
    stats = LayerStats.zeros(len(layout.layers), layout.d_model)
    for i in range(0, len(seqs), spec.batch_size):
        ids = torch.from_numpy(seqs[i : i + spec.batch_size].astype(np.int64)).to(device)
        x = forward_layers(bridge, ids, list(layout.layers), spec.hook).flatten(1, 2)  # [L, B*ctx, d]
        if lens is not None:
            with torch.no_grad():
                x = torch.stack([lens.transform(x[j], l) for j, l in enumerate(layout.layers)])
        if spec.dtype == "float16":
            peak = x.abs().amax(dim=(1, 2))
            if (peak > FLOAT16_MAX).any():
                l = int(torch.argmax(peak))
                raise StorageError(
                    f"layer {layout.layers[l]} reaches |x| = {peak[l]:.3g}, beyond float16's maximum "
                    f"{FLOAT16_MAX:.0f}: use --dtype bfloat16 (default) or float32"
                )
        stored = x.to(torch_dtype)
        kept = torch.from_numpy(is_kept[i : i + spec.batch_size].reshape(-1)).to(device)
        stats = stats.merge(LayerStats.of(stored[:, kept]))  # statistics of the values as stored
        src = slice(i * ctx, i * ctx + x.shape[1])
        buf.index_copy_(1, dest[src], stored.cpu())
        advance(x.shape[1])
    src_pos = perm  # the source position of every cache position, in cache order
    seq = (first_seq + src_pos // ctx).astype(np.int32)
    pos = (src_pos % ctx).astype(np.int32)
    tokens = {
        "token_ids": windows[seq, pos].astype(np.int32),
        "keep": is_kept.reshape(-1)[src_pos],
        "seq": seq,
        "pos": pos,
    }
    return to_storage(buf, spec.dtype), tokens, stats
