"""Errors meant for users: each message names the problem and the fix, on one line.

The CLIs catch `UserError` and print it without a traceback; anything else is a bug.
"""


class UserError(Exception):
    """Bad input or a bad environment that the user can fix."""


class SpecError(UserError):
    """A field of the cache spec (YAML or flag) is invalid."""


class ModelError(UserError):
    """The model cannot be resolved or loaded."""


class DatasetError(UserError):
    """The text dataset cannot be found, read, or holds too few tokens."""


class CacheError(UserError):
    """A cache on disk is missing, incomplete, corrupt, or belongs to another spec."""


class StorageError(UserError):
    """Writing failed: disk full, unwritable path, value out of the storage dtype's range."""


class StoreError(UserError):
    """A cache location cannot be used: malformed URL, unknown scheme, missing bucket, credentials, network."""


class IntegrityError(CacheError):
    """Stored bytes differ from what the manifest recorded at harvest time: never read past it."""


class NonFiniteError(UserError):
    """The model produced NaN or inf activations."""


class Interrupted(BaseException):
    """Ctrl-C (SIGINT) in a CLI. Not a KeyboardInterrupt: typer turns those into a silent exit 130 before
    our handler could print the "rerun to resume" line, and library code that swallows KeyboardInterrupt
    must not swallow this. A BaseException, so `except Exception` clean-up code lets it through."""


def one_line(text: str, limit: int | None = None) -> str:
    """`text` fit for a one-line message: terminal escape codes and other control characters removed, line
    breaks and runs of blanks turned into one space (a library's error may carry colour codes)."""
    import re

    text = re.sub(r"\x1b(\[[0-?]*[ -/]*[@-~]|\][^\x07\x1b]*(\x07|\x1b\\)?|[@-Z\\-_])", "", text)
    text = re.sub(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]", "", text)
    text = " ".join(text.split())
    return text if limit is None or len(text) <= limit else text[: limit - 3] + "..."


def human_bytes(n: float) -> str:
    """A byte count for a message, in the unit that keeps it readable: 512 B, 12.3 kB, 4.56 GB."""
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.3g} {unit}"
    return f"{n:.0f} B"


def storage_error(e: OSError, where: object = None) -> StorageError:
    """THE one line for a failed file-system operation, by its cause (full disk, permissions, a missing or
    wrong kind of path); `where` names the file when the OSError does not. Used by the stores' writes and,
    for any OSError nothing more specific caught, by the CLIs."""
    import errno

    where = where if where is not None else e.filename
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return StorageError(
            f"disk full while writing {where if where is not None else 'the output'}: free space there or pass "
            f"--out on a larger disk; rerun the same command to resume"
        )
    if where is None:  # some libraries put the path in the message only
        return StorageError(f"{e}: check the path and the disk")
    if e.errno == errno.ELOOP:
        return StorageError(f"{where} is a symbolic link this command did not make: remove the link, then rerun")
    if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOTDIR, errno.EEXIST, errno.EISDIR):
        return StorageError(f"cannot write {where} ({e.strerror}): choose a writable --out")
    if isinstance(e, FileNotFoundError):
        return StorageError(f"{where} not found ({e.strerror}): check the path")
    return StorageError(f"writing {where} failed ({e.strerror or e}): check the disk, then rerun to resume")
