"""One way in (train/inputs.py): every analysis of a run refuses a cache of another model in one line, and the
analyses that report no held-out numbers accept another harvest of the run's model, saying which one they read."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from helpers import harvest_and_train, one_line_error, run_cli
from tiny import make_neox

from analyze.results import VarianceResult
from harvest import open_cache
from train.inputs import CacheMismatchError, open_inputs


def _harvest(model: Path, dataset: Path, out: Path, windows: int, **spec: object) -> Path:
    from harvest.run import harvest
    from harvest.spec import CacheSpec

    harvest(
        CacheSpec(
            model=str(model), dataset=str(dataset), out=str(out), context=32, tokens=32 * windows,
            chunk_tokens=256, shard_tokens=1024, shuffle_tokens=1024, batch_size=8, **spec,
        ),
        show_progress=False,
    )  # fmt: skip
    return out


@pytest.fixture(scope="module")
def two_models(neox_dir, text_dir, tmp_path_factory) -> dict[str, Path]:
    """A run trained on model A (the session's tiny NeoX), a second harvest of A (another dataset, fewer
    tokens), a harvest of A's first two layers only, and a harvest of B: the same config with another seed
    (same width, same config.json, other weights)."""
    root = tmp_path_factory.mktemp("inputs")
    model_b = make_neox(root / "tiny-neox-b", seed=1)
    cache, run = harvest_and_train(root / "a", neox_dir)
    return {
        "run": run,
        "cache": cache,
        "same_model": _harvest(neox_dir, text_dir, root / "a2", 40),
        "two_layers": _harvest(neox_dir, text_dir, root / "a3", 40, layers="0,1"),
        "other_model": _harvest(model_b, text_dir, root / "b", 40),
        "model_b": model_b,
    }


def test_the_two_models_differ_only_in_their_weights(two_models):
    a, b = open_cache(two_models["cache"]).meta["model"], open_cache(two_models["other_model"]).meta["model"]
    drop = lambda cfg: {k: v for k, v in cfg.items() if k != "_name_or_path"}  # not where it was loaded from
    assert a["d_model"] == b["d_model"] and drop(a["config"]) == drop(b["config"])
    assert a["identity"]["config_sha256"] == b["identity"]["config_sha256"]
    assert a["identity"]["weights_sha256"] != b["identity"]["weights_sha256"]


def _commands(d: dict[str, Path], cache: Path, out: Path) -> dict[str, tuple[str, list]]:
    run = d["run"]
    return {
        "variance": ("analyze", ["variance", "--run", run, "--cache", cache, "--tokens", 500, "--out", out / "v"]),
        "reconstruction": ("analyze", ["reconstruction", "--run", run, "--cache", cache, "--out", out / "r"]),
        "delta-ce": ("analyze", ["delta-ce", "--run", run, "--cache", cache, "--tokens", 64, "--out", out / "d"]),
        "prompt": ("analyze", ["prompt", "Hello there", "--run", run, "--cache", cache, "--out", out / "p"]),
        "examples": ("analyze", ["examples", "--run", run, "--cache", cache, "--tokens", 500, "--out", out / "e"]),
        "resid": ("analyze", ["resid", "--cache", cache, "--run", run, "--out", out / "g"]),
        "report": ("analyze", ["report", "--run", run, "--cache", cache, "--out", out / "rep"]),
        "export": ("train", ["export", run, "--format", "saelens", "--cache", cache, "--out", out / "x"]),
    }


def test_every_analysis_refuses_a_cache_of_another_model_in_one_line(two_models, tmp_path, capsys):
    for name, (prog, argv) in _commands(two_models, two_models["other_model"], tmp_path).items():
        line = one_line_error(run_cli(argv, capsys, prog), str(two_models["other_model"]), str(two_models["run"]))
        assert "another model" in line and "weights_sha256 differs" in line and "--cache" in line, (name, line)
    assert not any(tmp_path.iterdir())  # nothing written, not even an empty output folder


def test_a_cache_without_the_run_s_layers_is_refused(two_models, tmp_path, capsys):
    _, argv = _commands(two_models, two_models["two_layers"], tmp_path)["variance"]
    one_line_error(run_cli(argv, capsys, "analyze"), "layers [0, 1]", "layer(s) [2]")


def test_variance_accepts_another_harvest_of_the_same_model_and_records_it(two_models, tmp_path, capsys):
    other = open_cache(two_models["same_model"])
    _, argv = _commands(two_models, two_models["same_model"], tmp_path)["variance"]
    code, _, err = run_cli(argv, capsys, "analyze")
    assert code == 0, err
    assert "another harvest of the run's model" in err and other.fingerprint in err
    res = VarianceResult.load(tmp_path / "v")
    assert res.cache_fingerprint == other.fingerprint != open_cache(two_models["cache"]).fingerprint
    assert res.tokens == 500


def test_export_accepts_another_harvest_of_the_same_model_and_records_it(two_models, tmp_path):
    from train.export import export_run

    other = open_cache(two_models["same_model"])
    res = export_run(two_models["run"], "saelens", tmp_path / "x", cache_path=two_models["same_model"], log=print)
    assert res["read_cache_fingerprint"] == other.fingerprint != res["cache_fingerprint"]


def test_held_out_analyses_keep_to_the_training_cache(two_models, tmp_path, capsys):
    for name in ("reconstruction", "delta-ce", "report"):
        prog, argv = _commands(two_models, two_models["same_model"], tmp_path)[name]
        line = one_line_error(run_cli(argv, capsys, prog), "held-out windows", str(two_models["cache"]))
        assert "another harvest" in line, line
    with pytest.raises(CacheMismatchError, match="examples --heldout"):
        open_inputs(two_models["run"], two_models["same_model"], purpose="analyze examples --heldout", heldout=True)
    assert open_inputs(two_models["run"], two_models["cache"], purpose="x", heldout=True).trained_on


def _legacy_copy(two_models: dict[str, Path], folder: Path, cache_path: str | None = None) -> Path:
    """The run as written before its CacheRef held the model's identity (optionally pointing elsewhere)."""
    shutil.copytree(two_models["run"], folder)
    record = json.loads((folder / "config.json").read_text())
    assert record["cache"].pop("model_identity")["weights_sha256"]
    if cache_path is not None:
        record["cache"]["path"] = cache_path
    (folder / "config.json").write_text(json.dumps(record))
    return folder


def test_old_records_compare_the_model_through_their_training_cache_or_by_name(two_models, tmp_path, capfd):
    old = _legacy_copy(two_models, tmp_path / "old")
    with pytest.raises(CacheMismatchError, match="weights_sha256 differs"):
        open_inputs(old, two_models["other_model"], purpose="analyze variance")
    assert not open_inputs(old, two_models["same_model"], purpose="analyze variance").trained_on
    assert "warning" not in capfd.readouterr().err

    gone = _legacy_copy(two_models, tmp_path / "gone", cache_path=str(tmp_path / "moved-away"))
    with pytest.raises(CacheMismatchError, match="another model|but"):
        open_inputs(gone, two_models["other_model"], purpose="analyze variance")
    assert "checked by name" in capfd.readouterr().err
    assert not open_inputs(gone, two_models["same_model"], purpose="analyze variance").trained_on
