"""Settings read from the environment (MLSAE_*): each one validated where it is read, never at import.

A bad value is one line naming the variable, the value, and the range it must be in (a `SettingError`,
which the CLIs print as any user error); unset or empty means the default.
"""

from __future__ import annotations

import math
import os

from .errors import UserError


class SettingError(UserError):
    """An environment variable holds a value the code cannot use."""


def env_number(name: str, default: float, lo: float, hi: float, integer: bool = False, unit: str = "") -> float:
    """The number in `name` (or `default` when unset or empty), checked to be finite and in [lo, hi]
    (an integer if `integer`)."""
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    kind = "an integer" if integer else "a number"
    allowed = f"{kind} from {lo:g} to {hi:g}{unit}"
    try:
        value = float(int(raw)) if integer else float(raw)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or not lo <= value <= hi:
        raise SettingError(f"{name}={raw!r} is not valid: set {allowed}, or unset it for the default ({default:g})")
    return value


def env_int(name: str, default: int, lo: int, hi: int, unit: str = "") -> int:
    return int(env_number(name, default, lo, hi, integer=True, unit=unit))
