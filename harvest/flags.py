"""Dataclass fields -> typer flags, so a config dataclass, its YAML file and its CLI flags stay 1:1."""

from __future__ import annotations

import dataclasses
import inspect
from typing import Callable, Iterable, Optional

import typer

_TYPES = {"int": int, "str": str, "float": float, "bool": bool, "str | None": str}


def with_dataclass_flags(fields: Iterable[dataclasses.Field], exclude: Iterable[str] = (),
                         short: dict[str, str] | None = None) -> Callable[[Callable], Callable]:
    """Decorator: append one optional flag per field (--field-name; bools as --x/--no-x), default None
    (= not given). The command receives them in **overrides; `None` means "keep the spec's value"."""
    skip, short = set(exclude), short or {}

    def wrap(fn: Callable) -> Callable:
        params = [p for p in inspect.signature(fn).parameters.values() if p.kind != p.VAR_KEYWORD]
        for f in fields:
            if f.name in skip:
                continue
            base = _TYPES[str(f.type)]
            flag = f"--{f.name.replace('_', '-')}"
            names = [f"{flag}/--no-{f.name.replace('_', '-')}"] if base is bool else [flag, *short.get(f.name, "").split()]
            params.append(inspect.Parameter(
                f.name, inspect.Parameter.KEYWORD_ONLY, annotation=Optional[base],
                default=typer.Option(None, *names, help=f"{f.metadata['help']} [default: {f.default}]",
                                     show_default=False)))
        fn.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
        return fn

    return wrap
