"""One writer per cache or run folder: an exclusive lock object with a lease, on a local disk as in a bucket.

The lock is one small JSON object, `.mlsae-lock.json`, inside the location it guards. It names its holder
(pid, host, since, command) and a lease that the holder renews every lease/3 seconds from a background
thread. Taking it:
- create-if-absent (local: link(2) of a complete file; object stores: If-None-Match) -> held;
- otherwise read the holder: alive -> `LockHeld`, one line naming it; stale (its lease expired, or it is
  on this host and its process is gone, e.g. after kill -9) -> replace it only if it is still the version
  that was read (local: compare under flock(2); object stores: If-Match), so of two processes taking over
  the same stale lock exactly one wins, and the other sees a live holder.
The ranks of one torchrun job share the lock: rank 0 takes it, the other ranks rely on rank 0 (they run
only after rank 0's setup succeeded).

    with exclusive("caches/x", "harvest run"):
        ...
"""

from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .cache import LOCK_KEY
from .errors import UserError
from .store import LocalStore, Store, open_store

LEASE_SECONDS = float(os.environ.get("MLSAE_LOCK_LEASE_SECONDS", "120"))


class LockHeld(UserError):
    """Another live process holds the lock of this location."""


def _pid_start(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (tells a live pid from a recycled one)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _alive(pid: int, start: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by someone else
    now = _pid_start(pid)
    return start is None or now is None or now == start


class Lock:
    """An exclusive lock of `location` for `what` (e.g. "harvest run"). `acquire` / `release`, or a `with`."""

    def __init__(self, location: str | Path | Store, what: str, lease_seconds: float = LEASE_SECONDS):
        self.store = location if isinstance(location, Store) else open_store(location)
        self.what, self.lease = what, lease_seconds
        self.token = uuid.uuid4().hex
        self.since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime())
        self._version: Any = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._made_root = False
        self.lost = False
        self.took_over: dict[str, Any] | None = None  # the stale holder this lock replaced, if any

    def _body(self) -> bytes:
        return json.dumps(
            {
                "what": self.what,
                "pid": os.getpid(),
                "pid_start": _pid_start(os.getpid()),
                "host": socket.gethostname(),
                "since": self.since,
                "command": " ".join(sys.argv)[:500],
                "token": self.token,
                "lease_until": time.time() + self.lease,
            }
        ).encode()

    def _stale(self, holder: dict[str, Any] | None) -> bool:
        if holder is None:
            return True  # unreadable: no live holder could have written it (lock writes are atomic)
        if time.time() > float(holder.get("lease_until", 0)):
            return True
        return holder.get("host") == socket.gethostname() and not _alive(int(holder["pid"]), holder.get("pid_start"))

    def acquire(self) -> Lock:
        if isinstance(self.store, LocalStore) and not self.store.root.exists():
            self._made_root = True  # release removes the folder again if the lock was all that was in it
        while True:
            version = self.store.create(LOCK_KEY, self._body())
            if version is not None:
                break
            current = self.store.get_versioned(LOCK_KEY)
            if current is None:
                continue  # released between the two calls: try again
            holder = _parse(current[0])
            if not self._stale(holder):
                assert holder is not None
                raise LockHeld(
                    f"{self.store.location} is in use by `{holder.get('what')}` (pid {holder.get('pid')} on "
                    f"{holder.get('host')} since {holder.get('since')}: {holder.get('command', '')[:120]}): "
                    f"wait for it to finish; if that process is gone, the lock is taken over within "
                    f"{self.lease:.0f} s of its last renewal"
                )
            version = self.store.swap(LOCK_KEY, self._body(), current[1])
            if version is not None:
                self.took_over = holder or {}
                break  # otherwise another process took it over first: look again
        self._version = version
        self._thread = threading.Thread(target=self._renew_loop, name="lock-lease", daemon=True)
        self._thread.start()
        return self

    def _renew_loop(self) -> None:
        while not self._stop.wait(self.lease / 3):
            try:
                version = self.store.swap(LOCK_KEY, self._body(), self._version)
            except UserError:
                continue  # a transient store error: the lease still has 2/3 of its time
            if version is None:
                self.lost = True  # taken over after our lease expired (a suspended process): stop writing
                return
            self._version = version

    def check(self) -> None:
        """Raise if the lease was lost (another process took the location over)."""
        if self.lost:
            raise LockHeld(f"the lock of {self.store.location} was taken over by another process: stop; rerun later")

    def release(self) -> None:
        """Give the lock back (nothing to do if it was never taken)."""
        if self._version is None:
            return
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self._version = None
        current = self.store.get_versioned(LOCK_KEY)
        if current is not None and (_parse(current[0]) or {}).get("token") == self.token:
            self.store.delete(LOCK_KEY)
        if isinstance(self.store, LocalStore):
            mutex = self.store.root / f".{LOCK_KEY}.mutex"
            mutex.unlink(missing_ok=True)
            if self._made_root:
                try:
                    self.store.root.rmdir()  # only if empty: nothing of the run's own was left behind
                except OSError:
                    pass

    def __enter__(self) -> Lock:
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()


def _parse(raw: bytes) -> dict[str, Any] | None:
    try:
        d = json.loads(raw)
        return d if isinstance(d, dict) and "pid" in d else None
    except ValueError:
        return None


def shares_parent_lock() -> bool:
    """True on the ranks of a torchrun job other than rank 0: they work under rank 0's lock."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and int(os.environ.get("RANK", "0")) != 0


@contextmanager
def exclusive(location: str | Path, what: str) -> Iterator[Lock | None]:
    """Hold the lock of a cache or run folder (path or URL) for the block; a second process gets `LockHeld`
    naming the holder. Ranks other than 0 of a torchrun job yield None: rank 0 holds it for the job (take it
    inside a rank-0-only step whose errors reach the other ranks, e.g. `Dist.run_on_rank0`)."""
    if shares_parent_lock():
        yield None
        return
    with Lock(location, what) as lock:
        yield lock
