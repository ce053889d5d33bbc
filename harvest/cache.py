"""THE activation-cache format. The only module that writes zarr; readers go through `open_cache`.

Layout of a cache folder (zarr v3 group):

    zarr.json                  root group; attribute "mlsae_cache" holds all metadata (spec, fingerprint,
                               model, tokenizer, layout, versions), written once at creation
    acts/                      [n_layers, n_tokens, d_model]; shards (1, shard_tokens, d), inner chunks
                               (1, chunk_tokens, d): one file per (layer, shard), so one layer reads alone
    token_ids/ keep/ seq/ pos/ [n_tokens] per-token arrays in the same (shuffled) order as acts;
                               seq/pos locate each vector in `windows`
    windows/                   [n_sequences, context] int32 token ids of every context window, in order
    manifest/block-NNNNNN.json          written LAST for each write block: its files, sizes and crc32s
    manifest/block-NNNNNN.stats.safetensors  per-layer statistics of the block's kept tokens

A write block is `shuffle_tokens` consecutive cache positions = whole context windows = whole shards,
permuted with one permutation for all layers, flushed by exactly one process. A block exists for
readers only once its manifest file exists: zarr reads missing chunks as zeros without complaint.

bfloat16 is stored as uint16 bits (zarr 3.1 has no bfloat16) with the logical dtype in the metadata.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import zlib
from dataclasses import asdict, dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable

import numpy as np
import torch
import zarr
from safetensors.torch import load_file, save_file

from .atomic import atomic_write_json, fresh_folder, fsync_dir, fsync_file
from .errors import CacheError, StorageError
from .stats import LayerStats

if TYPE_CHECKING:
    from .lens import Lens, LensSource

FORMAT = "mlsae-cache"
FORMAT_VERSION = 1
META_KEY = "mlsae_cache"
TOKEN_ARRAYS = {"token_ids": "int32", "keep": "bool", "seq": "int32", "pos": "int32"}
LENS_DIR = "lens"  # the tuned lens the vectors went through (config.json + params.pt), when there was one
STORAGE_DTYPES = {  # logical dtype -> (numpy storage dtype, torch dtype)
    "bfloat16": (np.dtype("uint16"), torch.bfloat16),
    "float32": (np.dtype("float32"), torch.float32),
    "float16": (np.dtype("float16"), torch.float16),
}
FLOAT16_MAX = 65504.0


# ---------------------------------------------------------------------------------------------
# dtype conversion


def to_storage(x: torch.Tensor, dtype: str) -> np.ndarray:
    """A float tensor (any device) -> numpy array of the storage dtype, on the CPU."""
    np_dtype, torch_dtype = STORAGE_DTYPES[dtype]
    y = x.to(torch_dtype).cpu()
    if dtype == "bfloat16":
        return y.view(torch.int16).numpy().view(np_dtype)
    return y.numpy()


def from_storage(a: np.ndarray, dtype: str) -> torch.Tensor:
    """Zero-copy view of stored values as a torch tensor of the logical dtype."""
    if dtype == "bfloat16":
        return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(a)


# ---------------------------------------------------------------------------------------------
# layout


@dataclass(frozen=True)
class Layout:
    n_tokens: int
    context: int
    layers: tuple[int, ...]  # model block indices, in storage order
    d_model: int
    dtype: str  # logical dtype
    chunk_tokens: int
    shard_tokens: int
    block_tokens: int  # write-shuffle window
    compression: str

    @property
    def n_sequences(self) -> int:
        return self.n_tokens // self.context

    @property
    def n_blocks(self) -> int:
        return -(-self.n_tokens // self.block_tokens)

    @property
    def n_chunks(self) -> int:
        return -(-self.n_tokens // self.chunk_tokens)

    def block_range(self, b: int) -> tuple[int, int]:
        return b * self.block_tokens, min((b + 1) * self.block_tokens, self.n_tokens)

    def chunk_range(self, c: int) -> tuple[int, int]:
        return c * self.chunk_tokens, min((c + 1) * self.chunk_tokens, self.n_tokens)

    def chunks_of_block(self, b: int) -> range:
        start, stop = self.block_range(b)
        return range(start // self.chunk_tokens, -(-stop // self.chunk_tokens))

    def shards_of_block(self, b: int) -> range:
        start, stop = self.block_range(b)
        return range(start // self.shard_tokens, -(-stop // self.shard_tokens))

    def layer_index(self, layer: int) -> int:
        try:
            return self.layers.index(layer)
        except ValueError:
            raise CacheError(
                f"layer {layer} is not in this cache (it holds layers {list(self.layers)}): "
                f"choose one of those or harvest it"
            )

    def bytes_per_token(self) -> int:
        return len(self.layers) * self.d_model * STORAGE_DTYPES[self.dtype][0].itemsize

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Layout":
        return cls(**{**d, "layers": tuple(d["layers"])})


# ---------------------------------------------------------------------------------------------
# small file helpers


def file_checksum(path: Path, fsync: bool = False) -> tuple[int, int]:
    """(size, crc32) of a file, optionally fsyncing it first."""
    crc, size = 0, 0
    if fsync:
        fsync_file(path)
    with open(path, "rb") as f:
        while buf := f.read(1 << 22):
            crc = zlib.crc32(buf, crc)
            size += len(buf)
    return size, crc


def _storage_error(e: OSError, path: Path) -> StorageError:
    if e.errno == errno.ENOSPC:
        return StorageError(
            f"disk full while writing {path}: free space there or pass --out on a larger disk; "
            f"rerun the same command to resume"
        )
    if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return StorageError(f"cannot write {path} ({e.strerror}): choose a writable --out")
    return StorageError(f"writing {path} failed ({e.strerror or e}): check the disk, then rerun to resume")


# ---------------------------------------------------------------------------------------------
# the cache


def _codecs(compression: str, itemsize: int) -> dict[str, Any]:
    if compression == "none":
        return {"compressors": None}
    from zarr.codecs import BloscCodec

    return {"compressors": BloscCodec(cname="zstd", clevel=1, shuffle="shuffle", typesize=itemsize, blocksize=1 << 20)}


def create_cache(
    path: Path, meta: dict[str, Any], layout: Layout, windows: np.ndarray, lens: "LensSource | None" = None
) -> None:
    """Create an empty cache with its metadata, token windows and (a copy of) its tuned lens, atomically
    (temp folder + rename). The lens copy keeps the cache self-contained: analyses read it from there."""
    path = Path(path)
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise CacheError(f"{path} exists and is not an mlsae cache: choose another --out or remove it")
    tmp = fresh_folder(path.parent, f".{path.name}.creating-")  # never a predictable name
    try:
        meta = {**meta, "format": FORMAT, "format_version": FORMAT_VERSION, "layout": asdict(layout)}
        root = zarr.open_group(str(tmp), mode="w", attributes={META_KEY: meta})
        np_dtype = STORAGE_DTYPES[layout.dtype][0]
        d, n = layout.d_model, layout.n_tokens
        root.create_array(
            "acts",
            shape=(len(layout.layers), n, d),
            dtype=np_dtype,
            chunks=(1, layout.chunk_tokens, d),
            shards=(1, layout.shard_tokens, d),
            fill_value=0,
            **_codecs(layout.compression, np_dtype.itemsize),
            dimension_names=("layer", "token", "feature"),
        )
        for name, dt in TOKEN_ARRAYS.items():
            root.create_array(
                name,
                shape=(n,),
                dtype=dt,
                chunks=(layout.chunk_tokens,),
                shards=(layout.shard_tokens,),
                fill_value=0,
                compressors=None,
            )
        rows = max(1, (1 << 20) // layout.context)
        w = root.create_array(
            "windows",
            shape=windows.shape,
            dtype="int32",
            chunks=(min(rows, len(windows)), layout.context),
            compressors=None,
        )
        w[...] = windows.astype(np.int32)
        (tmp / "manifest").mkdir()
        if lens is not None:
            lens.copy_to(tmp / LENS_DIR)
        if path.exists():
            path.rmdir()
        os.rename(tmp, path)
        fsync_dir(path.parent)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise _storage_error(e, path)


class Cache:
    """Read access to a cache: metadata, manifest, statistics, and reference (zarr-python) reads."""

    def __init__(self, path: Path):
        self.path = Path(path)
        meta_file = self.path / "zarr.json"
        if not meta_file.is_file():
            raise CacheError(f"{self.path} is not a cache (no zarr.json): check the path or run `harvest run` first")
        try:
            attrs = json.loads(meta_file.read_text())["attributes"][META_KEY]
        except (KeyError, TypeError, ValueError):  # not JSON, not UTF-8, or not a mapping where one belongs
            raise CacheError(f"{self.path} is a zarr group but not an mlsae cache: check the path")
        if not isinstance(attrs, dict):
            raise CacheError(f"{self.path}/zarr.json holds damaged cache metadata: restore it or re-harvest")
        if attrs.get("format_version") != FORMAT_VERSION:
            raise CacheError(
                f"{self.path} has cache format version {attrs.get('format_version')}, this code reads "
                f"{FORMAT_VERSION}: re-harvest it or install a matching version"
            )
        self.meta: dict[str, Any] = attrs
        try:
            self.layout = Layout.from_dict(attrs["layout"])
        except (KeyError, TypeError, ValueError):
            raise CacheError(f"{self.path}/zarr.json holds a damaged layout: restore it or re-harvest")

    # -- metadata ------------------------------------------------------------------------------
    @property
    def fingerprint(self) -> str:
        return self.meta["fingerprint"]

    @property
    def layers(self) -> tuple[int, ...]:
        return self.layout.layers

    @property
    def dtype(self) -> torch.dtype:
        return STORAGE_DTYPES[self.layout.dtype][1]

    @property
    def lens_record(self) -> dict[str, Any] | None:
        """The tuned lens the vectors were transformed with (source, hash, mapping), or None."""
        return self.meta.get("lens")

    def lens(self) -> "Lens | None":
        """The cache's tuned lens (its own copy, checked against the recorded hash), or None: the space the
        cached vectors, and every SAE trained on them, live in."""
        from .lens import Lens, params_sha256

        rec = self.lens_record
        if rec is None:
            return None
        folder = self.path / LENS_DIR
        if not (folder / "params.pt").is_file() or params_sha256(folder) != rec["params_sha256"]:
            raise CacheError(
                f"{folder} is missing or differs from the lens the cache was harvested with "
                f"(sha256 {rec['params_sha256'][:12]}): restore it from {rec['path']} or re-harvest"
            )
        return Lens.load(folder, self.layout.d_model, self.meta["model"]["n_layers"])

    # -- manifest ------------------------------------------------------------------------------
    def manifest_path(self, b: int) -> Path:
        return self.path / "manifest" / f"block-{b:06d}.json"

    def stats_path(self, b: int) -> Path:
        return self.path / "manifest" / f"block-{b:06d}.stats.safetensors"

    def block_entry(self, b: int) -> dict[str, Any] | None:
        p = self.manifest_path(b)
        if not p.is_file():
            return None
        try:
            return json.loads(p.read_text())
        except json.JSONDecodeError:
            return None  # cannot happen with atomic writes; treat as not done

    def complete_blocks(self) -> list[int]:
        return [b for b in range(self.layout.n_blocks) if self.manifest_path(b).is_file()]

    @property
    def complete(self) -> bool:
        return len(self.complete_blocks()) == self.layout.n_blocks

    def require_complete(self) -> None:
        done = len(self.complete_blocks())
        if done != self.layout.n_blocks:
            raise CacheError(
                f"cache {self.path} is incomplete ({done}/{self.layout.n_blocks} blocks): "
                f"rerun the same `harvest run` command to finish it"
            )

    def complete_chunks(self) -> list[int]:
        return [c for b in self.complete_blocks() for c in self.layout.chunks_of_block(b)]

    def stats(self) -> LayerStats:
        """Per-layer statistics over the kept tokens of all complete blocks."""
        total = LayerStats.zeros(len(self.layers), self.layout.d_model)
        for b in self.complete_blocks():
            total = total.merge(LayerStats.from_tensors(load_file(str(self.stats_path(b)))))
        return total

    def size_on_disk(self) -> int:
        return sum(f.stat().st_size for f in self.path.rglob("*") if f.is_file())

    # -- file locations (for the fast reader and verify) -------------------------------------------
    @cached_property
    def array_meta(self) -> dict[str, dict[str, Any]]:
        names = ["acts", "windows", *TOKEN_ARRAYS]
        return {n: json.loads((self.path / n / "zarr.json").read_text()) for n in names}

    def shard_file(self, array: str, shard_coords: Iterable[int]) -> Path:
        sep = self.array_meta[array]["chunk_key_encoding"]["configuration"]["separator"]
        return self.path / array / sep.join(["c", *map(str, shard_coords)])

    def block_files(self, b: int) -> list[Path]:
        files = []
        for s in self.layout.shards_of_block(b):
            files += [self.shard_file("acts", (li, s, 0)) for li in range(len(self.layers))]
            files += [self.shard_file(name, (s,)) for name in TOKEN_ARRAYS]
        return files

    # -- reference reads through zarr-python ------------------------------------------------------
    @cached_property
    def group(self) -> zarr.Group:
        return zarr.open_group(str(self.path), mode="r")

    def read(self, layer: int, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Vectors [stop-start, d] of one model layer at cache positions [start, stop)."""
        a = self.group["acts"][self.layout.layer_index(layer), start:stop]
        return from_storage(np.ascontiguousarray(a), self.layout.dtype)

    def read_tokens(self, name: str, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """token_ids, keep, seq or pos at cache positions [start, stop)."""
        return torch.from_numpy(np.ascontiguousarray(self.group[name][start:stop]))

    def windows(self) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(self.group["windows"][...]))


def open_cache(path: str | Path) -> Cache:
    return Cache(Path(path))


class CacheWriter(Cache):
    """Writes whole blocks. One process owns each block; the manifest entry is written last."""

    def __init__(self, path: Path):
        super().__init__(path)
        group = zarr.open_group(str(self.path), mode="r+")
        # write_empty_chunks: zarr otherwise skips chunks equal to the fill value (a block of one window
        # has seq == 0 everywhere), leaving out files and index entries that readers and checksums expect.
        self._arrays = {name: group[name].with_config({"write_empty_chunks": True}) for name in ["acts", *TOKEN_ARRAYS]}

    def write_block(self, b: int, acts: np.ndarray, tokens: dict[str, np.ndarray], stats: LayerStats) -> None:
        """acts [n_layers, block_len, d] in storage dtype, already permuted; tokens: TOKEN_ARRAYS columns."""
        start, stop = self.layout.block_range(b)
        if acts.shape != (len(self.layers), stop - start, self.layout.d_model):
            raise ValueError(f"block {b}: acts shape {acts.shape} does not match the layout")
        try:
            # Files of a block not in the manifest are leftovers of a crash: remove them, or zarr would
            # read-modify-write them (and fail on a torn shard index).
            for f in self.block_files(b):
                f.unlink(missing_ok=True)
            for li in range(len(self.layers)):
                self._arrays["acts"][li, start:stop] = acts[li]
            for name in TOKEN_ARRAYS:
                self._arrays[name][start:stop] = tokens[name]
            save_file(stats.to_tensors(), str(self.stats_path(b)))
            files = {}
            for f in [*self.block_files(b), self.stats_path(b)]:
                size, crc = file_checksum(f, fsync=True)
                files[str(f.relative_to(self.path))] = {"size": size, "crc32": crc}
            fsync_dir(self.path / "acts")
            atomic_write_json(self.manifest_path(b), {"block": b, "start": start, "stop": stop, "files": files})
        except OSError as e:
            raise _storage_error(e, self.path)


def verify_cache(cache: Cache, progress: Any = None) -> list[str]:
    """Re-read every file of every block; return the problems found (empty list = healthy)."""
    problems = []
    for b in range(cache.layout.n_blocks):
        entry = cache.block_entry(b)
        if entry is None:
            problems.append(f"block {b} is missing (cache incomplete): rerun `harvest run` to finish it")
            continue
        expected = {str(f.relative_to(cache.path)) for f in cache.block_files(b)}
        missing_listing = expected - set(entry["files"])
        if missing_listing:
            problems.append(f"block {b}: manifest does not list {sorted(missing_listing)[0]}")
        for rel, want in entry["files"].items():
            f = cache.path / rel
            if not f.is_file():
                problems.append(f"{rel}: file missing")
                continue
            size, crc = file_checksum(f)
            if size != want["size"]:
                problems.append(f"{rel}: size {size} != {want['size']} (truncated or overwritten)")
            elif crc != want["crc32"]:
                problems.append(f"{rel}: crc32 mismatch (corrupt)")
            if progress is not None:
                progress(size)
    if cache.lens_record is not None:
        try:
            cache.lens()
        except CacheError as e:
            problems.append(str(e))
    return problems
