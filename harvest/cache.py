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
float8 is stored as uint8 float8_e4m3fn codes, decoded with the per-channel `scales` array
(harvest/float8.py, docs/float8.md):

    scales/                    [n_layers, d_model] float32, one chunk, checksummed in manifest/windows.json
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import zlib
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

import google_crc32c
import numpy as np
import torch
import xxhash
import zarr

from .errors import CacheError, IntegrityError
from .stats import LayerStats
from .store import LocalStore, ReadThroughStore, Store, StoreMissing, open_store

if TYPE_CHECKING:
    from .lens import Lens, LensSource

FORMAT = "mlsae-cache"
FORMAT_VERSION = 1
META_KEY = "mlsae_cache"
TOKEN_ARRAYS = {"token_ids": "int32", "keep": "bool", "seq": "int32", "pos": "int32"}
LENS_DIR = "lens"  # the tuned lens the vectors went through (config.json + params.pt), when there was one
STORAGE_DTYPES = {  # logical dtype -> (numpy storage dtype, torch dtype of the stored values)
    "bfloat16": (np.dtype("uint16"), torch.bfloat16),
    "float32": (np.dtype("float32"), torch.float32),
    "float16": (np.dtype("float16"), torch.float16),
    "float8": (np.dtype("uint8"), torch.uint8),  # float8_e4m3fn codes; decoded with the scales (float8.py)
}
VECTOR_DTYPES = {"float8": torch.bfloat16}  # decoded vectors' dtype where it is not the stored one (exact)
SCALES_KEY = "scales/c/0/0"  # the float8 scales' one chunk
FLOAT16_MAX = 65504.0


# ---------------------------------------------------------------------------------------------
# dtype conversion


def to_storage(x: torch.Tensor, dtype: str) -> np.ndarray:
    """A float tensor (any device; float8: its uint8 codes) -> numpy array of the storage dtype, on the CPU."""
    np_dtype, torch_dtype = STORAGE_DTYPES[dtype]
    y = x.to(torch_dtype).cpu()
    if dtype == "bfloat16":
        return y.view(torch.int16).numpy().view(np_dtype)
    return y.numpy()


def vector_dtype(dtype: str) -> torch.dtype:
    """The torch dtype of decoded vectors of a cache of logical dtype `dtype`."""
    return VECTOR_DTYPES.get(dtype, STORAGE_DTYPES[dtype][1])


class Decoder:
    """Stored values -> vectors: THE decode path of every reader (chunks, reference reads). The identity for
    bfloat16/float16/float32; float8 codes times their layer's scales (harvest/float8.py), computed on the
    device the codes are on (after the copy, on a GPU). `scale` [n_layers read, d] float32, or None."""

    def __init__(self, dtype: str, scale: torch.Tensor | None):
        self.dtype, self.scale = vector_dtype(dtype), scale
        self._on: dict[torch.device, torch.Tensor] = {}

    def __call__(self, stored: torch.Tensor) -> torch.Tensor:
        """stored [n_layers, n, d] (the layers this decoder was made for) -> vectors of `self.dtype`."""
        if self.scale is None:
            return stored
        from .float8 import decode

        scale = self._on.get(stored.device)
        if scale is None:
            scale = self._on.setdefault(stored.device, self.scale.to(stored.device, self.dtype))
        return decode(stored, scale, self.dtype)


def from_storage(a: np.ndarray, dtype: str) -> torch.Tensor:
    """Zero-copy view of stored values as a torch tensor of the logical dtype (float8: its uint8 codes)."""
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
# checksums and shard encoding

ABSENT = 2**64 - 1  # shard index entry (offset, nbytes) of an inner chunk that was never written
MANIFEST_VERSION = 2  # 1 (before chunk checksums): {"size", "crc32"} per file; see `harvest upgrade`
WINDOWS_MANIFEST = "manifest/windows.json"
LOCK_KEY = ".mlsae-lock.json"  # harvest/lock.py's lock object; part of a cache location, never of its data


def chunk_hash(data: Any) -> str:
    """xxh3-64 of stored bytes (hex). Chosen over crc32c: it takes any buffer without a copy, runs at ~19 GB/s
    per core here and releases the GIL, so the reader's threads check chunks in parallel."""
    return f"{xxhash.xxh3_64_intdigest(data):016x}"


def chunk_hasher() -> Any:
    """A streaming xxh3-64 (`update` piece by piece): its hexdigest() equals chunk_hash of all the pieces."""
    return xxhash.xxh3_64()


def index_crc(index: bytes) -> bytes:
    """The crc32c that zarr's sharding codec appends to a shard index (little-endian u32)."""
    return np.uint32(google_crc32c.value(index)).tobytes()


def meta_hash(attrs: dict[str, Any]) -> str:
    """sha256 of the cache's metadata (zarr.json attributes), recorded in every manifest: a hand edit of the
    token count or the layer labels no longer matches the blocks that were harvested under the original."""
    return hashlib.sha256(json.dumps(attrs, sort_keys=True).encode()).hexdigest()


def _blosc(itemsize: int) -> Any:
    from numcodecs import Blosc

    # the exact configuration zarr's BloscCodec builds from `_codecs` (so zarr-python reads our shards)
    return Blosc.from_config(dict(cname="zstd", clevel=1, shuffle=1, blocksize=1 << 20, typesize=itemsize))


def encode_shard(rows: np.ndarray, shard_rows: int, chunk_rows: int, compression: str) -> tuple[bytes, list]:
    """One shard file in zarr's `sharding_indexed` layout (inner chunks, then the index of (offset, nbytes)
    u64 pairs and its crc32c), from the `rows` the array holds in it (fewer than `shard_rows` at the array's
    end: a partial last chunk is zero-padded, chunks past the end are absent). Returns the bytes and the
    manifest's pieces: [offset, nbytes, xxh3] per inner chunk, None where absent."""
    parts, pieces, index, offset = [], [], [], 0
    codec = _blosc(rows.dtype.itemsize) if compression != "none" else None
    for lo in range(0, shard_rows, chunk_rows):
        if lo >= len(rows):
            index.append((ABSENT, ABSENT))
            pieces.append(None)
            continue
        chunk = rows[lo : lo + chunk_rows]
        if len(chunk) < chunk_rows:
            chunk = np.concatenate([chunk, np.zeros((chunk_rows - len(chunk), *chunk.shape[1:]), chunk.dtype)])
        data = np.ascontiguousarray(chunk).view(np.uint8).reshape(-1)
        data = codec.encode(data) if codec is not None else data.tobytes()
        parts.append(data)
        index.append((offset, len(data)))
        pieces.append([offset, len(data), chunk_hash(data)])
        offset += len(data)
    raw_index = np.asarray(index, dtype="<u8").tobytes()
    return b"".join([*parts, raw_index, index_crc(raw_index)]), pieces


def index_nbytes(n_inner: int) -> int:
    """Size of a shard's index ((offset, nbytes) u64 pairs per inner chunk, then its crc32c)."""
    return 16 * n_inner + 4


def index_problem(raw: bytes, pieces: list) -> str | None:
    """What is wrong with a shard's index bytes against the manifest's pieces, None if nothing: it must pass its
    crc32c and point exactly where the manifest says."""
    if len(raw) != index_nbytes(len(pieces)) or index_crc(raw[:-4]) != raw[-4:]:
        return "fails its crc32c (torn or corrupt)"
    got = np.frombuffer(raw[:-4], "<u8").reshape(len(pieces), 2).tolist()
    if got != [[p[0], p[1]] if p is not None else [ABSENT, ABSENT] for p in pieces]:
        return "has an entry redirected (does not match the manifest)"
    return None


def range_ok(entry: "FileEntry", start: int, data: Any, digest: str | None = None) -> bool | None:
    """Whether bytes read at `start` of a stored file are what its manifest recorded: an inner chunk (xxh3;
    `digest`: the caller hashed them already), a shard's index (crc32c and entries) or the whole file (crc32).
    None for any other range: the manifest has nothing to check it against."""
    n = memoryview(data).nbytes
    for p in entry.pieces or []:
        if p is not None and p[0] == start and p[1] == n:
            return (digest or chunk_hash(data)) == p[2]
    if start == 0 and n == entry.size:
        return zlib.crc32(data) == entry.crc32
    if entry.pieces and start + n == entry.size and n == index_nbytes(len(entry.pieces)):
        return index_problem(bytes(data), entry.pieces) is None
    return None


def whole_file(data: bytes) -> dict[str, Any]:
    """Manifest entry of a file that is read whole (stats, windows chunks): one piece."""
    return {"size": len(data), "crc32": zlib.crc32(data), "pieces": [[0, len(data), chunk_hash(data)]]}


# ---------------------------------------------------------------------------------------------
# manifests: ONE parser, so run, train, info and verify agree on what is complete


@dataclass(frozen=True)
class FileEntry:
    size: int
    crc32: int  # of the whole file (zlib): what verify, push/pull and the read-through cache check
    pieces: list | None = None  # [offset, nbytes, xxh3] per inner chunk (None = absent); None in old manifests


@dataclass(frozen=True)
class BlockManifest:
    block: int
    start: int
    stop: int
    files: dict[str, FileEntry]
    meta_sha256: str | None  # None in old manifests

    @property
    def checksummed(self) -> bool:
        return self.meta_sha256 is not None and all(f.pieces is not None for f in self.files.values())

    def to_json(self) -> bytes:
        files = {k: {"size": f.size, "crc32": f.crc32, "pieces": f.pieces} for k, f in self.files.items()}
        d = {"version": MANIFEST_VERSION, "block": self.block, "start": self.start, "stop": self.stop}
        return json.dumps({**d, "meta_sha256": self.meta_sha256, "files": files}, indent=1).encode()


def file_entry(v: dict[str, Any]) -> FileEntry:
    """One manifest entry, checked: every piece [offset, nbytes, xxh3] lies inside the file's recorded size, so
    no reader ever asks for a byte range beyond an object's end (ValueError otherwise)."""
    entry = FileEntry(int(v["size"]), int(v["crc32"]), v.get("pieces"))
    if entry.size < 0 or not (entry.pieces is None or isinstance(entry.pieces, list)):
        raise ValueError("a file entry has a negative size or malformed pieces")
    for p in entry.pieces or []:
        if p is None:
            continue
        if not (isinstance(p, list) and len(p) == 3 and all(type(x) is int for x in p[:2]) and isinstance(p[2], str)):
            raise ValueError(f"a piece {p!r} is not [offset, nbytes, xxh3]")
        if p[0] < 0 or p[1] < 0 or p[0] + p[1] > entry.size:
            raise ValueError(f"a piece [{p[0]}, {p[1]}] lies beyond the file's recorded size {entry.size}")
    return entry


def parse_manifest(raw: bytes, where: str, fix: str) -> BlockManifest:
    """A manifest's bytes -> BlockManifest; anything malformed is corrupt (one line with `fix`)."""
    try:
        d = json.loads(raw)
        files = {k: file_entry(v) for k, v in d["files"].items()}
        return BlockManifest(int(d["block"]), int(d["start"]), int(d["stop"]), files, d.get("meta_sha256"))
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        kind = "invalid JSON" if isinstance(e, json.JSONDecodeError) else f"malformed ({type(e).__name__}: {e})"
        raise CacheError(f"{where} is corrupt ({kind}): {fix}")


# ---------------------------------------------------------------------------------------------
# the cache


def _codecs(compression: str, itemsize: int) -> dict[str, Any]:
    if compression == "none":
        return {"compressors": None}
    from zarr.codecs import BloscCodec

    return {"compressors": BloscCodec(cname="zstd", clevel=1, shuffle="shuffle", typesize=itemsize, blocksize=1 << 20)}


def _zarr_documents(meta: dict[str, Any], layout: Layout, n_windows: int) -> dict[str, bytes]:
    """The zarr.json documents of an empty cache, made by zarr-python itself (in memory)."""
    from zarr.storage import MemoryStore

    docs: dict[str, Any] = {}
    root = zarr.open_group(MemoryStore(docs), mode="w", attributes={META_KEY: meta})
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
    root.create_array(
        "windows",
        shape=(n_windows, layout.context),
        dtype="int32",
        chunks=(windows_chunk_rows(layout, n_windows), layout.context),
        compressors=None,
    )
    if layout.dtype == "float8":
        shape = (len(layout.layers), d)
        root.create_array("scales", shape=shape, dtype="float32", chunks=shape, compressors=None)
    return {k: v.to_bytes() for k, v in docs.items()}


def windows_chunk_rows(layout: Layout, n_windows: int) -> int:
    return min(max(1, (1 << 20) // layout.context), n_windows)


CACHE_NAMES = {"zarr.json", "acts", "windows", "scales", "manifest", LENS_DIR, LOCK_KEY, *TOKEN_ARRAYS}


def location_state(store: Store) -> str:
    """'absent' (nothing there), 'cache' (a root zarr.json: created), 'partial' (only cache files: a creation
    that was interrupted, safe to redo) or 'foreign' (anything else: never touched)."""
    if store.exists("zarr.json"):
        return "cache"  # without listing a big cache's objects
    keys = store.list()
    if not keys:
        return "absent"
    tops = {k.split("/", 1)[0] for k in keys}
    # hidden names: the lock and temporary files of interrupted writes (".zarr.json.XXXX.tmp")
    return "partial" if all(t in CACHE_NAMES or t.startswith(".") for t in tops) else "foreign"


def create_cache(
    location: str | Path | Store,
    meta: dict[str, Any],
    layout: Layout,
    windows: np.ndarray,
    lens: "LensSource | None" = None,
    scales: torch.Tensor | None = None,
) -> None:
    """Create an empty cache: array metadata, token windows and (float8) the scales, both checksummed in
    manifest/windows.json, a copy of its tuned lens, and the root zarr.json LAST, only if absent: the
    creation's commit point, on a disk as in a bucket. Leftovers of an interrupted creation are replaced.
    The lens copy keeps the cache self-contained: analyses read it from there."""
    if (scales is not None) != (layout.dtype == "float8") or (
        scales is not None and tuple(scales.shape) != (len(layout.layers), layout.d_model)
    ):
        raise ValueError(f"scales {None if scales is None else tuple(scales.shape)} do not fit dtype {layout.dtype}")
    store = location if isinstance(location, Store) else open_store(location)
    state = location_state(store)
    if state in ("cache", "foreign"):
        raise CacheError(f"{store.location} exists and is not an empty location: choose another --out or remove it")
    for top in CACHE_NAMES - {LOCK_KEY}:
        store.delete_prefix(top)
    meta = {**meta, "format": FORMAT, "format_version": FORMAT_VERSION, "layout": asdict(layout)}
    docs = _zarr_documents(meta, layout, len(windows))
    root = docs.pop("zarr.json")
    for key, doc in docs.items():
        store.put(key, doc)
    rows = windows_chunk_rows(layout, len(windows))
    files = {}
    w = windows.astype("<i4")
    for i in range(0, len(w), rows):
        part = w[i : i + rows]
        if len(part) < rows:  # zarr pads edge chunks to the full chunk shape
            part = np.concatenate([part, np.zeros((rows - len(part), w.shape[1]), w.dtype)])
        data = part.tobytes()
        key = f"windows/c/{i // rows}/0"
        store.put(key, data)
        files[key] = whole_file(data)
    if scales is not None:
        data = scales.to(torch.float32).contiguous().numpy().astype("<f4").tobytes()
        store.put(SCALES_KEY, data)
        files[SCALES_KEY] = whole_file(data)
    attrs_hash = meta_hash(json.loads(root)["attributes"][META_KEY])
    store.put(WINDOWS_MANIFEST, json.dumps({"meta_sha256": attrs_hash, "files": files}, indent=1).encode())
    if lens is not None:
        for name in ("config.json", "params.pt"):
            store.put(f"{LENS_DIR}/{name}", (lens.folder / name).read_bytes())
    if not store.create("zarr.json", root):
        raise CacheError(f"{store.location} was created by another process meanwhile: rerun to resume it")


class Cache:
    """Read access to a cache: metadata, manifests, statistics, verified token reads, and reference
    (zarr-python) reads. `location` is a path or a URL; `local_cache` a folder for a read-through copy."""

    def __init__(self, location: str | Path | Store, local_cache: str | Path | None = None):
        self._manifests: dict[int, BlockManifest] | None = None
        self._fetched: dict[int, BlockManifest] = {}  # manifests fetched one at a time (`manifest`)
        self._fetch_lock = threading.Lock()
        self._fetching: dict[int, threading.Lock] = {}
        self._windows_entries: dict[str, FileEntry] | None = None
        self._lens_folder: Path | None = None
        store = location if isinstance(location, Store) else open_store(location)
        if not local_cache and not isinstance(location, Store):  # a store given is used as it is (writers, verify)
            local_cache = os.environ.get("MLSAE_LOCAL_CACHE") or None
        if local_cache and not store.is_local:
            store = ReadThroughStore(store, local_cache, expected=self._expected_piece, check=range_ok)
        self.store = store
        self.location = store.location
        where = self.location
        try:
            raw = store.get("zarr.json")
        except StoreMissing:
            raise CacheError(f"{where} is not a cache (no zarr.json): check the path or run `harvest run` first")
        try:
            attrs = json.loads(raw)["attributes"][META_KEY]
        except (KeyError, TypeError, ValueError):
            raise CacheError(f"{where} is a zarr group but not an mlsae cache (or its zarr.json is corrupt): check it")
        if not isinstance(attrs, dict) or attrs.get("format_version") != FORMAT_VERSION:
            raise CacheError(
                f"{where} has cache format version {attrs.get('format_version') if isinstance(attrs, dict) else None}, "
                f"this code reads {FORMAT_VERSION}: re-harvest it or install a matching version"
            )
        try:
            self.layout = Layout.from_dict(attrs["layout"])
        except (KeyError, TypeError, ValueError):
            raise CacheError(f"{where}/zarr.json has a malformed layout (edited?): restore it or re-harvest")
        self.meta: dict[str, Any] = attrs
        self.meta_sha256 = meta_hash(attrs)

    # -- metadata ------------------------------------------------------------------------------
    @property
    def path(self) -> Any:
        """The cache folder as a Path for a local cache; the URL (str) of a remote one."""
        return self.store.root if isinstance(self.store, LocalStore) else self.location

    @property
    def fingerprint(self) -> str:
        return self.meta["fingerprint"]

    @property
    def layers(self) -> tuple[int, ...]:
        return self.layout.layers

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the vectors readers get (decoded: bfloat16 for a float8 cache)."""
        return vector_dtype(self.layout.dtype)

    @cached_property
    def scales(self) -> torch.Tensor | None:
        """float8 caches: the per-channel scales [n_layers, d] float32 (checked against manifest/windows.json);
        None for other dtypes."""
        if self.layout.dtype != "float8":
            return None
        data = self.read_whole(SCALES_KEY, self.windows_manifest().get(SCALES_KEY))
        shape = (len(self.layers), self.layout.d_model)
        if len(data) != 4 * shape[0] * shape[1]:
            raise self.corrupt(SCALES_KEY, " (size)")
        return torch.from_numpy(np.frombuffer(data, "<f4").reshape(shape).copy())

    def decoder(self, layers: Iterable[int] | None = None) -> Decoder:
        """The decoder of stored values of these model layers (all of the cache's, in storage order, if None)."""
        idx = list(range(len(self.layers))) if layers is None else [self.layout.layer_index(l) for l in layers]
        scales = self.scales
        return Decoder(self.layout.dtype, None if scales is None else scales[idx])

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
        folder = self._lens_copy()
        if folder is None or params_sha256(folder) != rec["params_sha256"]:
            raise CacheError(
                f"{self.store.describe(LENS_DIR)} is missing or differs from the lens the cache was harvested "
                f"with (sha256 {rec['params_sha256'][:12]}): restore it from {rec['path']} or re-harvest"
            )
        return Lens.load(folder, self.layout.d_model, self.meta["model"]["n_layers"])

    def _lens_copy(self) -> Path | None:
        """A local folder holding the cache's lens files (the cache's own folder when it is local)."""
        if isinstance(self.store, LocalStore):
            folder = self.store.root / LENS_DIR
            return folder if (folder / "params.pt").is_file() else None
        if self._lens_folder is None:
            import tempfile

            folder = Path(tempfile.mkdtemp(prefix="mlsae-lens-"))
            try:
                for name in ("config.json", "params.pt"):
                    (folder / name).write_bytes(self.store.get(f"{LENS_DIR}/{name}"))
            except StoreMissing:
                return None
            self._lens_folder = folder
        return self._lens_folder

    # -- manifests -----------------------------------------------------------------------------
    def manifest_key(self, b: int) -> str:
        return f"manifest/block-{b:06d}.json"

    def stats_key(self, b: int) -> str:
        return f"manifest/block-{b:06d}.stats.safetensors"

    def manifest_path(self, b: int) -> Path:
        return self.path / self.manifest_key(b)

    def manifests(self, refresh: bool | str = False) -> dict[int, BlockManifest]:
        """Every committed block's manifest, parsed and checked against the cache's metadata: THE definition
        of a complete block, for every command. `refresh` lists again and fetches only new manifests (they
        are written once), several in flight."""
        if self._manifests is None or refresh:
            names = {self.manifest_key(b): b for b in range(self.layout.n_blocks)}
            keys = [k for k in self.store.list("manifest") if k in names]
            known = {} if self._manifests is None or refresh == "all" else self._manifests
            new = [k for k in keys if names[k] not in known]
            raws = self.store.parallel(self.store.get, new)
            parsed = {names[k]: self._parse(k, raw) for k, raw in zip(new, raws)}
            self._manifests = {names[k]: known.get(names[k]) or parsed[names[k]] for k in keys}
        return self._manifests

    def _parse(self, key: str, raw: bytes) -> BlockManifest:
        where = self.store.describe(key)
        m = parse_manifest(raw, where, f"run `harvest verify {self.location}`, delete it and rerun `harvest run`")
        if m.meta_sha256 is not None and m.meta_sha256 != self.meta_sha256:
            raise IntegrityError(
                f"{self.store.describe('zarr.json')} differs from the metadata block {m.block} was harvested "
                f"with (edited by hand?): restore the original zarr.json or re-harvest; `harvest verify` checks"
            )
        if (m.block, m.start, m.stop) != (self.manifest_block(key), *self.layout.block_range(m.block)):
            raise CacheError(f"{where} is corrupt (wrong block range): run `harvest verify {self.location}`")
        return m

    def listed_blocks(self) -> list[int]:
        """Blocks whose manifest object exists: one listing, nothing fetched. What a reader of a big remote
        cache starts from; each manifest is then fetched and parsed by `manifest` when first needed."""
        names = {self.manifest_key(b): b for b in range(self.layout.n_blocks)}
        return sorted(names[k] for k in self.store.list("manifest") if k in names)

    def manifest(self, b: int) -> BlockManifest:
        """Block b's manifest, parsed and checked like `manifests` does (the same parser, the metadata hash),
        fetched on first use and kept."""
        if self._manifests is not None and b in self._manifests:
            return self._manifests[b]
        with self._fetch_lock:
            m = self._fetched.get(b)
            block_lock = self._fetching.setdefault(b, threading.Lock())
        if m is not None:
            return m
        with block_lock:  # one GET per manifest, however many threads want it
            if b not in self._fetched:
                key = self.manifest_key(b)
                try:
                    m = self._parse(key, self.store.get(key))
                except StoreMissing:
                    raise CacheError(f"block {b} of {self.location} has no manifest (incomplete): rerun `harvest run`")
                with self._fetch_lock:
                    self._fetched[b] = m
        return self._fetched[b]

    def manifest_block(self, key: str) -> int:
        return int(key.rsplit("-", 1)[1].split(".")[0])

    def complete_blocks(self) -> list[int]:
        return sorted(self.manifests(refresh=True))

    @property
    def complete(self) -> bool:
        return len(self.complete_blocks()) == self.layout.n_blocks

    def require_complete(self, blocks: list[int] | None = None) -> None:
        """`blocks`: the committed blocks already known (e.g. `listed_blocks`), else `complete_blocks`."""
        done = len(self.complete_blocks() if blocks is None else blocks)
        if done != self.layout.n_blocks:
            raise CacheError(
                f"cache {self.location} is incomplete ({done}/{self.layout.n_blocks} blocks): "
                f"rerun the same `harvest run` command to finish it"
            )

    def require_checksums(self) -> None:
        """Readers refuse blocks harvested before chunk checksums existed: one line naming the upgrade."""
        old = [b for b, m in self.manifests().items() if not m.checksummed]
        if old or not self.store.exists(WINDOWS_MANIFEST):
            raise CacheError(
                f"cache {self.location} was harvested without chunk checksums ({len(old)} blocks): "
                f"run `harvest upgrade {self.location}` once (it verifies the files and adds them)"
            )

    def complete_chunks(self) -> list[int]:
        return [c for b in self.complete_blocks() for c in self.layout.chunks_of_block(b)]

    def stats(self) -> LayerStats:
        """Per-layer statistics over the kept tokens of all complete blocks (each file checked)."""
        total = LayerStats.zeros(len(self.layers), self.layout.d_model)
        for b, m in sorted(self.manifests(refresh=True).items()):
            raw = self.read_whole(self.stats_key(b), m.files.get(self.stats_key(b)))
            total = total.merge(LayerStats.from_tensors(load_bytes(raw)))
        return total

    def size_on_disk(self) -> int:
        return sum(self.store.list().values())

    # -- file locations (for the fast reader and verify) -------------------------------------------
    @cached_property
    def array_meta(self) -> dict[str, dict[str, Any]]:
        names = ["acts", "windows", *TOKEN_ARRAYS]
        try:
            return {n: json.loads(self.store.get(f"{n}/zarr.json")) for n in names}
        except (StoreMissing, ValueError) as e:
            raise CacheError(f"{self.location}: array metadata missing or corrupt ({e}): re-harvest")

    def shard_key(self, array: str, shard_coords: Iterable[int]) -> str:
        sep = self.array_meta[array]["chunk_key_encoding"]["configuration"]["separator"]
        return f"{array}/" + sep.join(["c", *map(str, shard_coords)])

    def shard_file(self, array: str, shard_coords: Iterable[int]) -> Path:
        return self.path / self.shard_key(array, shard_coords)

    def block_keys(self, b: int) -> list[str]:
        keys = []
        for s in self.layout.shards_of_block(b):
            keys += [self.shard_key("acts", (li, s, 0)) for li in range(len(self.layers))]
            keys += [self.shard_key(name, (s,)) for name in TOKEN_ARRAYS]
        return keys

    # -- verified reads ----------------------------------------------------------------------------
    def _expected_piece(self, key: str) -> FileEntry | None:
        """The manifest entry of a data file (for the read-through cache's check of whole downloads); None for
        metadata, which is always read from the source."""
        if key.endswith("zarr.json") or key.split("/", 1)[0] not in ("acts", "windows", "scales", *TOKEN_ARRAYS):
            return None
        if key.startswith(("windows/", "scales/")):
            return self.windows_manifest().get(key)
        array = key.split("/", 1)[0]
        sep = self.array_meta[array]["chunk_key_encoding"]["configuration"]["separator"]
        coords = key[len(array) + 1 :].split(sep)[1:]  # "c", then the shard coordinates
        try:
            shard = int(coords[1] if array == "acts" else coords[0])
        except (IndexError, ValueError):
            return None
        b = shard * self.layout.shard_tokens // self.layout.block_tokens
        try:  # only this block's manifest (fetched once): a big remote cache is never read whole for this
            return self.manifest(b).files.get(key)
        except CacheError:
            if self.store.exists(self.manifest_key(b)):
                raise  # a corrupt manifest: its one line
            return None  # not in a committed block: read from the source (the reader refuses such chunks)

    def read_whole(self, key: str, entry: FileEntry | None) -> bytes:
        """A small file read whole and checked against its manifest entry (xxh3; crc32 in old manifests)."""
        if entry is None:
            raise CacheError(f"{self.store.describe(key)} is not in its manifest: run `harvest verify {self.location}`")
        try:
            data = self.store.get(key)
        except StoreMissing:
            raise IntegrityError(f"{self.store.describe(key)} is missing: run `harvest verify {self.location}`")
        if entry.pieces is not None:
            ok = len(data) == entry.size and chunk_hash(data) == entry.pieces[0][2]
        else:
            ok = len(data) == entry.size and zlib.crc32(data) == entry.crc32
        if not ok:
            raise self.corrupt(key)
        return data

    def corrupt(self, key: str, what: str = "") -> IntegrityError:
        return IntegrityError(
            f"{self.store.describe(key)}{what} does not match its checksum (corrupt): "
            f"run `harvest verify {self.location}` and re-harvest the damaged blocks"
        )

    def windows_manifest(self) -> dict[str, FileEntry]:
        if self._windows_entries is None:
            self._windows_entries = self._read_windows_manifest()
        return self._windows_entries

    def _read_windows_manifest(self) -> dict[str, FileEntry]:
        try:
            d = json.loads(self.store.get(WINDOWS_MANIFEST))
            if d["meta_sha256"] != self.meta_sha256:
                raise IntegrityError(
                    f"{self.store.describe('zarr.json')} differs from the metadata the cache was created with "
                    f"(edited by hand?): restore the original zarr.json or re-harvest"
                )
            return {k: file_entry(v) for k, v in d["files"].items()}
        except StoreMissing:
            self.require_checksums()
            raise
        except (ValueError, KeyError, TypeError):
            where = self.store.describe(WINDOWS_MANIFEST)
            raise CacheError(f"{where} is corrupt: run `harvest verify {self.location}`")

    def windows(self) -> torch.Tensor:
        """Every context window [n_sequences, context] int32, each chunk checked."""
        n, ctx = self.layout.n_sequences, self.layout.context
        rows = windows_chunk_rows(self.layout, n)
        entries = self.windows_manifest()
        out = np.empty((n, ctx), np.int32)
        for i in range(0, n, rows):
            key = f"windows/c/{i // rows}/0"
            data = self.read_whole(key, entries.get(key))
            out[i : i + rows] = np.frombuffer(data, "<i4").reshape(rows, ctx)[: n - i]
        return torch.from_numpy(out)

    def read_tokens(self, name: str, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """token_ids, keep, seq or pos at cache positions [start, stop) of complete blocks, each chunk checked.
        One ranged request per shard (obstore coalesces its chunks), several shards in flight."""
        lay = self.layout
        stop = lay.n_tokens if stop is None else min(stop, lay.n_tokens)
        out = np.empty(max(stop - start, 0), TOKEN_ARRAYS[name])
        if stop <= start:
            return torch.from_numpy(out)
        self.require_checksums()
        manifests = self.manifests()
        dtype = np.dtype(TOKEN_ARRAYS[name])

        def shard(s: int) -> None:
            key, s0 = self.shard_key(name, (s,)), s * lay.shard_tokens
            m = manifests.get(s0 // lay.block_tokens)
            if m is None:
                raise CacheError(f"tokens {s0}.. of {self.location} are not in a complete block: rerun `harvest run`")
            entry = m.files[key]
            inner = range(
                max(start - s0, 0) // lay.chunk_tokens, -(-(min(stop, s0 + lay.shard_tokens) - s0) // lay.chunk_tokens)
            )
            pieces = [entry.pieces[j] for j in inner]
            if any(p is None for p in pieces):
                raise self.corrupt(key, " (a chunk is absent)")
            try:
                starts, stops = [p[0] for p in pieces], [p[0] + p[1] for p in pieces]
                got = self.store.get_ranges(key, starts, stops, size=entry.size)
            except StoreMissing as e:
                raise IntegrityError(f"{e}: run `harvest verify {self.location}`")
            for j, p, data in zip(inner, pieces, got):
                if chunk_hash(data) != p[2]:
                    raise self.corrupt(key, f" chunk {j}")
                c0 = s0 + j * lay.chunk_tokens
                a, b = max(c0, start), min(c0 + lay.chunk_tokens, stop)
                out[a - start : b - start] = np.frombuffer(data, dtype)[a - c0 : b - c0]

        self.store.parallel(shard, list(range(start // lay.shard_tokens, -(-stop // lay.shard_tokens))))
        return torch.from_numpy(out)

    # -- reference reads through zarr-python ------------------------------------------------------
    @cached_property
    def group(self) -> zarr.Group:
        return zarr.open_group(store=self.store.zarr_store(), mode="r")

    def read(self, layer: int, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Vectors [stop-start, d] of one model layer at cache positions [start, stop) (zarr-python, unchecked:
        the reference the fast reader is tested against)."""
        li = self.layout.layer_index(layer)
        a = from_storage(np.ascontiguousarray(self.group["acts"][li, start:stop]), self.layout.dtype)
        if self.layout.dtype != "float8":
            return a
        scale = torch.from_numpy(np.asarray(self.group["scales"][li : li + 1]))  # zarr's own read of them, too
        return Decoder(self.layout.dtype, scale)(a[None])[0]


def load_bytes(raw: bytes) -> dict[str, torch.Tensor]:
    from safetensors.torch import load

    return load(raw)


def open_cache(location: str | Path, local_cache: str | Path | None = None) -> Cache:
    """A cache at a local path or a URL (s3://, gs://, az://, file://); `local_cache`: a folder that keeps a
    verified, size-bounded copy of what is read from a remote cache, so later epochs read from local disk
    (default: $MLSAE_LOCAL_CACHE; size bound $MLSAE_LOCAL_CACHE_GB, else 80% of the free space there)."""
    return Cache(location, local_cache)


class CacheWriter(Cache):
    """Writes whole blocks. One process owns each block; the manifest is created last, only if absent."""

    def write_block(self, b: int, acts: np.ndarray, tokens: dict[str, np.ndarray], stats: LayerStats) -> None:
        """acts [n_layers, block_len, d] in storage dtype, already permuted; tokens: TOKEN_ARRAYS columns."""
        lay = self.layout
        start, stop = lay.block_range(b)
        if acts.shape != (len(self.layers), stop - start, lay.d_model):
            raise ValueError(f"block {b}: acts shape {acts.shape} does not match the layout")
        jobs = []
        for s in lay.shards_of_block(b):
            lo, hi = s * lay.shard_tokens - start, min((s + 1) * lay.shard_tokens, stop) - start
            jobs += [(self.shard_key("acts", (li, s, 0)), acts[li, lo:hi], lay.compression) for li in range(len(acts))]
            jobs += [(self.shard_key(n, (s,)), tokens[n][lo:hi], "none") for n in TOKEN_ARRAYS]

        def write(job: tuple[str, np.ndarray, str]) -> tuple[str, FileEntry]:
            key, rows, compression = job
            data, pieces = encode_shard(rows, lay.shard_tokens, lay.chunk_tokens, compression)
            self.store.put(key, data)  # a whole object, written once (a rewrite after a crash is identical)
            return key, FileEntry(len(data), zlib.crc32(data), pieces)

        files = dict(self.store.parallel(write, jobs))
        stats_raw = save_bytes(stats.to_tensors())
        self.store.put(self.stats_key(b), stats_raw)
        files[self.stats_key(b)] = FileEntry(**whole_file(stats_raw))
        manifest = BlockManifest(b, start, stop, files, self.meta_sha256)
        if not self.store.create(self.manifest_key(b), manifest.to_json()):  # the commit point
            raise CacheError(
                f"block {b} of {self.location} was committed by another process meanwhile: two writers on one "
                f"cache (harvest takes a lock; was it removed by hand?)"
            )


def save_bytes(tensors: dict[str, torch.Tensor]) -> bytes:
    from safetensors.torch import save

    return save(tensors)


# ---------------------------------------------------------------------------------------------
# verify and upgrade: everything a reader trusts


def _check_file(store: Store, key: str, entry: FileEntry, size: int | None) -> list[str]:
    """Size, whole-file crc32, and (new manifests) every inner chunk's xxh3 and the shard index (its crc32c,
    and entries pointing where the manifest says), in ONE pass over the file: the chunks one ranged read
    each, then the rest (the index) in pieces of at most 16 MB."""
    if size is None:
        return [f"{key}: file missing"]
    if size != entry.size:
        return [f"{key}: size {size} != {entry.size} (truncated or overwritten)"]
    problems, crc, pos, tail = [], 0, 0, b""
    pieces = sorted((p[0], p[1], j, p[2]) for j, p in enumerate(entry.pieces or []) if p is not None)
    for off, nbytes, j, want in pieces:
        if off != pos:  # the writer leaves no gaps: a manifest that says otherwise is not ours
            return [f"{key}: manifest pieces do not tile the file (corrupt manifest)"]
        data = store.get_range(key, off, off + nbytes)
        crc, pos = zlib.crc32(data, crc), off + nbytes
        if chunk_hash(data) != want:
            problems.append(f"{key}: inner chunk {j} fails its xxh3 checksum (corrupt)")
    for lo in range(pos, size, 1 << 24):
        data = store.get_range(key, lo, min(lo + (1 << 24), size))
        crc, tail = zlib.crc32(data, crc), bytes(data)
    if crc != entry.crc32:
        problems.insert(0, f"{key}: crc32 mismatch (corrupt)")
    is_shard = key.split("/", 1)[0] in ("acts", *TOKEN_ARRAYS)
    if entry.pieces is not None and is_shard:
        n = index_nbytes(len(entry.pieces))
        problem = index_problem(tail[-n:] if len(tail) >= n else b"", entry.pieces)
        if problem is not None:
            problems.append(f"{key}: shard index {problem}")
    return problems


def verify_cache(cache: Cache, progress: Any = None) -> list[str]:
    """Re-read every file a reader trusts (acts, token arrays, stats, windows, the lens copy) and the
    metadata hash; return the problems found (empty list = healthy)."""
    problems: list[str] = []
    listing = cache.store.list()
    checks: list[tuple[str, FileEntry]] = []
    for b in range(cache.layout.n_blocks):
        key = cache.manifest_key(b)
        if key not in listing:
            problems.append(f"block {b} is missing (cache incomplete): rerun `harvest run` to finish it")
            continue
        try:
            m = cache._parse(key, cache.store.get(key))
        except CacheError as e:
            problems.append(str(e))
            continue
        if m.meta_sha256 is None:
            problems.append(f"block {b} has no chunk checksums (older harvest): run `harvest upgrade {cache.location}`")
        expected = {*cache.block_keys(b), cache.stats_key(b)}
        missing_listing = expected - set(m.files)
        if missing_listing:
            problems.append(f"block {b}: manifest does not list {sorted(missing_listing)[0]}")
        checks += list(m.files.items())
    if WINDOWS_MANIFEST in listing:
        try:
            windows = cache.windows_manifest()
            rows = windows_chunk_rows(cache.layout, cache.layout.n_sequences)
            for i in range(-(-cache.layout.n_sequences // rows)):
                if f"windows/c/{i}/0" not in windows:
                    problems.append(f"{WINDOWS_MANIFEST} does not list windows/c/{i}/0")
            if cache.layout.dtype == "float8" and SCALES_KEY not in windows:
                problems.append(f"{WINDOWS_MANIFEST} does not list the float8 scales {SCALES_KEY}")
            checks += list(windows.items())
        except CacheError as e:
            problems.append(str(e))
    else:
        problems.append(f"{WINDOWS_MANIFEST} is missing: run `harvest upgrade {cache.location}` (older harvest)")

    def check(item: tuple[str, FileEntry]) -> list[str]:
        found = _check_file(cache.store, item[0], item[1], listing.get(item[0]))
        if progress is not None:
            progress(item[1].size)
        return found

    for found in cache.store.parallel(check, checks, workers=4 if cache.store.is_local else 16):
        problems += found
    if cache.lens_record is not None:
        try:
            cache.lens()
        except CacheError as e:
            problems.append(str(e))
    return problems


def upgrade_cache(cache: Cache, log: Any = print) -> int:
    """Give a cache harvested before chunk checksums existed its checksums, after checking everything it is
    about to bless: the metadata against itself and the array documents (`metadata_problem`); every file of
    every complete block against the crc32 its manifest recorded AND against the layout (`_upgrade_block`:
    its files, inner chunks, token positions, statistics); the windows against the token arrays. Only then
    are the manifests rewritten with per-chunk xxh3 and the metadata hash, and the windows' checksums
    recorded: a cache that fails any check is one line and nothing is written. Returns the number of
    manifests upgraded. Safe to rerun; never touches data files."""
    lay = cache.layout
    problem = metadata_problem(cache)
    if problem is not None:
        raise IntegrityError(
            f"{cache.store.describe('zarr.json')} does not match the cache ({problem}): restore the original "
            f"zarr.json or re-harvest; nothing was upgraded"
        )
    todo = {b: m for b, m in cache.manifests(refresh="all").items() if not m.checksummed}
    new_manifests, tokens = {}, {}
    for n_done, (b, m) in enumerate(sorted(todo.items())):
        new_manifests[b], tokens[b] = _upgrade_block(cache, b, m)
        if n_done % 50 == 0:
            log(f"checked {n_done + 1}/{len(todo)} blocks")
    windows_entries = None
    if not cache.store.exists(WINDOWS_MANIFEST):
        rows = windows_chunk_rows(lay, lay.n_sequences)
        keys = [f"windows/c/{i}/0" for i in range(-(-lay.n_sequences // rows))]
        raws = {}
        for k in keys:
            try:
                raws[k] = cache.store.get(k)
            except StoreMissing:
                raise IntegrityError(f"{cache.store.describe(k)} is missing: re-harvest the cache")
            if len(raws[k]) != rows * lay.context * 4:
                raise _upgrade_refused(cache, f"{k} holds {len(raws[k]):,} bytes, not {rows} windows of {lay.context}")
        windows = np.concatenate([np.frombuffer(raws[k], "<i4").reshape(rows, lay.context) for k in keys])
        blocks = set(cache.complete_blocks())
        for b in blocks:  # token columns are checked above (or in an earlier run): the windows must agree
            col = tokens.get(b) or {n: np.asarray(cache.group[n][slice(*lay.block_range(b))]) for n in TOKEN_ARRAYS}
            if not np.array_equal(windows[col["seq"], col["pos"]], col["token_ids"]):
                raise IntegrityError(
                    f"{cache.store.describe('windows')} disagrees with the token ids of block {b} (corrupt windows): "
                    f"re-harvest the cache"
                )
        windows_entries = {k: whole_file(raws[k]) for k in keys}
    for b, m in sorted(new_manifests.items()):  # everything checked: bless it
        cache.store.put(cache.manifest_key(b), m.to_json())
    if windows_entries is not None:
        doc = {"meta_sha256": cache.meta_sha256, "files": windows_entries}
        cache.store.put(WINDOWS_MANIFEST, json.dumps(doc).encode())
    cache.manifests(refresh="all")
    cache._windows_entries = None
    return len(todo)


def _upgrade_refused(cache: Cache, problem: str) -> IntegrityError:
    return IntegrityError(
        f"{cache.location} does not match its metadata ({problem}): restore the original zarr.json and manifests, "
        f"or re-harvest; nothing was upgraded"
    )


def metadata_problem(cache: Cache) -> str | None:
    """What in a cache's metadata disagrees with itself, None if nothing: the layout's numbers, the array
    documents (shapes, dtypes, chunking, codecs: what zarr reads the data with), the recorded spec, model,
    hooks and fingerprint. What `harvest upgrade` checks before it blesses an older cache."""
    lay, meta = cache.layout, cache.meta
    try:
        ints = [lay.n_tokens, lay.context, lay.d_model, lay.chunk_tokens, lay.shard_tokens, lay.block_tokens]
        if any(type(x) is not int or x <= 0 for x in ints) or not lay.layers:
            return "the layout's sizes must be positive integers"
        from typing import get_args

        from .spec import Compression

        if lay.dtype not in STORAGE_DTYPES or lay.compression not in get_args(Compression):
            return f"unknown dtype {lay.dtype!r} or compression {lay.compression!r}"
        if lay.shard_tokens % lay.chunk_tokens or lay.block_tokens % lay.shard_tokens or lay.n_tokens % lay.context:
            return "chunks, shards, blocks and windows do not nest"
        if list(lay.layers) != sorted(set(lay.layers)) or any(type(x) is not int or x < 0 for x in lay.layers):
            return f"layers {list(lay.layers)} are not increasing block numbers"
        want = _zarr_documents({}, lay, lay.n_sequences)
        for name in ["acts", "windows", *TOKEN_ARRAYS]:
            doc, have = json.loads(want[f"{name}/zarr.json"]), cache.array_meta[name]
            for field in ("shape", "data_type", "chunk_grid", "codecs"):
                if have.get(field) != doc[field]:
                    return (
                        f"{name}/zarr.json's {field} is not what the layout gives ({have.get(field)} != {doc[field]})"
                    )
        spec = meta.get("spec") or {}
        same = {k: getattr(lay, k) for k in ("context", "dtype", "chunk_tokens", "shard_tokens", "compression")}
        same["shuffle_tokens"] = lay.block_tokens
        for k, v in same.items():
            if k in spec and spec[k] != v:
                return f"spec {k} = {spec[k]!r} but the layout says {v!r}"
        if (
            "tokens" in spec
            and "context" in spec
            and -(-spec["tokens"] // spec["context"]) * spec["context"] != lay.n_tokens
        ):
            return f"spec tokens = {spec['tokens']} but the layout holds {lay.n_tokens} tokens"
        model = meta.get("model") or {}
        if "d_model" in model and model["d_model"] != lay.d_model:
            return f"the model's d_model {model['d_model']} != the layout's {lay.d_model}"
        if "n_layers" in model and max(lay.layers) >= model["n_layers"]:
            return f"layers {list(lay.layers)} do not exist in a model of {model['n_layers']} blocks"
        if (
            "hooks" in meta
            and "hook" in spec
            and meta["hooks"] != [f"blocks.{l}.hook_{spec['hook']}" for l in lay.layers]
        ):
            return f"hooks {meta['hooks']} do not name the layers {list(lay.layers)}"
        identity = meta.get("identity")
        if isinstance(identity, dict) and "layers" in identity and identity["layers"] != list(lay.layers):
            return f"the identity's layers {identity['layers']} != the layout's {list(lay.layers)}"
        if isinstance(identity, dict) and "fingerprint" in meta:
            from .spec import fingerprint

            if fingerprint(identity) != meta["fingerprint"]:
                return "the fingerprint is not the hash of the recorded identity"
        if meta.get("storage_dtype", str(STORAGE_DTYPES[lay.dtype][0])) != str(STORAGE_DTYPES[lay.dtype][0]):
            return f"storage_dtype {meta['storage_dtype']!r} is not {lay.dtype}'s"
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        return f"malformed metadata ({type(e).__name__}: {e})"
    return None


def _upgrade_block(cache: Cache, b: int, m: BlockManifest) -> tuple[BlockManifest, dict[str, np.ndarray]]:
    """Block b's files checked against the crc32 its old manifest recorded and against the layout (the files a
    block must hold, every inner chunk's decoded size, chunks present exactly where the block has tokens, the
    token positions: exactly the block's windows, each position once; the statistics' shapes): its new
    manifest and token columns. Nothing is written."""
    lay = cache.layout
    start, stop = lay.block_range(b)
    expected = {*cache.block_keys(b), cache.stats_key(b)}
    if set(m.files) != expected:
        odd = sorted(set(m.files) ^ expected)[0]
        raise _upgrade_refused(cache, f"block {b}'s manifest {'lists' if odd in m.files else 'lacks'} {odd}")
    shard_of = {}
    for shard in lay.shards_of_block(b):
        names = [cache.shard_key("acts", (li, shard, 0)) for li in range(len(lay.layers))]
        shard_of.update({k: shard for k in names + [cache.shard_key(n, (shard,)) for n in TOKEN_ARRAYS]})
    files, parts = {}, {n: [] for n in TOKEN_ARRAYS}
    for key, entry in sorted(m.files.items()):
        try:
            data = cache.store.get(key)
        except StoreMissing:
            raise IntegrityError(f"{cache.store.describe(key)} is missing: re-harvest block {b}")
        if len(data) != entry.size or zlib.crc32(data) != entry.crc32:
            raise IntegrityError(
                f"{cache.store.describe(key)} does not match its manifest's size/crc32: the cache is damaged; "
                f"delete {cache.manifest_key(b)} and rerun `harvest run` to rewrite block {b}, then upgrade"
            )
        pieces = _pieces_of(key, data, lay)
        files[key] = FileEntry(entry.size, entry.crc32, pieces)
        array = key.split("/", 1)[0]
        if key == cache.stats_key(b):
            problem = _stats_problem(data, lay, stop - start)
        else:
            problem = _shard_problem(data, pieces, array, shard_of[key], lay)
        if problem is not None:
            raise _upgrade_refused(cache, f"{key}: {problem}")
        if array in TOKEN_ARRAYS:
            rows = min(lay.shard_tokens, lay.n_tokens - shard_of[key] * lay.shard_tokens)
            col = [np.frombuffer(data[p[0] : p[0] + p[1]], TOKEN_ARRAYS[array]) for p in pieces if p is not None]
            parts[array].append((shard_of[key], np.concatenate(col)[:rows]))
    tokens = {n: np.concatenate([c for _, c in sorted(v, key=lambda x: x[0])]) for n, v in parts.items()}
    seq, pos = tokens["seq"].astype(np.int64), tokens["pos"].astype(np.int64)
    if not (len(seq) == stop - start and np.array_equal(np.sort(seq * lay.context + pos), np.arange(start, stop))):
        raise _upgrade_refused(cache, f"block {b}'s token positions (seq, pos) are not its {stop - start} positions")
    if ((pos < 0) | (pos >= lay.context)).any():
        raise _upgrade_refused(cache, f"block {b} holds positions outside windows of {lay.context}")
    return BlockManifest(b, m.start, m.stop, files, cache.meta_sha256), tokens


def _shard_problem(data: bytes, pieces: list, array: str, shard: int, lay: Layout) -> str | None:
    """A shard file against the layout: chunks present exactly where the array has rows, tiling the file, each
    decoding to one chunk of the array's rows."""
    row_bytes = (
        lay.d_model * STORAGE_DTYPES[lay.dtype][0].itemsize
        if array == "acts"
        else np.dtype(TOKEN_ARRAYS[array]).itemsize
    )
    compressed = array == "acts" and lay.compression != "none"
    pos = 0
    for j, p in enumerate(pieces):
        present = shard * lay.shard_tokens + j * lay.chunk_tokens < lay.n_tokens
        if (p is not None) != present:
            where = "where the layout has tokens" if present else "past the layout's last token"
            return f"inner chunk {j} is {'absent' if present else 'present'} {where}"
        if p is None:
            continue
        if p[0] != pos:
            return "its inner chunks do not tile the file"
        pos += p[1]
        if compressed:  # a blosc buffer's 16-byte header: decoded size at bytes 4-8, its own size at 12-16
            head = data[p[0] : p[0] + 16]
            n = int.from_bytes(head[4:8], "little") if len(head) == 16 else -1
            if p[1] != int.from_bytes(head[12:16], "little"):
                return f"inner chunk {j} is not a blosc buffer of its size"
        else:
            n = p[1]
        if n != lay.chunk_tokens * row_bytes:
            return f"inner chunk {j} holds {n:,} bytes, the layout gives {lay.chunk_tokens * row_bytes:,}"
    if pos + index_nbytes(len(pieces)) != len(data):
        return "its inner chunks do not tile the file"
    return None


def _stats_problem(data: bytes, lay: Layout, n_tokens: int) -> str | None:
    """A block's statistics against the layout: one row per layer, d_model features, at most its tokens counted."""
    try:
        t = load_bytes(data)
    except Exception as e:  # safetensors raises its own errors for malformed files
        return f"unreadable statistics ({type(e).__name__})"
    L, d = len(lay.layers), lay.d_model
    want = {"count": (L,), "mean": (L, d), "m2": (L, d), "norm_sum": (L,)}
    for name, shape in want.items():
        if name not in t or tuple(t[name].shape) != shape:
            return f"statistics {name} are not of shape {list(shape)} ({len(lay.layers)} layers x d {d})"
    if bool((t["count"] > n_tokens).any()) or bool((t["count"] < 0).any()):
        return f"statistics count more than the block's {n_tokens} tokens"
    return None


def _pieces_of(key: str, data: bytes, lay: Layout) -> list:
    """Per-chunk pieces of an existing file: from its shard index (checked) or, for stats, the whole file."""
    if key.startswith("manifest/"):
        return whole_file(data)["pieces"]
    n_inner = lay.shard_tokens // lay.chunk_tokens
    raw = data[-16 * n_inner - 4 :]
    if index_crc(raw[:-4]) != raw[-4:]:
        raise IntegrityError(f"{key}: shard index fails its crc32c: re-harvest its block")
    pieces = []
    for off, nbytes in np.frombuffer(raw[:-4], "<u8").reshape(n_inner, 2).tolist():
        pieces.append(None if off == ABSENT else [off, nbytes, chunk_hash(memoryview(data)[off : off + nbytes])])
    return pieces


# ---------------------------------------------------------------------------------------------
# push / pull: copy a cache between locations


@dataclass
class CopyResult:
    copied: int  # blocks copied
    skipped: int  # blocks already at the destination (checked)
    repaired: list[str]  # files that were there but damaged or missing, copied again


def copy_cache(src: Cache, dst: Store, progress: Any = None, log: Any = print) -> CopyResult:
    """Copy a complete or partial cache to `dst` (a disk or a bucket), in the order a harvest writes: array
    metadata, windows, lens, the root zarr.json (create-if-absent), then block by block, each block's
    files before its manifest. Every file is checked against the manifest's size and crc32 on the way.
    Blocks whose manifest exists at `dst` are not copied again, so an interrupted copy resumes, but what is
    there is checked first: on a disk every file against the manifest (size, crc32, every chunk's xxh3, the
    shard index), in a bucket each object's size from one listing (objects appear whole or not at all), and
    the manifest itself; a damaged or missing file is copied again (named through `log`). The caller
    holds `dst`'s lock."""
    src.require_checksums()
    state = location_state(dst)
    if state == "foreign":
        raise CacheError(f"{dst.location} holds something that is not an mlsae cache: choose another destination")
    if state == "cache":
        there = Cache(dst)
        if there.fingerprint != src.fingerprint or there.meta_sha256 != src.meta_sha256:
            raise CacheError(
                f"{dst.location} holds another cache (fingerprint {there.fingerprint[:12]}): choose another "
                f"destination, or remove it to replace it"
            )
    else:
        for top in CACHE_NAMES - {LOCK_KEY}:
            dst.delete_prefix(top)
    repaired: list[str] = []

    def put_again(key: str, data: bytes, problem: str) -> None:
        log(f"{dst.describe(key)} {problem}: copied again from {src.store.describe(key)}")
        dst.put(key, data)
        repaired.append(key)

    meta_keys = [k for k in src.store.list() if k.endswith("zarr.json") and k != "zarr.json"]
    meta_keys += [WINDOWS_MANIFEST, *src.windows_manifest()]
    meta_keys += [f"{LENS_DIR}/{n}" for n in ("config.json", "params.pt")] if src.lens_record else []
    windows = src.windows_manifest()
    for key in meta_keys:  # small files: compared byte for byte with the source's when already there
        data = src.read_whole(key, windows[key]) if key in windows else src.store.get(key)
        if state != "cache":
            dst.put(key, data)
        elif not dst.exists(key):
            put_again(key, data, "is missing")
        elif dst.get(key) != data:
            put_again(key, data, "differs from the source (damaged)")
    if state != "cache":
        dst.create("zarr.json", src.store.get("zarr.json"))
    listing = dst.list()
    copied = skipped = 0

    def copy(item: tuple[str, FileEntry], problem: str | None = None) -> None:
        key, entry = item
        data = src.store.get(key)
        if len(data) != entry.size or zlib.crc32(data) != entry.crc32:
            raise src.corrupt(key)
        if problem is None:
            dst.put(key, data)
        else:
            put_again(key, data, problem)

    def check_and_repair(item: tuple[str, FileEntry]) -> None:
        key, entry = item
        size = listing.get(key)
        if dst.is_local:
            problems = _check_file(dst, key, entry, size)
        else:
            problems = [] if size == entry.size else [f"{key}: size {size} != {entry.size} (truncated or missing)"]
        if problems:
            copy(item, f"is damaged ({problems[0].split(': ', 1)[-1]})")
        if progress is not None:
            progress(entry.size)

    for b, m in sorted(src.manifests(refresh=True).items()):
        manifest_key = src.manifest_key(b)
        if manifest_key in listing:
            dst.parallel(check_and_repair, list(m.files.items()), workers=8)
            try:
                same = parse_manifest(dst.get(manifest_key), dst.describe(manifest_key), "") == m
            except (CacheError, StoreMissing):
                same = False
            if not same:
                put_again(manifest_key, src.store.get(manifest_key), "differs from the source (damaged)")
            skipped += 1
            continue

        def copy_new(item: tuple[str, FileEntry]) -> None:
            copy(item)
            if progress is not None:
                progress(item[1].size)

        dst.parallel(copy_new, list(m.files.items()), workers=8)
        dst.create(manifest_key, src.store.get(manifest_key))  # the block's commit point
        copied += 1
    return CopyResult(copied, skipped, repaired)
