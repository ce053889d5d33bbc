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
