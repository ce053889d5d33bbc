"""Where a cache's bytes live: a local folder or an object store (s3://, gs://, az://, file://), behind one
small interface. This is the ONLY module that touches the file system or the network for a cache.

Keys are '/'-separated paths relative to the cache location ("acts/c/0/3/0", "manifest/block-000001.json").
Both backends give the same guarantees, which the cache format builds on:
- `put` is atomic: a reader sees the old object or the whole new one (local: temp file + fsync + rename;
  object stores: one PUT, multipart for large objects, which only becomes visible when complete);
- `create` writes only if the key is absent (local: link(2) of a complete temp file; object stores:
  If-None-Match), the commit point of a block's manifest and of a lock;
- `swap` replaces an object only if it is still the version that was read (local: compare under flock(2);
  object stores: If-Match), which makes taking over a stale lock race-free.

Credentials and endpoints come from each cloud's standard environment (AWS_ACCESS_KEY_ID, AWS_REGION,
AWS_ENDPOINT_URL, AWS_ALLOW_HTTP, GOOGLE_APPLICATION_CREDENTIALS, AZURE_STORAGE_ACCOUNT_NAME, ...), so
S3-compatible stores (MinIO, R2, Ceph) work through AWS_ENDPOINT_URL.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import tempfile
import threading
import zlib
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import numpy as np

from .atomic import atomic_write, fsync_dir
from .errors import IntegrityError, StorageError, StoreError, storage_error
from .settings import env_int, env_number

REMOTE_SCHEMES = {"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "azure"}
ENV_HINT = {
    "s3": "AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (and AWS_ENDPOINT_URL for MinIO, R2, Ceph)",
    "gs": "GOOGLE_APPLICATION_CREDENTIALS (or GOOGLE_SERVICE_ACCOUNT)",
    "az": "AZURE_STORAGE_ACCOUNT_NAME and AZURE_STORAGE_ACCOUNT_KEY (or a SAS token)",
}


def is_url(location: str | Path) -> bool:
    return isinstance(location, str) and "://" in location


def location_name(location: str | Path) -> str:
    """The last path component of a location (a folder name or the last part of a URL's prefix)."""
    return str(location).rstrip("/").rsplit("/", 1)[-1]


class Store(ABC):
    """Bytes under one location. `location` is an absolute path or a URL, for messages and records."""

    location: str
    is_local: bool
    coalesces = False  # whether one `get_ranges` call is cheaper than one `read_into` per range (object stores)

    # -- reading ----------------------------------------------------------------------------------
    @abstractmethod
    def get(self, key: str) -> bytes:
        """The whole object; StoreMissing if absent."""

    @abstractmethod
    def get_range(self, key: str, start: int, stop: int) -> memoryview:
        """Bytes [start, stop) of an object."""

    def get_ranges(
        self, key: str, starts: Sequence[int], stops: Sequence[int], size: int | None = None
    ) -> list[memoryview]:
        """Several ranges of one object; `size`: the size its manifest records (an object store refuses an
        object of another size before sending the request)."""
        return [self.get_range(key, a, b) for a, b in zip(starts, stops)]

    def read_into(self, key: str, offset: int, out: memoryview, hasher: Any = None) -> None:
        """Fill `out` with the bytes at `offset` (the reader's hot path: no allocation on local disk), and feed
        them to `hasher` (a streaming hash: `update`) when given."""
        data = self.get_range(key, offset, offset + out.nbytes)
        if data.nbytes != out.nbytes:
            raise StoreMissing(f"{self.describe(key)}: short read at {offset}")
        # numpy copies without holding the GIL (a memoryview assignment holds it: it slowed every other thread)
        np.copyto(np.frombuffer(out, np.uint8), np.frombuffer(data, np.uint8))
        if hasher is not None:
            hasher.update(out)

    @abstractmethod
    def size(self, key: str) -> int | None:
        """The object's size, None if absent."""

    def exists(self, key: str) -> bool:
        return self.size(key) is not None

    @abstractmethod
    def list(self, prefix: str = "") -> dict[str, int]:
        """{key: size} of every object under `prefix` ('' = everything)."""

    # -- writing ----------------------------------------------------------------------------------
    @abstractmethod
    def put(self, key: str, data: bytes | memoryview) -> None:
        """Write a whole object atomically (replacing any previous one)."""

    @abstractmethod
    def create(self, key: str, data: bytes) -> Any:
        """Write the object only if the key is absent: its version (for `swap`), or None if it exists."""

    @abstractmethod
    def get_versioned(self, key: str) -> tuple[bytes, Any] | None:
        """(content, version) for `swap`, or None if absent."""

    @abstractmethod
    def swap(self, key: str, data: bytes, version: Any) -> Any:
        """Replace the object only if it is still at `version`: the new version, or None if it changed or
        vanished meanwhile."""

    @abstractmethod
    def delete(self, key: str) -> None:
        """Remove an object; absent is fine."""

    def delete_prefix(self, prefix: str) -> None:
        for key in self.list(prefix):
            self.delete(key)

    def free_space(self) -> int | None:
        """Bytes free at the location, None where unbounded (object stores)."""
        return None

    # -- helpers ----------------------------------------------------------------------------------
    def describe(self, key: str = "") -> str:
        return f"{self.location.rstrip('/')}/{key}" if key else self.location

    def zarr_store(self) -> Any:
        """The same location as a zarr-python store (for reference reads)."""
        raise NotImplementedError

    def parallel(self, fn: Any, items: Sequence[Any], workers: int | None = None) -> list[Any]:
        """fn over items with several requests in flight (file and network reads release the GIL)."""
        workers = workers or (4 if self.is_local else 32)
        if len(items) <= 1:
            return [fn(x) for x in items]
        with ThreadPoolExecutor(min(workers, len(items)), thread_name_prefix="store") as pool:
            return list(pool.map(fn, items))


class StoreMissing(StoreError):
    """An object that should exist does not (or is shorter than expected)."""


# ---------------------------------------------------------------------------------------------
# local files


def _check_key(key: str) -> str:
    parts = key.split("/")
    if not key or key.startswith("/") or any(p in ("", ".", "..") for p in parts):
        raise ValueError(f"invalid store key {key!r}")
    return key


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_FILE_MODE = 0o666 & ~_umask()


def hash_slice_from_env() -> int:
    """Local reads with a checksum: 0 (default) = read the chunk whole, then hash it, the faster way wherever
    a core is free; N bytes = hash each N-byte slice right after reading it, while it is in the CPU cache,
    which wins only when every core is busy (README, Performance)."""
    raw = os.environ.get("MLSAE_HASH_SLICE", "0")
    n = int(raw) if raw.strip().isdigit() else -1
    if n < 0:
        raise StoreError(f"MLSAE_HASH_SLICE={raw!r} is not a byte count: unset it, or set 0 or e.g. 262144")
    return n


class LocalStore(Store):
    is_local = True

    def __init__(self, root: str | Path):
        self.root = Path(root).expanduser().absolute()
        self.location = str(self.root)
        self.hash_slice = hash_slice_from_env()  # bench/harvest.py sets it on one instance to compare both ways

    def path(self, key: str) -> Path:
        return self.root / _check_key(key)

    def get(self, key: str) -> bytes:
        try:
            return self.path(key).read_bytes()
        except (FileNotFoundError, NotADirectoryError):
            raise StoreMissing(f"{self.describe(key)} is missing")
        except IsADirectoryError:
            raise StoreError(f"{self.describe(key)} is a folder, expected a file: check the path")

    def _open(self, key: str) -> int:
        try:
            return os.open(self.path(key), os.O_RDONLY | os.O_CLOEXEC)
        except (FileNotFoundError, NotADirectoryError):
            raise StoreMissing(f"{self.describe(key)} is missing")

    def get_range(self, key: str, start: int, stop: int) -> memoryview:
        fd = self._open(key)
        try:
            return memoryview(os.pread(fd, stop - start, start))
        finally:
            os.close(fd)

    def read_into(self, key: str, offset: int, out: memoryview, hasher: Any = None) -> None:
        # Straight into the caller's buffer (no allocation, no copy); open/close per read costs ~2% of a 4 MB
        # read and keeps no descriptor that another thread could see recycled. With a hasher: whole, or slice by
        # slice (MLSAE_HASH_SLICE), each slice hashed right after it is read while it is still in the CPU cache.
        fd = self._open(key)
        try:
            if hasher is None:
                n = os.preadv(fd, [out], offset)
            else:
                n = 0
                while n < out.nbytes:
                    part = out[n : n + (self.hash_slice or out.nbytes)]
                    got = os.preadv(fd, [part], offset + n)
                    hasher.update(part[:got])
                    n += got
                    if got < part.nbytes:
                        break
        finally:
            os.close(fd)
        if n != out.nbytes:
            raise StoreMissing(f"{self.describe(key)}: short read at {offset} (truncated)")

    def size(self, key: str) -> int | None:
        try:
            st = self.path(key).stat()
        except (FileNotFoundError, NotADirectoryError):
            return None
        return st.st_size if not self.path(key).is_dir() else None

    def list(self, prefix: str = "") -> dict[str, int]:
        base = self.root / prefix if prefix else self.root
        if not base.is_dir():
            return {}
        out = {}
        for dirpath, _, files in os.walk(base):
            for f in files:
                p = Path(dirpath) / f
                out[p.relative_to(self.root).as_posix()] = p.stat().st_size
        return out

    def _mkparent(self, key: str) -> Path:
        p = self.path(key)
        try:
            p.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise write_error(e, str(p.parent))
        return p

    def put(self, key: str, data: bytes | memoryview) -> None:
        def write(tmp: Path) -> None:
            tmp.write_bytes(data)
            tmp.chmod(_FILE_MODE)  # the temp file is private (0600); a cache is shared like any folder

        try:
            atomic_write(self._mkparent(key), write)
        except OSError as e:
            raise write_error(e, self.describe(key))

    def create(self, key: str, data: bytes) -> Any:
        p = self._mkparent(key)
        try:
            fd, name = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".tmp", dir=p.parent)
        except OSError as e:
            raise write_error(e, self.describe(key))
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fchmod(f.fileno(), _FILE_MODE)
                os.fsync(f.fileno())
            os.link(name, p)  # fails if `p` exists: create-if-absent with the content already complete
            fsync_dir(p.parent)
            return data  # a small object's content is its version
        except FileExistsError:
            return None
        except OSError as e:
            raise write_error(e, self.describe(key))
        finally:
            os.unlink(name)

    def _mutex(self, key: str) -> int:
        p = self._mkparent(key)
        return os.open(p.with_name(f".{p.name}.mutex"), os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)

    def get_versioned(self, key: str) -> tuple[bytes, Any] | None:
        try:
            data = self.get(key)
        except StoreMissing:
            return None
        return data, data  # a lock object is small: its content is its version

    def swap(self, key: str, data: bytes, version: Any) -> Any:
        fd = self._mutex(key)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)  # compare and replace as one step among processes
            current = self.get_versioned(key)
            if current is None or current[1] != version:
                return None
            self.put(key, data)
            return data
        finally:
            os.close(fd)

    def delete(self, key: str) -> None:
        self.path(key).unlink(missing_ok=True)

    def delete_prefix(self, prefix: str) -> None:
        p = self.path(prefix)
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink(missing_ok=True)

    def free_space(self) -> int | None:
        p = self.root
        while not p.exists():
            p = p.parent
        return shutil.disk_usage(p).free

    def zarr_store(self) -> Any:
        from zarr.storage import LocalStore as ZarrLocalStore

        return ZarrLocalStore(str(self.root), read_only=True)


def write_error(e: OSError, where: str) -> StorageError:
    return storage_error(e, where)  # one wording for every file-system failure (harvest.errors)


# ---------------------------------------------------------------------------------------------
# object stores (obstore: Rust, releases the GIL, retries 5xx / timeouts / throttling with backoff)


def _retry_config() -> dict[str, Any]:
    # Bounded: an unreachable endpoint fails after ~MLSAE_STORE_RETRY_SECONDS instead of object_store's 3 min.
    seconds = env_number("MLSAE_STORE_RETRY_SECONDS", 60, 0.1, 86400, unit=" seconds")
    return {
        "max_retries": env_int("MLSAE_STORE_RETRIES", 8, 0, 100),
        "retry_timeout": timedelta(seconds=seconds),
        "backoff": {"init_backoff": timedelta(milliseconds=100), "max_backoff": timedelta(seconds=8), "base": 2},
    }


class ObjectStore(Store):
    is_local = False
    coalesces = True  # get_ranges merges touching ranges into one request, several requests in flight

    def __init__(self, url: str):
        parsed = urlparse(url)
        aliases = {"s3a": "s3", "gcs": "gs", "abfs": "az", "abfss": "az", "azure": "az"}
        scheme = aliases.get(parsed.scheme, parsed.scheme)
        if not parsed.netloc:
            raise StoreError(f"malformed URL {url!r}: expected {scheme}://BUCKET/PREFIX")
        self.scheme = scheme
        self.location = url.rstrip("/")
        # Object sizes seen (HEAD, listing, PUT): a ranged read past an object's end is refused before it is
        # sent (obstore's get_ranges panics in Rust when a coalesced range comes back short).
        self._sizes: dict[str, int] = {}
        import obstore
        from obstore.store import from_url

        self._ob = obstore
        retry = _retry_config()  # a bad MLSAE_STORE_* value is its own line, not "check the URL"
        try:
            # (client_options timeouts are left at object_store's defaults: setting any of them made every
            # request fail with "builder error" in obstore 0.12.1)
            self._store = from_url(self.location, retry_config=retry)  # type: ignore[arg-type]
        except Exception as e:  # obstore raises its own config errors for bad URLs and settings
            raise StoreError(f"cannot use {url!r} ({_first_line(e)}): check the URL and the {self._env()} settings")

    def _env(self) -> str:
        return ENV_HINT.get(self.scheme, "cloud")

    def _has_credentials(self) -> bool:
        """Whether the environment names credentials (else requests go out unsigned or from instance metadata)."""
        names = {
            "s3": (
                "AWS_ACCESS_KEY_ID",
                "AWS_PROFILE",
                "AWS_WEB_IDENTITY_TOKEN_FILE",
                "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
            ),
            "gs": ("GOOGLE_APPLICATION_CREDENTIALS", "GOOGLE_SERVICE_ACCOUNT", "GOOGLE_SERVICE_ACCOUNT_KEY"),
            "az": ("AZURE_STORAGE_ACCOUNT_KEY", "AZURE_STORAGE_SAS_KEY", "AZURE_CLIENT_ID", "AZURE_STORAGE_TOKEN"),
        }.get(self.scheme, ())
        return not names or any(os.environ.get(n) for n in names)

    def _error(self, e: BaseException, key: str, writing: bool = False) -> StoreError:
        """One line for each way a request fails, naming the fix."""
        from obstore import exceptions as ox

        where = self.describe(key)
        text = str(e)
        if " 416 " in text or "InvalidRange" in text:
            return StoreMissing(f"{where} is shorter than a range read from it (truncated or replaced)")
        if isinstance(e, FileNotFoundError | ox.NotFoundError):
            if "NoSuchBucket" in text:
                bucket = urlparse(self.location).netloc
                return StoreError(f"bucket {bucket!r} does not exist: create it or fix the URL {self.location}")
            return StoreMissing(f"{where} is missing")
        if isinstance(e, ox.UnauthenticatedError) or "InvalidAccessKeyId" in text or "SignatureDoesNotMatch" in text:
            return StoreError(f"{where}: no valid credentials ({_first_line(e)}): set {self._env()}")
        if isinstance(e, PermissionError | ox.PermissionDeniedError) or "AccessDenied" in text or " 403 " in text:
            verb = "write" if writing else "read"
            if not self._has_credentials():
                return StoreError(f"{where}: access denied and no credentials are set: set {self._env()}")
            return StoreError(f"permission denied to {verb} {where}: grant {verb} access or choose another location")
        if "BadScheme" in text or ("builder error" in text and "http://" in text):
            allow = {"s3": "AWS_ALLOW_HTTP", "az": "AZURE_ALLOW_HTTP"}.get(self.scheme, "the allow_http setting")
            return StoreError(
                f"{where}: the endpoint is plain http and {allow} is not set: set {allow}=true for a trusted "
                f"local endpoint, or use an https endpoint"
            )
        if "error sending request" in text or "Connect" in text or "dns error" in text or "timed out" in text:
            return StoreError(
                f"cannot reach the object store for {self.location} ({_first_line(e)}): check the network and "
                f"AWS_ENDPOINT_URL / the endpoint settings (retried with backoff before giving up)"
            )
        return StoreError(f"{where}: request failed ({_first_line(e)}): rerun the same command to resume")

    def _call(self, key: str, fn: Any, *args: Any, writing: bool = False, **kw: Any) -> Any:
        try:
            return fn(self._store, *args, **kw)
        except StoreError:
            raise
        except Exception as e:
            raise self._error(e, key, writing) from None
        except BaseException as e:  # a panic inside the Rust client (pyo3's PanicException is no Exception)
            if type(e).__name__ != "PanicException":
                raise
            raise StoreError(
                f"{self.describe(key)}: the object-store client failed ({_first_line(e)}): the object may have "
                f"changed while it was read; run `harvest verify {self.location}`"
            ) from None

    def _known_size(self, key: str) -> int:
        """The object's size: seen before, else one HEAD (once per object)."""
        size = self._sizes.get(key)
        if size is None:
            size = self.size(key)
            if size is None:
                raise StoreMissing(f"{self.describe(key)} is missing")
        return size

    def _check_ranges(self, key: str, starts: Sequence[int], stops: Sequence[int], recorded: int | None) -> None:
        if not starts:
            return
        size = self._known_size(key)
        if recorded is not None and size != recorded:
            raise StoreMissing(
                f"{self.describe(key)} is {size:,} bytes, its manifest records {recorded:,} (truncated or replaced)"
            )
        if any(not 0 <= a <= b for a, b in zip(starts, stops)) or max(stops) > size:
            raise StoreMissing(
                f"{self.describe(key)} is {size:,} bytes, shorter than a read of bytes up to {max(stops):,} "
                f"(truncated or replaced)"
            )

    def get(self, key: str) -> bytes:
        return bytes(self._call(key, self._ob.get, key).bytes())

    def get_range(self, key: str, start: int, stop: int) -> memoryview:
        # one range: the server answers a short object with fewer bytes (no panic), refused here
        got = memoryview(self._call(key, self._ob.get_range, key, start=start, end=stop))
        if got.nbytes != stop - start:
            raise StoreMissing(
                f"{self.describe(key)}: {got.nbytes:,} bytes came back for a range of {stop - start:,} (truncated)"
            )
        return got

    def get_ranges(
        self, key: str, starts: Sequence[int], stops: Sequence[int], size: int | None = None
    ) -> list[memoryview]:
        self._check_ranges(key, starts, stops, size)
        got = [memoryview(b) for b in self._call(key, self._ob.get_ranges, key, starts=list(starts), ends=list(stops))]
        if [g.nbytes for g in got] != [b - a for a, b in zip(starts, stops)]:
            raise StoreMissing(f"{self.describe(key)}: a ranged read came back short (truncated or replaced)")
        return got

    def size(self, key: str) -> int | None:
        try:
            size = int(self._call(key, self._ob.head, key)["size"])
        except StoreMissing:
            self._sizes.pop(key, None)
            return None
        self._sizes[key] = size
        return size

    def list(self, prefix: str = "") -> dict[str, int]:
        out: dict[str, int] = {}
        try:
            for page in self._ob.list(self._store, prefix or None, chunk_size=1000):
                for meta in page:
                    out[meta["path"]] = int(meta["size"])
        except Exception as e:
            raise self._error(e, prefix) from None
        self._sizes.update(out)
        return out

    def put(self, key: str, data: bytes | memoryview) -> None:
        # obstore switches to a multipart upload above its chunk size (5 MB): large shards go up in parts,
        # and the object appears only when the upload completes.
        self._call(key, self._ob.put, key, data, writing=True)
        self._sizes[key] = memoryview(data).nbytes

    def create(self, key: str, data: bytes) -> Any:
        from obstore import exceptions as ox

        try:
            return self._ob.put(self._store, key, data, mode="create")["e_tag"] or "created"
        except (ox.AlreadyExistsError, ox.PreconditionError):
            return None
        except Exception as e:
            raise self._error(e, key, writing=True) from None

    def get_versioned(self, key: str) -> tuple[bytes, Any] | None:
        try:
            result = self._call(key, self._ob.get, key)
        except StoreMissing:
            return None
        return bytes(result.bytes()), result.meta.get("e_tag")

    def swap(self, key: str, data: bytes, version: Any) -> Any:
        from obstore import exceptions as ox

        try:
            return self._ob.put(self._store, key, data, mode={"e_tag": version})["e_tag"]
        except (ox.PreconditionError, ox.NotFoundError, FileNotFoundError):
            return None
        except Exception as e:
            raise self._error(e, key, writing=True) from None

    def delete(self, key: str) -> None:
        self._sizes.pop(key, None)
        try:
            self._call(key, self._ob.delete, key, writing=True)
        except StoreMissing:
            pass

    def delete_prefix(self, prefix: str) -> None:
        keys = list(self.list(prefix))
        for key in keys:
            self._sizes.pop(key, None)
        for i in range(0, len(keys), 1000):
            self._call(prefix, self._ob.delete, keys[i : i + 1000], writing=True)

    def zarr_store(self) -> Any:
        from zarr.storage import ObjectStore as ZarrObjectStore

        return ZarrObjectStore(self._store, read_only=True)


def _note(message: str) -> None:
    """A note on stderr (the read-through copy's repairs), one line."""
    import sys

    print(f"note: {message}", file=sys.stderr, flush=True)


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:200]


def open_store(location: str | Path) -> Store:
    """A path or URL -> its store. Unknown schemes and malformed URLs are one-line errors."""
    if isinstance(location, Path) or not is_url(location):
        return LocalStore(location)
    parsed = urlparse(location)
    if parsed.scheme == "file":
        if parsed.netloc not in ("", "localhost"):
            raise StoreError(f"malformed URL {location!r}: use file:///absolute/path")
        return LocalStore(parsed.path)
    if parsed.scheme not in REMOTE_SCHEMES:
        raise StoreError(
            f"unknown scheme {parsed.scheme!r} in {location!r}: use a local path, file://, s3://, gs:// or az://"
        )
    return ObjectStore(location)


# ---------------------------------------------------------------------------------------------
# a local read-through copy of a remote cache


class ReadThroughStore(Store):
    """A remote store whose data objects are fetched WHOLE on first use into a local folder (checked against
    the size and crc32 that `expected(key)` returns from the manifests), then read from local disk with
    `os.preadv`: the second epoch of a training run reads at local speed. Bounded: the least recently used
    copies are deleted beyond `max_bytes`. Objects without a manifest entry (metadata) pass through.

    A copy is never trusted for its size alone: every read from it is checked against the manifest by
    `check(entry, start, data, digest)` (an inner chunk's xxh3, a shard index's crc32c, a whole file's crc32;
    None for a range the manifest says nothing about, which is then read from the source). A copy that fails
    is dropped and fetched again, once per object and process, with a note through `log`; failing again
    after a fresh download is one line naming the copy (the local disk is suspect)."""

    is_local = False  # still a remote cache: several reads in flight per chunk

    def __init__(
        self,
        remote: Store,
        folder: str | Path,
        expected: Any,
        check: Any,
        max_bytes: int | None = None,
        log: Any = None,
    ):
        import hashlib

        self.remote, self.expected, self.check = remote, expected, check
        self.log = log or _note
        self.location = remote.location
        tag = hashlib.sha256(remote.location.encode()).hexdigest()[:16]
        self.local = LocalStore(Path(folder).expanduser() / f"{location_name(remote.location)}-{tag}")
        if max_bytes is None:
            env = env_number("MLSAE_LOCAL_CACHE_GB", -1, 1e-6, 1e9, unit=" GB")  # -1: unset
            free = self.local.free_space() or 0
            max_bytes = int(env * 1e9) if env > 0 else int(0.8 * (free + sum(self.local.list().values())))
        self.max_bytes = max_bytes
        self._mutex = threading.Lock()
        self._fetching: dict[str, threading.Lock] = {}
        self._refetched: set[str] = set()  # copies dropped and fetched again in this process
        self._sizes: OrderedDict[str, int] = OrderedDict(sorted(self.local.list().items()))  # LRU order
        self._used = sum(self._sizes.values())

    def _fetch_lock(self, key: str) -> threading.Lock:
        with self._mutex:
            return self._fetching.setdefault(key, threading.Lock())

    def _download(self, key: str, entry: Any) -> bytes:
        """The source object, whole, checked against its manifest entry's size and crc32."""
        data = self.remote.get(key)
        if len(data) != entry.size or zlib.crc32(data) != entry.crc32:
            raise IntegrityError(
                f"{self.remote.describe(key)} does not match its manifest (size/crc32): "
                f"run `harvest verify {self.remote.location}`"
            )
        return data

    def _local(self, key: str) -> Any:
        """`key`'s manifest entry once it has a local copy (fetched now if needed); None for pass-through keys
        and objects that do not fit."""
        entry = self.expected(key)
        if entry is None:
            return None
        with self._mutex:
            if self._sizes.get(key) == entry.size:
                self._sizes.move_to_end(key)
                return entry
        with self._fetch_lock(key):  # one download per object, however many readers want it
            with self._mutex:
                if self._sizes.get(key) == entry.size:
                    return entry
            data = self._download(key, entry)
            if entry.size > self.max_bytes:
                return None
            with self._mutex:  # make room for it (least recently used first), counting copies being written
                while self._sizes and self._used + entry.size > self.max_bytes:
                    old, size = self._sizes.popitem(last=False)
                    self._used -= size
                    self.local.delete(old)
                if self._used + entry.size > self.max_bytes:
                    return None  # the rest of the room is taken by copies being written: read it remotely
                self._used += entry.size
            self.local.put(key, data)
            with self._mutex:
                self._sizes[key] = entry.size
        return entry

    def _checked(self, key: str, entry: Any, start: int, read: Any) -> tuple[bool, Any]:
        """read() -> (data, digest or None) from the local copy, checked against the manifest: (True, data);
        (False, None) for a range the manifest has nothing to check against. A copy that fails is dropped
        and fetched again (once), then read again."""
        data, digest = read()
        ok = self.check(entry, start, data, digest)
        if ok is None or ok:
            return ok is not None, data
        with self._fetch_lock(key):
            data, digest = read()  # another thread may have fetched it again meanwhile
            if self.check(entry, start, data, digest):
                return True, data
            copy = self.local.describe(key)
            again = key in self._refetched
            if not again:
                self._refetched.add(key)
                self.log(f"the local copy {copy} fails its checksum: dropped, fetching it again from the source")
                self.local.delete(key)
                self.local.put(key, self._download(key, entry))
                with self._mutex:  # evicted meanwhile: the fresh copy counts again
                    if key not in self._sizes:
                        self._sizes[key] = entry.size
                        self._used += entry.size
                data, digest = read()
                if self.check(entry, start, data, digest):
                    return True, data
            raise IntegrityError(
                f"the local copy {copy} fails its checksum {'again ' if again else ''}after a fresh download: "
                f"the disk under {self.local.root.parent} may be failing; delete that folder or read without "
                f"--local-cache"
            )

    def _read(self, key: str, start: int, local: Any, remote: Any) -> Any:
        """local() -> (data, digest) from the copy, checked; remote() for pass-through keys, copies evicted
        meanwhile, and ranges the manifest has nothing to check against."""
        entry = self._local(key)
        if entry is not None:
            try:
                checked, data = self._checked(key, entry, start, local)
            except StoreMissing:  # evicted between the check and the read by another thread
                checked = False
            if checked:
                return data
        return remote()

    def get(self, key: str) -> bytes:
        return self._read(key, 0, lambda: (self.local.get(key), None), lambda: self.remote.get(key))

    def get_range(self, key: str, start: int, stop: int) -> memoryview:
        local = lambda: (self.local.get_range(key, start, stop), None)
        return self._read(key, start, local, lambda: self.remote.get_range(key, start, stop))

    def read_into(self, key: str, offset: int, out: memoryview, hasher: Any = None) -> None:
        def local() -> tuple[memoryview, str | None]:
            if hasher is not None:
                hasher.reset()  # a retry hashes the fresh copy's bytes
            self.local.read_into(key, offset, out, hasher)
            return out, None if hasher is None else hasher.hexdigest()

        def remote() -> None:
            if hasher is not None:
                hasher.reset()
            self.remote.read_into(key, offset, out, hasher)

        self._read(key, offset, local, remote)

    def size(self, key: str) -> int | None:
        return self.remote.size(key)

    def list(self, prefix: str = "") -> dict[str, int]:
        return self.remote.list(prefix)

    def put(self, key: str, data: bytes | memoryview) -> None:
        raise StoreError(f"{self.location} is opened read-only through a local cache")

    create = swap = put  # type: ignore[assignment]

    def get_versioned(self, key: str) -> tuple[bytes, Any] | None:
        return self.remote.get_versioned(key)

    def delete(self, key: str) -> None:
        raise StoreError(f"{self.location} is opened read-only through a local cache")

    def zarr_store(self) -> Any:
        return self.remote.zarr_store()
