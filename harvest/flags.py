"""Config dataclasses <-> YAML files <-> CLI flags (kept 1:1), and the CLIs' one-line errors."""

from __future__ import annotations

import dataclasses
import inspect
import math
import signal
import sys
import types
import typing
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterable, Literal, Optional, TypeVar, Union

import typer
import yaml

from .errors import Interrupted, SpecError, UserError, one_line, storage_error

T = TypeVar("T", bound="FlagConfig")
SEED_MAX = 2**63 - 1  # every seed (harvest, lens, train, held-out split) fits torch's and numpy's generators


def default_note(value: Any) -> str:
    """' [default: VALUE]' for a help text, escaped: typer renders help as rich markup, where a bare
    [default: ...] is a style tag and silently disappears."""
    from rich.markup import escape

    shown = '""' if value == "" else value
    return " " + escape(f"[default: {shown}]")


def package_version() -> str:
    """The installed mlsae-cache version; from pyproject.toml when the code runs from a checkout that is
    not installed (PYTHONPATH)."""
    from importlib import metadata

    try:
        return metadata.version("mlsae-cache")
    except metadata.PackageNotFoundError:
        import tomllib

        pyproject = Path(__file__).resolve().parent.parent / "pyproject.toml"
        try:
            return str(tomllib.loads(pyproject.read_text())["project"]["version"])
        except (OSError, KeyError, tomllib.TOMLDecodeError):
            return "unknown"


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"mlsae-cache {package_version()}")
        raise typer.Exit()


def version_option() -> Any:
    """`--version` for an app's callback: prints the package version and exits, before any command."""
    return typer.Option(
        False, "--version", callback=_print_version, is_eager=True, help="Print the mlsae-cache version and exit."
    )


def flag_field(default: Any, help: str) -> Any:
    """A config dataclass field: its default, and the help text of its flag and YAML comment."""
    return dataclasses.field(default=default, metadata={"help": help})


def field_types(cls: type) -> dict[str, Any]:
    """Each field's resolved type (the classes use `from __future__ import annotations`)."""
    return typing.get_type_hints(cls)


def choices(cls: type, name: str) -> tuple[Any, ...]:
    """The allowed values of a Literal[...] field."""
    return typing.get_args(field_types(cls)[name])


def _optional_inner(hint: Any) -> Any | None:
    """T for Optional[T] / T | None, else None."""
    if typing.get_origin(hint) in (Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return None


def check_value(name: str, value: Any, hint: Any) -> Any:
    """`value` as a valid value of a field typed `hint` (ints become floats for float fields); SpecError
    naming the field, the value and what it must be otherwise. YAML files bypass the CLI's parsing."""
    inner = _optional_inner(hint)
    if inner is not None:
        return None if value is None else check_value(name, value, inner)
    if typing.get_origin(hint) is Literal:
        allowed = typing.get_args(hint)
        if value not in allowed:
            raise SpecError(f"{name} = {value!r} is not supported: use one of {', '.join(map(str, allowed))}")
        return value
    if hint is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        if not math.isfinite(value):  # nan / inf only ever end in a NaN loss or a useless run
            raise SpecError(f"{name} = {value!r} must be a finite number")
        return float(value)
    if hint in (int, str, bool) and isinstance(value, hint) and not (hint is int and isinstance(value, bool)):
        if hint is int and (name == "seed" or name.endswith("_seed")) and not 0 <= value <= SEED_MAX:
            raise SpecError(f"{name} = {value} is out of range: use an integer from 0 to 2^63-1")
        if hint is int and not -SEED_MAX <= value <= SEED_MAX:  # every count ends up in an int64 somewhere
            raise SpecError(f"{name} = {value} is out of range: use an integer below 2^63")
        return value
    if typing.get_origin(hint) is list and isinstance(value, (list, tuple)):
        (item,) = typing.get_args(hint)
        return [check_value(name, v, item) for v in value]
    kind = getattr(hint, "__name__", str(hint))
    raise SpecError(f"{name} = {value!r} ({type(value).__name__}) must be of type {kind}: fix the flag or YAML value")


class FlagConfig:
    """Base of the config dataclasses (CacheSpec, TrainConfig, the lens configs): one dataclass maps 1:1
    onto a YAML file and the CLI flags; values are type-checked on the way in."""

    _what: ClassVar[str] = "config"  # how error messages name the thing
    _yaml_flag: ClassVar[str] = "--config"

    @classmethod
    def from_yaml(cls: type[T], path: str | Path) -> T:
        return cls().replace(**read_yaml_mapping(path, cls._what, cls._yaml_flag))

    def replace(self: T, **overrides: Any) -> T:
        """A copy with the given fields changed; None values are ignored (unset CLI flags)."""
        return replace_fields(self, overrides, self._what)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)  # type: ignore[call-overload]

    def check_types(self: T) -> T:
        """Every field holds a value of its declared type (Literal fields: one of the choices)."""
        for name, hint in field_types(type(self)).items():
            if name.startswith("_") or typing.get_origin(hint) is ClassVar:
                continue
            check_value(name, getattr(self, name), hint)
        return self


def with_dataclass_flags(
    *classes: type, exclude: Iterable[str] = (), short: dict[str, str] | None = None
) -> Callable[[Callable], Callable]:
    """Decorator: append one optional flag per field of the dataclasses (--field-name; bools as --x/--no-x;
    Literal fields list their choices in --help), default None (= not given). The command receives them in
    **overrides; `None` means "keep the config's value"."""
    skip, short = set(exclude), short or {}

    def wrap(fn: Callable) -> Callable:
        params = [p for p in inspect.signature(fn).parameters.values() if p.kind != p.VAR_KEYWORD]
        for cls in classes:
            hints = field_types(cls)
            for f in dataclasses.fields(cls):
                if f.name in skip:
                    continue
                base = _optional_inner(hints[f.name]) or hints[f.name]
                metavar = None
                if typing.get_origin(base) is Literal:
                    # parsed as text and checked by check_value: a bad choice is our one-line error, and
                    # --help shows the choices
                    metavar, base = "[" + "|".join(map(str, typing.get_args(base))) + "]", str
                flag = f"--{f.name.replace('_', '-')}"
                names = (
                    [f"{flag}/--no-{f.name.replace('_', '-')}"]
                    if base is bool
                    else [flag, *short.get(f.name, "").split()]
                )
                params.append(
                    inspect.Parameter(
                        f.name,
                        inspect.Parameter.KEYWORD_ONLY,
                        annotation=Optional[base],
                        default=typer.Option(
                            None,
                            *names,
                            help=f.metadata["help"] + default_note(f.default),
                            show_default=False,
                            metavar=metavar,
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
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise SpecError(f"{what} file {p} is not valid YAML ({str(e).splitlines()[0]}): fix its syntax")
    if not isinstance(raw, dict):
        raise SpecError(f"{what} file {p} must be a mapping of field: value")
    return raw


def replace_fields(obj: Any, overrides: dict[str, Any], what: str) -> Any:
    """A copy of a config dataclass with the given fields changed and type-checked; None values (unset
    flags) are ignored, unknown names are an error listing the valid ones. `layers` is kept as text
    ('all' or '0,3,5')."""
    hints = field_types(type(obj))
    names = {f.name for f in dataclasses.fields(obj)}
    unknown = sorted(set(overrides) - names, key=str)
    if unknown:
        raise SpecError(
            f"unknown {what} field(s) {', '.join(map(str, unknown))}: valid fields are {', '.join(sorted(names))}"
        )
    given = {k: v for k, v in overrides.items() if v is not None}
    if isinstance(given.get("layers"), (list, tuple)):
        given["layers"] = ",".join(str(x) for x in given["layers"])
    if isinstance(given.get("layers"), int) and not isinstance(given["layers"], bool):
        given["layers"] = str(given["layers"])
    given = {k: check_value(k, v, hints[k]) for k, v in given.items()}
    return dataclasses.replace(obj, **given)


def _interrupt(signum: int, frame: Any) -> None:
    raise Interrupted


def cli_app(help: str, callback: Callable | None = None) -> typer.Typer:
    """A typer app as every CLI of the project builds it (no shell completion, no rich tracebacks: user
    errors are one line, see run_app), with --version. `callback`: the app's own top-level options; it
    must take `version: bool = version_option()` too."""
    app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False, help=help)

    def options(version: bool = version_option()) -> None:
        pass

    app.callback()(callback or options)
    return app


def run_app(app: typer.Typer, on_interrupt: str) -> None:
    """Run a typer app: user errors and file-system failures become one red line on stderr (exit 2), Ctrl-C
    prints `on_interrupt` (exit 130); never a traceback.

    SIGINT raises our own `Interrupted`: typer turns a KeyboardInterrupt into a silent exit 130 inside
    `app()`, so an `except KeyboardInterrupt` here would never run."""
    from rich.console import Console
    from rich.markup import escape

    err = Console(stderr=True)

    def leave(message: str, code: int) -> None:
        err.print(message, soft_wrap=True, highlight=False)
        sys.exit(code)

    previous = signal.signal(signal.SIGINT, _interrupt)
    try:
        app()
    except UserError as e:
        leave(f"[red]error:[/] {escape(one_line(str(e)))}", 2)
    except OSError as e:  # a file-system failure nothing more specific caught (full disk, read-only, ...)
        leave(f"[red]error:[/] {escape(one_line(str(storage_error(e))))}", 2)
    except Interrupted:
        leave(escape(on_interrupt), 130)
    finally:
        signal.signal(signal.SIGINT, previous)
