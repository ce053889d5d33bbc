"""Config dataclasses <-> YAML files <-> CLI flags (kept 1:1), and the CLIs' one-line errors."""

from __future__ import annotations

import dataclasses
import inspect
import sys
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, TypeVar

import typer
import yaml

from .errors import SpecError, UserError

T = TypeVar("T")

_TYPES = {"int": int, "str": str, "float": float, "bool": bool, "str | None": str}


def flag_field(default: Any, help: str) -> Any:
    """A config dataclass field: its default, and the help text of its flag and YAML comment."""
    return dataclasses.field(default=default, metadata={"help": help})


def with_dataclass_flags(
    fields: Iterable[dataclasses.Field], exclude: Iterable[str] = (), short: dict[str, str] | None = None
) -> Callable[[Callable], Callable]:
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
            names = (
                [f"{flag}/--no-{f.name.replace('_', '-')}"] if base is bool else [flag, *short.get(f.name, "").split()]
            )
            params.append(
                inspect.Parameter(
                    f.name,
                    inspect.Parameter.KEYWORD_ONLY,
                    annotation=Optional[base],
                    default=typer.Option(
                        None, *names, help=f"{f.metadata['help']} [default: {f.default}]", show_default=False
                    ),
                )
            )
        fn.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
        return fn

    return wrap


def read_yaml_mapping(path: str | Path, what: str, flag: str) -> dict[str, Any]:
    """The field: value mapping of a YAML config file; SpecError naming the flag otherwise."""
    p = Path(path)
    if not p.is_file():
        raise SpecError(f"{what} file {p} not found: pass {flag} with an existing YAML file")
    try:
        raw = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise SpecError(f"{what} file {p} is not valid YAML ({str(e).splitlines()[0]}): fix its syntax")
    if not isinstance(raw, dict):
        raise SpecError(f"{what} file {p} must be a mapping of field: value")
    return raw


def replace_fields(obj: T, overrides: dict[str, Any], what: str) -> T:
    """A copy of a config dataclass with the given fields changed; None values (unset flags) are ignored,
    unknown names are an error listing the valid ones. `layers` is kept as text ('all' or '0,3,5')."""
    names = {f.name for f in dataclasses.fields(obj)}
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise SpecError(f"unknown {what} field(s) {', '.join(unknown)}: valid fields are {', '.join(sorted(names))}")
    given = {k: v for k, v in overrides.items() if v is not None}
    if isinstance(given.get("layers"), (list, tuple)):
        given["layers"] = ",".join(str(int(x)) for x in given["layers"])
    if "layers" in given:
        given["layers"] = str(given["layers"])
    return dataclasses.replace(obj, **given)


def run_app(app: typer.Typer, on_interrupt: str) -> None:
    """Run a typer app: user errors become one red line on stderr (exit 2), never a traceback."""
    from rich.console import Console

    err = Console(stderr=True)
    try:
        app()
    except UserError as e:
        err.print(f"[red]error:[/] {e}", soft_wrap=True, highlight=False)
        sys.exit(2)
    except KeyboardInterrupt:
        err.print(on_interrupt)
        sys.exit(130)
