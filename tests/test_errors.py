"""Bad input -> one line naming the problem and the fix, exit code 2, no traceback, no cache that looks complete."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from helpers import one_line_error, run_cli, tmpfs

from harvest import open_cache

SMALL = [
    "--context",
    "16",
    "--tokens",
    "320",
    "--chunk-tokens",
    "32",
    "--shard-tokens",
    "64",
    "--shuffle-tokens",
    "128",
    "--batch-size",
    "4",
    "--quiet",
]


def run_args(model, dataset, out, *extra) -> list[str]:
    return ["run", "--model", model, "--dataset", dataset, "--out", out, *SMALL, *extra]


assert_user_error = one_line_error


def assert_no_complete_cache(out: Path) -> None:
    if out.exists() and (out / "zarr.json").exists():
        assert not open_cache(out).complete


def test_unknown_model(tmp_path, text_dir, capsys):
    out = tmp_path / "c"
    assert_user_error(run_cli(run_args("no-such-model-xyz", text_dir, out), capsys), "no-such-model-xyz", "not found")
    assert_user_error(run_cli(run_args(tmp_path / "nope", text_dir, out), capsys), "not found")
    assert_user_error(run_cli(run_args(tmp_path / "x.gguf", text_dir, out), capsys), "GGUF file", "not found")
    assert not out.exists()


def test_unknown_dataset_or_file(tmp_path, neox_dir, capsys):
    out = tmp_path / "c"
    assert_user_error(run_cli(run_args(neox_dir, tmp_path / "missing.txt", out), capsys), "not found")
    assert_user_error(run_cli(run_args(neox_dir, "nobody/no-such-dataset", out), capsys), "no-such-dataset")
    assert not out.exists()


def test_missing_text_column(tmp_path, neox_dir, capsys):
    data = tmp_path / "d.jsonl"
    data.write_text("\n".join(json.dumps({"body": f"document number {i} " * 20}) for i in range(50)))
    out = tmp_path / "c"
    assert_user_error(run_cli(run_args(neox_dir, data, out), capsys), "no column 'text'", "body", "--text-column")
    assert not out.exists()
    code, _, err = run_cli(run_args(neox_dir, data, out, "--text-column", "body"), capsys)
    assert code == 0, err
    assert open_cache(out).complete


def test_budget_larger_than_the_data(tmp_path, neox_dir, text_dir, capsys):
    out = tmp_path / "c"
    assert_user_error(
        run_cli(run_args(neox_dir, text_dir, out, "--tokens", "10000000"), capsys),
        "holds only",
        "lower --tokens to at most",
    )
    assert not out.exists()


def test_existing_cache_with_another_spec(tmp_path, neox_dir, text_dir, capsys):
    out = tmp_path / "c"
    assert run_cli(run_args(neox_dir, text_dir, out), capsys)[0] == 0
    fp = open_cache(out).fingerprint
    assert_user_error(
        run_cli(run_args(neox_dir, text_dir, out, "--seed", "1"), capsys),
        "different spec",
        "seed: 0 -> 1",
        "another --out",
    )
    assert open_cache(out).fingerprint == fp and open_cache(out).complete
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "file.txt").write_text("x")
    assert_user_error(run_cli(run_args(neox_dir, text_dir, tmp_path / "other"), capsys), "not an mlsae cache")


def test_layer_out_of_range(tmp_path, neox_dir, text_dir, capsys):
    out = tmp_path / "c"
    assert_user_error(
        run_cli(run_args(neox_dir, text_dir, out, "--layers", "1,5"), capsys), "[5] out of range", "3 blocks"
    )
    assert_user_error(run_cli(run_args(neox_dir, text_dir, out, "--layers", "two"), capsys), "layers")
    assert not out.exists()


def test_invalid_spec_values(tmp_path, neox_dir, text_dir, capsys):
    out = tmp_path / "c"
    assert_user_error(run_cli(run_args(neox_dir, text_dir, out, "--dtype", "int8"), capsys), "dtype", "bfloat16")
    assert_user_error(
        run_cli(run_args(neox_dir, text_dir, out, "--shuffle-tokens", "100"), capsys), "shuffle_tokens", "multiple"
    )
    bad = tmp_path / "spec.yaml"
    bad.write_text("tokens: 100\nbogus_field: 3\n")
    assert_user_error(run_cli(["run", "--spec", bad], capsys), "bogus_field")
    assert not out.exists()


def test_float16_overflow(tmp_path, neox_dir, text_dir, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    big = tmp_path / "big-model"
    model = AutoModelForCausalLM.from_pretrained(neox_dir)
    with torch.no_grad():
        model.gpt_neox.embed_in.weight.mul_(1e6)  # "massive activations" far beyond float16's 65504
    model.save_pretrained(big)
    AutoTokenizer.from_pretrained(neox_dir).save_pretrained(big)
    out = tmp_path / "c"
    assert_user_error(
        run_cli(run_args(big, text_dir, out, "--dtype", "float16"), capsys), "beyond float16", "--dtype bfloat16"
    )
    assert not out.exists()  # the run wrote nothing of value, so it leaves nothing behind
    assert run_cli(run_args(big, text_dir, out, "--dtype", "bfloat16"), capsys)[0] == 0


def test_disk_full_before_starting(tmp_path, neox_dir, text_dir, capsys, monkeypatch):
    import harvest.run

    monkeypatch.setattr(harvest.run.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**9, 10**9 - 10, 10))
    out = tmp_path / "c"
    line = assert_user_error(
        run_cli(run_args(neox_dir, text_dir, out), capsys), "not enough disk space", "10 B are free"
    )
    assert "0.00" not in line and ("kB" in line or "MB" in line), line  # sizes in units that show them
    assert not out.exists()


@pytest.fixture
def tiny_disk(tmp_path):
    with tmpfs(tmp_path / "mnt", "size=400k") as mnt:
        yield mnt


def test_disk_full_while_writing_is_a_clean_error_and_resumable(
    tiny_disk, tmp_path, neox_dir, text_dir, capsys, monkeypatch
):
    import harvest.run

    # the pre-check is fooled, so the real file system runs out of space in the middle of the run
    monkeypatch.setattr(harvest.run.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**12, 0, 10**12))
    out = tiny_disk / "c"
    args = run_args(neox_dir, text_dir, out, "--tokens", "3200", "--shuffle-tokens", "640")
    assert_user_error(run_cli(args, capsys), "disk full", "rerun")
    if out.exists():
        cache = open_cache(out)
        assert not cache.complete
        from harvest.cache import verify_cache

        assert all("missing (cache incomplete)" in p for p in verify_cache(cache))


def test_unwritable_output_path(tmp_path, neox_dir, text_dir, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    assert_user_error(run_cli(run_args(neox_dir, text_dir, blocker / "cache"), capsys), "cannot write", "--out")


def test_info_and_verify_on_bad_paths(tmp_path, neox_dir, text_dir, capsys):
    assert_user_error(run_cli(["info", tmp_path / "nothing"], capsys), "not a cache")
    out = tmp_path / "c"
    assert run_cli(run_args(neox_dir, text_dir, out), capsys)[0] == 0
    code, stdout, _ = run_cli(["info", out], capsys)
    assert code == 0 and "complete" in stdout and "mean norm" in stdout
    assert run_cli(["verify", out], capsys)[0] == 0
    f = next((out / "acts").rglob("c/0/0/0"))
    f.write_bytes(f.read_bytes()[:-1])
    code, _, err = run_cli(["verify", out], capsys)
    assert code == 1 and "truncated" in err
