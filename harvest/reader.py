"""Fast whole-chunk reader: all requested layers of one chunk of tokens, in a seeded random order.

zarr-python costs ~0.5 ms per call and fancy indexing is slow (storage.md), so this reader parses each
shard's index once and `preadv`s inner chunks straight into reusable buffers, with several chunks in
flight on a thread pool (file reads release the GIL). `Cache.read` (zarr-python) stays the reference
that the tests compare this against byte for byte; caches whose codecs this reader does not know are
read through zarr-python instead.
"""

from __future__ import annotations

import os
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np
import torch

from .cache import STORAGE_DTYPES, TOKEN_ARRAYS, Cache, from_storage
from .errors import CacheError

ABSENT = np.uint64(2**64 - 1)


@dataclass
class Chunk:
    index: int  # chunk number in the cache
    start: int  # first cache position
    acts: torch.Tensor  # [n_layers, n, d] in the cache's dtype (bf16 by default)
    token_ids: torch.Tensor  # [n] int32
    keep: torch.Tensor  # [n] bool: False for special tokens (unless harvested with special_tokens=include)
    seq: torch.Tensor  # [n] int32: context window of each vector
    pos: torch.Tensor  # [n] int32: position inside that window


def _inner_codec(array_meta: dict) -> str | None:
    """'raw' or 'blosc' when the array is a sharded layout this reader understands, else None."""
    codecs = array_meta.get("codecs", [])
    if len(codecs) != 1 or codecs[0]["name"] != "sharding_indexed":
        return None
    conf = codecs[0]["configuration"]
    inner = [c["name"] for c in conf["codecs"]]
    index = [c["name"] for c in conf["index_codecs"]]
    if conf.get("index_location", "end") != "end" or index != ["bytes", "crc32c"]:
        return None
    endian = conf["codecs"][0].get("configuration", {}).get("endian", "little")
    if array_meta["data_type"] not in ("bool", "uint8") and endian != "little":
        return None
    return {("bytes",): "raw", ("bytes", "blosc"): "blosc"}.get(tuple(inner))


class ChunkReader:
    """Iterate whole chunks of a complete cache.

    Yielded tensors are views into a ring of `prefetch + hold` reusable buffers: a chunk stays valid
    until `hold` further chunks have been requested. Copy (or move to the GPU) what you keep longer.
    """

    def __init__(
        self,
        cache: Cache,
        layers: Sequence[int] | None = None,
        seed: int = 0,
        prefetch: int = 8,
        hold: int = 1,
        rank: int = 0,
        world_size: int = 1,
        pin_memory: bool = False,
        chunks: Sequence[int] | None = None,
        allow_incomplete: bool = False,
    ):
        if not allow_incomplete:
            cache.require_complete()
        self.cache, self.layout = cache, cache.layout
        self.layers = list(cache.layers if layers is None else layers)
        self.layer_idx = [self.layout.layer_index(l) for l in self.layers]
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.prefetch, self.hold = max(1, prefetch), max(1, hold)
        self.chunks = np.asarray(cache.complete_chunks() if chunks is None else chunks, dtype=np.int64)
        self._codec = {name: _inner_codec(cache.array_meta[name]) for name in ["acts", *TOKEN_ARRAYS]}
        self.fast = all(self._codec.values())
        self._index: dict[str, np.ndarray] = {}
        n_bufs = self.prefetch + self.hold
        shape = (len(self.layers), self.layout.chunk_tokens, self.layout.d_model)
        np_dtype = STORAGE_DTYPES[self.layout.dtype][0]
        self._bufs = [self._alloc(shape, np_dtype, pin_memory) for _ in range(n_bufs)]
        self._tok_bufs = [
            {n: np.empty(self.layout.chunk_tokens, dt) for n, dt in TOKEN_ARRAYS.items()} for _ in range(n_bufs)
        ]

    @staticmethod
    def _alloc(shape: tuple[int, ...], np_dtype: np.dtype, pin: bool) -> np.ndarray:
        if pin and torch.cuda.is_available():
            t = torch.empty(int(np.prod(shape)) * np_dtype.itemsize, dtype=torch.uint8, pin_memory=True)
            return t.numpy().view(np_dtype).reshape(shape)
        return np.empty(shape, np_dtype)

    # -- order -----------------------------------------------------------------------------------
    def order(self, epoch: int = 0) -> np.ndarray:
        """This rank's chunk numbers for an epoch: one seeded permutation, split round-robin."""
        perm = np.random.default_rng([self.seed, epoch]).permutation(self.chunks)
        return perm[self.rank :: self.world_size]

    def __len__(self) -> int:
        return len(self.order(0))

    def __iter__(self) -> Iterator[Chunk]:
        return self.epoch(0)

    def epoch(self, epoch: int = 0) -> Iterator[Chunk]:
        return self.iter_chunks(self.order(epoch))

    def iter_chunks(self, order: Sequence[int]) -> Iterator[Chunk]:
        """The given chunks, in the given order, with `prefetch` reads in flight."""
        n_bufs = len(self._bufs)
        with ThreadPoolExecutor(self.prefetch, thread_name_prefix="chunk-reader") as pool:
            pending: deque[Future] = deque()
            for i, c in enumerate(order):
                pending.append(pool.submit(self.read_chunk, int(c), i % n_bufs))
                if len(pending) > self.prefetch - 1:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()

    # -- one chunk -------------------------------------------------------------------------------
    def read_chunk(self, c: int, buf: int = 0) -> Chunk:
        start, stop = self.layout.chunk_range(c)
        n = stop - start
        acts, toks = self._bufs[buf], self._tok_bufs[buf]
        shard, inner = divmod(start, self.layout.shard_tokens)
        inner //= self.layout.chunk_tokens
        if self.fast:
            for out, li in zip(acts, self.layer_idx):
                self._read_inner("acts", (li, shard, 0), inner, out)
            for name, out in toks.items():
                self._read_inner(name, (shard,), inner, out)
        else:  # zarr-python fallback for layouts this reader does not parse
            g = self.cache.group
            for out, li in zip(acts, self.layer_idx):
                out[:n] = g["acts"][li, start:stop]
            for name, out in toks.items():
                out[:n] = g[name][start:stop]
        return Chunk(
            c,
            start,
            from_storage(acts[:, :n], self.layout.dtype),
            *(torch.from_numpy(toks[name][:n]) for name in ["token_ids", "keep", "seq", "pos"]),
        )

    def _shard_index(self, path: str, n_inner: int) -> np.ndarray:
        idx = self._index.get(path)
        if idx is None:
            size = 16 * n_inner + 4
            with open(path, "rb") as f:
                f.seek(-size, os.SEEK_END)
                raw = f.read(size)
            idx = np.frombuffer(raw[:-4], dtype="<u8").reshape(n_inner, 2)
            self._index[path] = idx
        return idx

    def _read_inner(self, array: str, shard_coords: tuple[int, ...], inner: int, out: np.ndarray) -> None:
        path = str(self.cache.shard_file(array, shard_coords))
        n_inner = self.layout.shard_tokens // self.layout.chunk_tokens
        offset, nbytes = self._shard_index(path, n_inner)[inner]
        if offset == ABSENT:
            raise CacheError(
                f"{path}: chunk {inner} is absent although its block is in the manifest: "
                f"run `harvest verify` and re-harvest"
            )
        fd = os.open(path, os.O_RDONLY)
        try:
            if self._codec[array] == "raw":
                view = memoryview(out.reshape(-1).view(np.uint8))
                if nbytes != view.nbytes or os.preadv(fd, [view], int(offset)) != nbytes:
                    raise CacheError(f"{path}: short read of chunk {inner}: run `harvest verify`")
            else:
                from numcodecs import blosc

                blosc.decompress(os.pread(fd, int(nbytes), int(offset)), out.reshape(-1))
        finally:
            os.close(fd)
