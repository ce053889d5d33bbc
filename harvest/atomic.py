"""Atomic local file writes: a reader sees the old file or the whole new one, even after a kill or a crash.

The temporary file is created with O_EXCL under a random name INSIDE the destination folder (never a
predictable name, never outside it), fsynced, renamed over the destination, and the folder fsynced; on
any failure it is removed. Every local write of a run folder, a lens, or a cache's metadata goes here:
files (`atomic_write*`, `atomic_open`), figures (`atomic_savefig`), copies (`atomic_copy`), and the one
file that grows while a command runs (`open_log`, metrics.jsonl), which is opened without following links
and only if it is a regular file of ours. A link planted at an output path is replaced by the rename (the
link itself, never its target) and never written through.
"""

from __future__ import annotations

import json
import os
import stat
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

from .errors import StorageError


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


@contextmanager
def _replacing(path: Path) -> Iterator[Path]:
    """A fresh empty temporary file next to `path` (O_EXCL, random name); after the block, given the
    permissions an ordinary open() would give it (mkstemp makes it private: 0600; what we write is shared as
    the umask allows), fsynced and renamed over `path`; removed if the block raised."""
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        fd = os.open(tmp, os.O_RDONLY | os.O_NOFOLLOW)  # after the block: some writers replace the file
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


def atomic_write(path: str | Path, write: Callable[[Path], Any]) -> None:
    """Call `write(tmp)` on a fresh empty temporary file next to `path`, then fsync and rename it over `path`."""
    with _replacing(Path(path)) as tmp:
        write(tmp)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    atomic_write(path, lambda tmp: tmp.write_bytes(data))


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_write_json(path: str | Path, obj: Any, indent: int | None = 1) -> None:
    atomic_write_text(path, json.dumps(obj, indent=indent))


@contextmanager
def atomic_open(path: str | Path, mode: str = "w", **kwargs: Any) -> Iterator[IO[Any]]:
    """`with atomic_open(path, "w", newline="") as f:` writes `f` to a temporary file that replaces `path`
    once the block finished without an exception (nothing is left otherwise)."""
    with _replacing(Path(path)) as tmp, open(tmp, mode, **kwargs) as f:
        yield f


def atomic_savefig(fig: Any, path: str | Path, **kwargs: Any) -> None:
    """matplotlib's fig.savefig, atomically (the format from `path`'s suffix, as savefig would pick it)."""
    path = Path(path)
    fmt = kwargs.pop("format", None) or path.suffix.lstrip(".") or "png"
    atomic_write(path, lambda tmp: fig.savefig(tmp, format=fmt, **kwargs))


def atomic_copy(src: str | Path, dst: str | Path) -> None:
    """A copy of the regular file `src` at `dst`, atomically (a link at `dst` is replaced, not followed)."""
    import shutil

    atomic_write(dst, lambda tmp: shutil.copyfile(src, tmp))


def open_log(path: str | Path, fresh: bool) -> IO[str]:
    """A text file to append lines to for the whole command (metrics.jsonl). `fresh`: a new empty file
    replaces whatever is at `path` (a planted link included, never its target). Otherwise the existing
    file is opened for appending without following a link (O_NOFOLLOW) and only if it is a regular file
    owned by this user with no other hard link; anything else is a StorageError naming it and the fix."""
    path = Path(path)
    if fresh:
        atomic_write_bytes(path, b"")
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    except OSError:
        if os.path.islink(path):
            raise StorageError(f"{path} is a symbolic link this run did not make: remove the link, then rerun")
        raise
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid() or st.st_nlink != 1:
        os.close(fd)  # (a second hard link would be another name for the same bytes: someone else's file)
        raise StorageError(f"{path} is not a regular file of this user with one name: remove it, then rerun")
    return os.fdopen(fd, "a")


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
