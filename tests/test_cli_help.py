"""--version on every CLI, and every flag's default visible in --help (typer renders help as rich markup,
where a bare "[default: x]" is a style tag that silently disappears)."""

from __future__ import annotations

import dataclasses
import tomllib
from pathlib import Path

import pytest
from helpers import run_cli

from harvest.lens_train import LensSpec, LensTrainConfig
from harvest.spec import CacheSpec
from train.config import TrainConfig

VERSION = tomllib.loads((Path(__file__).parent.parent / "pyproject.toml").read_text())["project"]["version"]


@pytest.mark.parametrize("prog", ["harvest", "train", "analyze"])
def test_version(prog, capsys):
    code, out, _ = run_cli(["--version"], capsys, prog=prog)
    assert code == 0 and out.strip() == f"mlsae-cache {VERSION}"


def _help(argv: list[str], prog: str, capsys, monkeypatch) -> str:
    monkeypatch.setenv("COLUMNS", "1000")  # one line per flag: a wrapped default cannot hide a missing one
    code, out, err = run_cli([*argv, "--help"], capsys, prog=prog)
    assert code == 0, err
    return " ".join(out.split())


@pytest.mark.parametrize(
    "prog, argv, classes, skip",
    [
        ("harvest", ["run"], [CacheSpec], ()),
        ("harvest", ["lens", "train"], [LensSpec, LensTrainConfig], ()),
        ("train", ["run"], [TrainConfig], ()),
        ("train", ["sweep"], [TrainConfig], ("expansion_factor", "k", "layers", "out")),
    ],
)
def test_every_config_flag_shows_its_default(prog, argv, classes, skip, capsys, monkeypatch):
    text = _help(argv, prog, capsys, monkeypatch)
    for cls in classes:
        for f in dataclasses.fields(cls):
            if f.name in skip:
                continue
            shown = '""' if f.default == "" else f.default
            flag = f"--{f.name.replace('_', '-')}"
            row = text.split(f"│ {flag} ", 1)[1].split("│ -", 1)[0]  # this flag's row of the options table
            assert f"[default: {shown}]" in row, (flag, shown, row)


def test_sweep_and_analyze_defaults(capsys, monkeypatch):
    text = _help(["sweep"], "train", capsys, monkeypatch)
    assert "[default: the config's, 64]" in text and "[default: the config's, 32]" in text
    text = _help(["report"], "analyze", capsys, monkeypatch)
    assert "[default: auto]" in text  # --device: a plain typer default
