"""Atomic local file writes: a reader sees the old file or the whole new one, even after a kill or a crash.

The temporary file is created with O_EXCL under a random name INSIDE the destination folder (never a
predictable name, never outside it), fsynced, renamed over the destination, and the folder fsynced; on
any failure it is removed. Every local write of a run folder, a lens, or a cache's metadata goes here.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any


def _fsync(path: str | Path, flags: int) -> None:
    fd = os.open(path, os.O_RDONLY | flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: str | Path) -> None:
    _fsync(path, os.O_DIRECTORY)


def fsync_file(path: str | Path) -> None:
    _fsync(path, os.O_NOFOLLOW)


def umask_mode(mode: int = 0o666) -> int:
    """`mode` less the process's umask: what open() or mkdir() would give (0o644 / 0o755 under umask 022).
    Read from /proc (Linux): os.umask() can only be read by setting it, which races with other threads."""
    try:
        with open("/proc/self/status") as f:
            umask = next(int(line.split()[1], 8) for line in f if line.startswith("Umask:"))
    except (OSError, StopIteration, ValueError, IndexError):
        umask = os.umask(0o022)
        os.umask(umask)
    return mode & ~umask


def atomic_write(path: str | Path, write: Callable[[Path], Any]) -> None:
    """Call `write(tmp)` on a fresh empty temporary file next to `path`, then fsync and rename it over `path`.
    The file gets the permissions an ordinary open() would give it (mkstemp makes it private: 0600), so
    that what we write can be shared as the umask allows."""
    path = Path(path)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        write(tmp)
        fd = os.open(tmp, os.O_RDONLY | os.O_NOFOLLOW)  # after write(): some writers replace the file
        try:
            os.fchmod(fd, umask_mode())
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    atomic_write(path, lambda tmp: tmp.write_bytes(data))


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_write_json(path: str | Path, obj: Any, indent: int | None = 1) -> None:
    atomic_write_text(path, json.dumps(obj, indent=indent))


def atomic_torch_save(path: str | Path, obj: Any) -> None:
    """torch.save of tensors and plain containers (loadable with weights_only=True), atomically. Written
    through a Python file object so that a full disk is an OSError (ENOSPC), not torch's opaque
    RuntimeError ("unexpected pos ..."); the temporary file is removed either way."""
    import torch

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            torch.save(obj, f)

    atomic_write(path, write)


def fresh_folder(parent: str | Path, prefix: str) -> Path:
    """A new empty folder of a random name inside `parent`, created exclusively (tempfile.mkdtemp: a planted
    symlink or folder cannot stand in for it), with the permissions an ordinary mkdir would give it (mkdtemp
    makes it private), so it can be renamed into place as a cache or model folder."""
    folder = Path(tempfile.mkdtemp(prefix=prefix, suffix=".tmp", dir=parent))
    os.chmod(folder, umask_mode(0o777))
    return folder
