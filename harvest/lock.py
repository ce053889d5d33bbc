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
import math
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
from .settings import env_number
from .store import LocalStore, Store, open_store

LEASE_SECONDS = 120.0  # the default of MLSAE_LOCK_LEASE_SECONDS
MAX_LEASE_SECONDS = 7 * 86400


def lease_seconds_from_env() -> float:
    """MLSAE_LOCK_LEASE_SECONDS: how long a lock stays valid without renewal (renewed every third of it)."""
    return env_number("MLSAE_LOCK_LEASE_SECONDS", LEASE_SECONDS, 1, MAX_LEASE_SECONDS, unit=" seconds")


class LockHeld(UserError):
    """Another live process holds the lock of this location."""


class LockInvalid(UserError):
    """The lock object is not one this program wrote (wrong JSON, missing or mistyped fields)."""


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

    def __init__(self, location: str | Path | Store, what: str, lease_seconds: float | None = None):
        self.store = location if isinstance(location, Store) else open_store(location)
        self.what = what
        self.lease = lease_seconds if lease_seconds is not None else lease_seconds_from_env()
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

    def _stale(self, holder: dict[str, Any]) -> bool:
        if time.time() > holder["lease_until"]:
            return True
        return holder["host"] == socket.gethostname() and not _alive(holder["pid"], holder.get("pid_start"))

    def _held_message(self, holder: dict[str, Any]) -> str:
        """Whose lock it is, until when, and how to break it deliberately: the whole truth, one line."""
        until = holder["lease_until"]
        left = until - time.time()
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(until)) if until < 253402300799 else "year 9999+"
        whose = (
            f"`{holder.get('what', '?')}` (pid {holder['pid']} on {holder['host']} since {holder.get('since', '?')}: "
            f"{str(holder.get('command', ''))[:120]})"
        )
        if holder["host"] == socket.gethostname():
            after = "it is alive on this host: wait for it to finish"
        elif left <= 3 * self.lease:
            after = f"wait for it to finish; if that process is gone, the lock is free once its lease ends ({when})"
        else:
            after = f"its lease runs until {when}, far longer than this host's {self.lease:.0f} s lease: wait for it"
        return (
            f"{self.store.location} is in use by {whose}; {after}; to break the lock deliberately (only if no "
            f"command is using {self.store.location}), delete {self.store.describe(LOCK_KEY)}"
        )

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
            holder, problem = _parse(current[0])
            if holder is None:
                where = self.store.describe(LOCK_KEY)
                raise LockInvalid(
                    f"{where} is not a lock this program wrote ({problem}): if no command is using "
                    f"{self.store.location}, delete {where}, then rerun"
                )
            if not self._stale(holder):
                raise LockHeld(self._held_message(holder))
            version = self.store.swap(LOCK_KEY, self._body(), current[1])
            if version is not None:
                self.took_over = holder
                break  # otherwise another process took it over first: look again
        self._version = version
        self._thread = threading.Thread(target=self._renew_loop, name="lock-lease", daemon=True)
        self._thread.start()
        return self

    def _renew_loop(self) -> None:
        while not self._stop.wait(self.lease / 3):
            try:
                if not self.renew():
                    return
            except UserError:
                continue  # a transient store error: the lease still has 2/3 of its time

    def renew(self) -> bool:
        """Extend the lease; False (and `lost`) if another process took the lock over meanwhile (after our
        lease expired, e.g. while this process was suspended): the caller must stop writing."""
        version = self.store.swap(LOCK_KEY, self._body(), self._version)
        if version is None:
            self.lost = True
            return False
        self._version = version
        return True

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
        if current is None or (_parse(current[0])[0] or {}).get("token") != self.token:
            return  # no longer ours (taken over): leave the new holder's lock alone
        self.store.delete(LOCK_KEY)
        if isinstance(self.store, LocalStore) and self._made_root:
            # the folder was made for this lock: leave nothing behind if nothing else was put there (the
            # mutex of `swap` stays otherwise: removing it while another process holds it would break it)
            (self.store.root / f".{LOCK_KEY}.mutex").unlink(missing_ok=True)
            try:
                self.store.root.rmdir()  # only if empty
            except OSError:
                pass

    def __enter__(self) -> Lock:
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()


def _parse(raw: bytes) -> tuple[dict[str, Any] | None, str]:
    """(the holder, "") for a well-formed lock object, (None, what is wrong) otherwise: a lock is read like
    any untrusted file (someone may have edited or planted it)."""
    try:
        d = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return None, "not JSON"
    if not isinstance(d, dict):
        return None, f"a JSON {type(d).__name__}, not an object"
    required = {"pid": int, "host": str, "lease_until": (int, float)}
    optional = {"what": str, "since": str, "command": str, "token": str, "pid_start": (str, type(None))}
    for name, kind in {**required, **optional}.items():
        if name not in d:
            if name in required:
                return None, f"no {name!r} field"
            continue
        value = d[name]
        if not isinstance(value, kind) or isinstance(value, bool):  # type: ignore[arg-type]
            return None, f"{name!r} is {json.dumps(value)[:40]}, of the wrong type"
    if not 1 <= d["pid"] < 2**31 or not math.isfinite(d["lease_until"]):
        return None, f"'pid' {d['pid']} or 'lease_until' {d['lease_until']} out of range"
    d["lease_until"] = float(d["lease_until"])
    return d, ""


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
