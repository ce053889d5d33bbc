"""Fast whole-chunk reader: all requested layers of one chunk of tokens, in a seeded random order, every
chunk checked against the checksum its block's manifest recorded at harvest time.

zarr-python costs ~0.5 ms per call and fancy indexing is slow (docs/performance.md), so this reader takes each inner
chunk's (offset, nbytes) from the manifest, checks the shard's own index (and its crc32c) against it once
per shard, and reads chunks straight into a ring of reusable (optionally pinned) buffers through the
cache's store: `os.preadv` on a local disk (hashed after the read, or slice by slice with
MLSAE_HASH_SLICE), ranged GETs on an object store. Several chunks are in flight on a thread pool; on an
object store chunks are fetched in groups (prefetch // 2 chunks: one `get_ranges` per object for all of the group's
ranges, which the client coalesces where they touch, up to MLSAE_READ_REQUESTS objects in flight), checked
on the downloaded bytes and copied once into the ring. A remote cache's block manifests are fetched when
their chunks are first read, so opening a reader over 10,000 blocks costs one listing. Hashing (xxh3) and
file / network reads release the GIL. `Cache.read` (zarr-python) stays the reference that the tests
compare this against byte for byte.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from .cache import (
    STORAGE_DTYPES,
    TOKEN_ARRAYS,
    BlockManifest,
    Cache,
    Decoder,
    FileEntry,
    chunk_hash,
    chunk_hasher,
    from_storage,
    index_nbytes,
    index_problem,
)
from .errors import CacheError, IntegrityError
from .settings import env_int
from .store import Store, StoreMissing

IO_THREADS = 32  # ranged GETs in flight per remote reader: MLSAE_READ_REQUESTS's default
LOCAL_PREFETCH = 8  # chunks in flight from a local disk (or a read-through copy)
REMOTE_PREFETCH = 16  # from an object store: groups of 8 chunks, one request per object covering them all
REMOTE_RING_BYTES = 4 << 30  # ... unless that many chunks' buffers would take more memory than this


def read_requests() -> int:
    """MLSAE_READ_REQUESTS, validated when a remote reader starts (never at import)."""
    return env_int("MLSAE_READ_REQUESTS", IO_THREADS, 1, 1024)


def default_prefetch(store: Store, chunk_bytes: int) -> int:
    """Chunks in flight when the caller does not choose: the local-disk value for a disk; on an object store,
    where every request waits for its first byte (10-50 ms on a real bucket) and a request per object costs
    the same for one chunk as for several, twice as many, in groups of half of them (one `get_ranges` per
    object and group), as far as REMOTE_RING_BYTES of buffers allows (never fewer than on a disk).
    docs/object_storage.md has the measurements behind these numbers."""
    if not store.coalesces:
        return LOCAL_PREFETCH
    return max(LOCAL_PREFETCH, min(REMOTE_PREFETCH, REMOTE_RING_BYTES // max(1, chunk_bytes) - 1))


@dataclass
class Chunk:
    index: int  # chunk number in the cache
    start: int  # first cache position
    acts: torch.Tensor  # [n_layers, n, d] the STORED values (bf16 by default; float8: uint8 codes): use `vectors`
    token_ids: torch.Tensor  # [n] int32
    keep: torch.Tensor  # [n] bool: False for special tokens (unless harvested with special_tokens=include)
    seq: torch.Tensor  # [n] int32: context window of each vector
    pos: torch.Tensor  # [n] int32: position inside that window
    decoder: Decoder | None = None  # the reader's (None: the stored values are the vectors)

    def vectors(
        self, rows: torch.Tensor | None = None, device: str | torch.device = "cpu", non_blocking: bool = False
    ) -> torch.Tensor:
        """The vectors [n_layers, len(rows), d] at chunk rows `rows` (all if None), on `device`, decoded
        (cache.Decoder: bf16 for a float8 cache) and copied out of the reader's reusable buffer. On a GPU the
        whole chunk's stored bytes are copied (`non_blocking`: asynchronously from pinned memory; the caller
        then keeps the buffer until the copy lands: the reader's `hold`), indexed and decoded there; on the
        CPU the rows are indexed first and only they are decoded."""
        device = torch.device(device)
        if device.type == "cpu":
            if rows is None:
                return self.acts.clone() if self.decoder is None else self.decoder(self.acts)
            x = self.acts[:, rows]  # advanced indexing copies
        else:
            x = self.acts.to(device, non_blocking=non_blocking)
            x = x if rows is None else x[:, rows.to(device)]
        return x if self.decoder is None else self.decoder(x)


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
    """Iterate whole chunks of a complete cache, each checked against its manifest.

    Yielded tensors are views into a ring of `prefetch + hold` reusable buffers: a chunk stays valid
    until `hold` further chunks have been requested. Copy (or move to the GPU) what you keep longer.
    """

    _check_chunks = True  # bench/harvest.py turns it off on one instance to measure the checksum's cost

    def __init__(
        self,
        cache: Cache,
        layers: Sequence[int] | None = None,
        seed: int = 0,
        prefetch: int | None = None,
        hold: int = 1,
        rank: int = 0,
        world_size: int = 1,
        pin_memory: bool = False,
        chunks: Sequence[int] | None = None,
        allow_incomplete: bool = False,
    ):
        # A remote cache: one listing and the windows manifest (which checks the metadata hash) at open; each
        # block's manifest is fetched and parsed when its first chunk is read (10,000 blocks = 10,000 GETs).
        # A local one: every manifest parsed now, as before (cheap on a disk).
        if cache.store.is_local:
            if not allow_incomplete:
                cache.require_complete()
            cache.require_checksums()
            self._blocks = set(cache.manifests())
        else:
            listed = cache.listed_blocks()
            if not allow_incomplete:
                cache.require_complete(listed)
            cache.windows_manifest()  # absent in a cache harvested before checksums: that line names the upgrade
            self._blocks = set(listed)
        self._checksummed: set[int] = set()
        self.cache, self.layout, self.store = cache, cache.layout, cache.store
        self.layers = list(cache.layers if layers is None else layers)
        self.layer_idx = [self.layout.layer_index(l) for l in self.layers]
        self.decoder = cache.decoder(self.layers) if cache.layout.dtype == "float8" else None
        self.seed, self.rank, self.world_size = seed, rank, world_size
        if not prefetch:  # None or 0: chosen for the store
            row_bytes = self.layout.d_model * STORAGE_DTYPES[self.layout.dtype][0].itemsize
            prefetch = default_prefetch(self.store, len(self.layers) * self.layout.chunk_tokens * row_bytes)
        self.prefetch, self.hold = max(1, prefetch), max(1, hold)
        if chunks is None:
            chunks = [c for b in sorted(self._blocks) for c in self.layout.chunks_of_block(b)]
        self.chunks = np.asarray(chunks, dtype=np.int64)
        self._codec = {name: _inner_codec(cache.array_meta[name]) for name in ["acts", *TOKEN_ARRAYS]}
        if not all(self._codec.values()):
            raise CacheError(f"{cache.location} uses codecs this reader does not know: re-harvest it")
        self._checked_index: set[str] = set()
        self._fix = f"run `harvest verify {cache.location}` and re-harvest the damaged blocks"
        # one chunk's ranged GETs in flight together on an object store (latency, not bandwidth, is the limit)
        self._io = None if self.store.is_local else ThreadPoolExecutor(read_requests(), thread_name_prefix="chunk-io")
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

    @property
    def group(self) -> int:
        """Chunks fetched together: 1 from a local disk; prefetch // 2 from an object store."""
        return max(1, self.prefetch // 2) if self.store.coalesces else 1

    def byte_ranges(self, chunks: Sequence[int]) -> dict[str, list[tuple[int, int]]]:
        """{object: [(start, stop), ...]} the stored bytes of these chunks (what a group of them fetches,
        without the shard indexes)."""
        ranges: dict[str, list[tuple[int, int]]] = {}
        for c in chunks:
            for key, entry, inner, _ in self._plan(int(c), 0)[1]:
                offset, nbytes, _ = entry.pieces[inner]
                ranges.setdefault(key, []).append((offset, offset + nbytes))
        return {k: sorted(v) for k, v in ranges.items()}

    def __len__(self) -> int:
        return len(self.order(0))

    def __iter__(self) -> Iterator[Chunk]:
        return self.epoch(0)

    def epoch(self, epoch: int = 0) -> Iterator[Chunk]:
        return self.iter_chunks(self.order(epoch))

    def iter_chunks(self, order: Sequence[int]) -> Iterator[Chunk]:
        """The given chunks, in the given order, with `prefetch` reads in flight. On an object store the
        chunks are fetched in groups of `prefetch // 2` (one `get_ranges` per object for all of a group's
        ranges, coalesced where they touch), so one group downloads while the previous one is consumed."""
        n_bufs, group = len(self._bufs), self.group
        with ThreadPoolExecutor(self.prefetch, thread_name_prefix="chunk-reader") as pool:
            pending: deque[tuple[Future, int]] = deque()
            batch: list[tuple[int, int]] = []  # (chunk, buffer) requested, not yet submitted
            try:
                for i, c in enumerate(order):
                    batch.append((int(c), i % n_bufs))
                    if len(batch) == group:
                        f = pool.submit(self.read_chunks, batch)
                        pending.extend((f, k) for k in range(len(batch)))
                        batch = []
                    # a buffer is written only after its chunk was requested: the ring stays safe as before
                    if len(pending) + len(batch) > self.prefetch - 1 and pending:
                        f, k = pending.popleft()
                        yield f.result()[k]
                if batch:
                    f = pool.submit(self.read_chunks, batch)
                    pending.extend((f, k) for k in range(len(batch)))
                while pending:
                    f, k = pending.popleft()
                    yield f.result()[k]
            finally:  # an error (or an abandoned iterator) must not leave reads writing into handed-out buffers
                for f, _ in pending:
                    f.cancel()

    # -- one chunk -------------------------------------------------------------------------------
    def read_chunk(self, c: int, buf: int = 0) -> Chunk:
        return self.read_chunks([(c, buf)])[0]

    def read_chunks(self, batch: Sequence[tuple[int, int]]) -> list[Chunk]:
        """Chunks (chunk number, ring buffer) read and checked: one read per inner chunk on a local disk; on
        an object store one `get_ranges` per object for all of the batch's ranges (and the shard index the
        first time), several objects in flight."""
        chunks, reads = [], []
        for c, buf in batch:
            chunk, chunk_reads = self._plan(c, buf)
            chunks.append(chunk)
            reads += chunk_reads
        try:
            if self._io is None:
                for key, entry, inner, out in reads:
                    self._read_inner(key, entry, inner, out)
            elif not self.store.coalesces:  # the read-through copy: each read straight into its buffer
                for f in [self._io.submit(self._read_inner, *r) for r in reads]:
                    f.result()
            else:
                by_key: dict[str, tuple[FileEntry, list]] = {}
                for key, entry, inner, out in reads:
                    by_key.setdefault(key, (entry, []))[1].append((inner, out))
                futures = [self._io.submit(self._fetch_object, k, e, parts) for k, (e, parts) in by_key.items()]
                for f in futures:
                    f.result()
        except StoreMissing as e:
            raise IntegrityError(f"{e}: {self._fix}")
        return chunks

    def _plan(self, c: int, buf: int) -> tuple[Chunk, list[tuple[str, FileEntry, int, np.ndarray]]]:
        """Chunk c as views of ring buffer `buf`, and its reads: (key, manifest entry, inner chunk, out)."""
        lay = self.layout
        start, stop = lay.chunk_range(c)
        n = stop - start
        acts, toks = self._bufs[buf], self._tok_bufs[buf]
        shard, inner = divmod(start, lay.shard_tokens)
        inner //= lay.chunk_tokens
        manifest = self._manifest(start // lay.block_tokens)
        if manifest is None:
            raise CacheError(f"chunk {c} of {self.cache.location} is not in a complete block: rerun `harvest run`")
        reads = [("acts", (li, shard, 0), out) for out, li in zip(acts, self.layer_idx)]
        reads += [(name, (shard,), out) for name, out in toks.items()]
        planned = []
        for array, coords, out in reads:
            key = self.cache.shard_key(array, coords)
            entry = manifest.files.get(key)
            if entry is None or entry.pieces is None:
                raise CacheError(f"{self.store.describe(key)} is not in its block's manifest: run `harvest verify`")
            if len(entry.pieces) != lay.shard_tokens // lay.chunk_tokens:
                raise CacheError(f"{self.store.describe(key)}: its manifest entry does not fit the layout: {self._fix}")
            if entry.pieces[inner] is None:
                raise CacheError(
                    f"{self.store.describe(key)}: chunk {inner} is absent although its block is in the manifest: "
                    f"run `harvest verify` and re-harvest"
                )
            planned.append((key, entry, inner, out))
        chunk = Chunk(
            c,
            start,
            from_storage(acts[:, :n], lay.dtype),
            *(torch.from_numpy(toks[name][:n]) for name in ["token_ids", "keep", "seq", "pos"]),
            self.decoder,
        )
        return chunk, planned

    def _manifest(self, b: int) -> BlockManifest | None:
        """A complete block's manifest (fetched on first use from a remote cache), None for other blocks."""
        if b not in self._blocks:
            return None
        m = self.cache.manifest(b)
        if b not in self._checksummed:
            if not m.checksummed:
                self.cache.require_checksums()  # one line naming `harvest upgrade`
            self._checksummed.add(b)
        return m

    def _index_range(self, entry: FileEntry) -> tuple[int, int]:
        """Where a shard's index (and its crc32c) lies: the end of the file."""
        n_inner = self.layout.shard_tokens // self.layout.chunk_tokens
        if entry.pieces is None or len(entry.pieces) != n_inner or entry.size < index_nbytes(n_inner):
            raise CacheError(f"a manifest entry does not fit this cache's layout (corrupt manifest): {self._fix}")
        return entry.size - index_nbytes(n_inner), entry.size

    def _check_index(self, key: str, entry: FileEntry, raw: bytes | memoryview | None = None) -> None:
        """Once per shard: its index must pass its crc32c and point exactly where the manifest says."""
        if key in self._checked_index:
            return
        lo, hi = self._index_range(entry)
        raw = bytes(self.store.get_range(key, lo, hi) if raw is None else raw)
        problem = index_problem(raw, entry.pieces or [])
        if problem is not None:
            raise self.cache.corrupt(key, f" shard index ({problem})")
        self._checked_index.add(key)

    def _read_inner(self, key: str, entry: FileEntry, inner: int, out: np.ndarray) -> None:
        """One inner chunk (a local disk, the read-through copy): straight into `out` (raw), hashed on the way,
        or decompressed into it (blosc)."""
        self._check_index(key, entry)
        offset, nbytes, want = entry.pieces[inner]
        if self._codec[key.split("/", 1)[0]] == "raw":
            view = memoryview(out.reshape(-1).view(np.uint8))
            if nbytes != view.nbytes:
                raise self.cache.corrupt(key, f" chunk {inner} (size)")
            hasher = chunk_hasher() if self._check_chunks else None
            self.store.read_into(key, offset, view, hasher)
            if hasher is not None and hasher.hexdigest() != want:
                raise self.cache.corrupt(key, f" chunk {inner}")
        else:
            self._decode(key, entry, inner, self.store.get_range(key, offset, offset + nbytes), out)

    def _fetch_object(self, key: str, entry: FileEntry, parts: list[tuple[int, np.ndarray]]) -> None:
        """Inner chunks of one object from an object store: one `get_ranges` (the client coalesces touching
        ranges into one request), with the shard index in the same call the first time. Each chunk is
        checked on the downloaded bytes, then copied once into its buffer."""
        parts = sorted(parts, key=lambda p: entry.pieces[p[0]][0])
        ranges = [(entry.pieces[j][0], entry.pieces[j][0] + entry.pieces[j][1]) for j, _ in parts]
        check_index = key not in self._checked_index
        if check_index:
            ranges.append(self._index_range(entry))
        got = self.store.get_ranges(key, [a for a, _ in ranges], [b for _, b in ranges], size=entry.size)
        if check_index:
            self._check_index(key, entry, got[-1])
        for (inner, out), data in zip(parts, got):
            self._decode(key, entry, inner, data, out)

    def _decode(self, key: str, entry: FileEntry, inner: int, data: bytes | memoryview, out: np.ndarray) -> None:
        """Stored bytes of an inner chunk -> `out`, checked against the manifest's size and xxh3 first."""
        _, nbytes, want = entry.pieces[inner]
        dst = out.reshape(-1).view(np.uint8)
        raw = self._codec[key.split("/", 1)[0]] == "raw"
        if len(memoryview(data)) != nbytes or (raw and nbytes != dst.nbytes):
            raise self.cache.corrupt(key, f" chunk {inner} (size)")
        if (self._check_chunks or not raw) and chunk_hash(data) != want:
            raise self.cache.corrupt(key, f" chunk {inner}")
        if raw:  # numpy copies without holding the GIL (a memoryview assignment holds it)
            np.copyto(dst, np.frombuffer(data, np.uint8))
        else:
            from numcodecs import blosc

            blosc.decompress(bytes(data), dst)

    def close(self) -> None:
        if self._io is not None:
            self._io.shutdown()
            self._io = None

    def __del__(self) -> None:
        if getattr(self, "_io", None) is not None:
            self._io.shutdown(wait=False)
