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


class NonFiniteError(UserError):
    """The model produced NaN or inf activations."""


class Interrupted(BaseException):
    """Ctrl-C (SIGINT) in a CLI. Not a KeyboardInterrupt: typer turns those into a silent exit 130 before
    our handler could print the "rerun to resume" line, and library code that swallows KeyboardInterrupt
    must not swallow this. A BaseException, so `except Exception` clean-up code lets it through."""


def storage_error(e: OSError, path: object = None) -> StorageError:
    """One line for a failed file-system operation, by its cause (full disk, permissions, a missing or
    wrong kind of path); `path` names the file when the OSError does not."""
    import errno

    where = path if path is not None else e.filename
    if where is None:  # some libraries put the path in the message only
        return StorageError(f"{e}: check the path and the disk")
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return StorageError(
            f"disk full while writing {where}: free space there or choose an --out on a larger disk, "
            f"then rerun the same command to resume"
        )
    if e.errno == errno.EROFS:
        return StorageError(f"cannot write {where} ({e.strerror}): choose a writable --out")
    if isinstance(e, PermissionError):
        return StorageError(f"permission denied for {where}: fix its permissions or choose another path")
    if isinstance(e, FileNotFoundError):
        return StorageError(f"{where} not found ({e.strerror}): check the path")
    if isinstance(e, (NotADirectoryError, IsADirectoryError, FileExistsError)) or e.errno == errno.ELOOP:
        return StorageError(f"{where}: {e.strerror}: check the path (a file where a folder is expected?)")
    return StorageError(f"{where}: {e.strerror or e}: check the disk and the path, then rerun")
