"""Hostile and careless input (issue 13): files planted by someone else never run code or redirect a write,
swapped weights and NaN activations never reach a cache silently, and every bad input is one line with
exit 2 (never a traceback); Ctrl-C prints how to resume and exits 130.

Everything runs on tiny random models; the subprocess cases send real signals to real CLIs.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import one_line_error, run_cli, tmpfs

from harvest import open_cache
from harvest.run import harvest
from harvest.spec import CacheSpec

SMALL = dict(context=16, tokens=320, chunk_tokens=32, shard_tokens=64, shuffle_tokens=128, batch_size=4)
LENS = ["--context", 32, "--tokens", 32 * 12, "--steps", 6, "--batch", 2, "--heldout", 2, "--vocab-chunk", 128]


def flags(**kw) -> list[str]:
    return [str(a) for k, v in kw.items() for a in (f"--{k.replace('_', '-')}", v)]


def lens_args(model, dataset, out, *extra) -> list[str]:
    return ["lens", "train", "--model", model, "--dataset", dataset, "--out", out, "--quiet", *LENS, *extra]


def run_args(model, dataset, out, *extra) -> list[str]:
    return ["run", "--model", model, "--dataset", dataset, "--out", out, "--quiet", *flags(**SMALL), *extra]


def env() -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


class Planted:
    """Pickles into a call of open(path, "w"): loading it without weights_only creates `path`."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return (open, (str(self.path), "w"))


def plant_pickle(at: Path, evidence: Path) -> None:
    torch.save({"step": 3, "identity": Planted(evidence)}, at)
    assert not evidence.exists()


def copy_model(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


# ---------------------------------------------------------------------------------------------
# no code execution from files, no write through a planted link


def test_planted_pickle_as_lens_checkpoint_never_runs(neox_dir, text_dir, tmp_path, capsys):
    from harvest.lens_train import CHECKPOINT_FILE, work_folder

    out, evidence = tmp_path / "lens", tmp_path / "pwned"
    work = work_folder(out, create=True)  # a genuine work folder, as an interrupted run leaves it
    plant_pickle(work / CHECKPOINT_FILE, evidence)
    args = lens_args(neox_dir, text_dir, out)
    one_line_error(run_cli(args, capsys), "cannot load the lens-training checkpoint", "safely", "remove it")
    assert not evidence.exists() and not out.exists()


@pytest.mark.parametrize("kind", ["foreign folder", "group-writable", "symlink"])
def test_lens_work_folder_not_created_by_lens_training_is_refused(kind, neox_dir, text_dir, tmp_path, capsys):
    from harvest.lens_train import CHECKPOINT_FILE, WORK_MARKER

    out, evidence = tmp_path / "lens", tmp_path / "pwned"
    work = tmp_path / ".lens.tmp"
    if kind == "symlink":  # a link to a folder that looks like ours
        (tmp_path / "elsewhere").mkdir(mode=0o700)
        (tmp_path / "elsewhere" / WORK_MARKER).write_text("")
        work.symlink_to(tmp_path / "elsewhere")
    else:
        work.mkdir(mode=0o700)
        if kind == "group-writable":
            (work / WORK_MARKER).write_text("")
            work.chmod(0o777)
    plant_pickle(work / CHECKPOINT_FILE, evidence)
    args = lens_args(neox_dir, text_dir, out)
    one_line_error(run_cli(args, capsys), ".lens.tmp exists but is not a work folder", "remove it")
    assert not evidence.exists() and not out.exists()


def test_a_second_lens_training_on_one_out_is_refused_naming_the_holder(neox_dir, text_dir, tmp_path, capsys):
    from harvest.lens_train import work_folder
    from harvest.lock import exclusive

    out = tmp_path / "lens"
    args = lens_args(neox_dir, text_dir, out)
    with exclusive(work_folder(out, create=True), "harvest lens train"):  # as a running training holds it
        line = one_line_error(run_cli(args, capsys), "in use by `harvest lens train`", f"pid {os.getpid()}")
    assert "wait for it to finish" in line and not out.exists()


def test_planted_pickle_as_run_checkpoint_never_runs(train_cache, tmp_path, capsys):
    out, evidence = tmp_path / "run", tmp_path / "pwned"
    args = ["run", "--quiet", "--cache", train_cache, "--out", out, *flags(**TRAIN, tokens=512 * 2)]
    assert run_cli(args, capsys, prog="train")[0] == 0
    (out / "summary.json").unlink()  # an unfinished run: the next command resumes from its checkpoint
    plant_pickle(out / "checkpoint.pt", evidence)
    one_line_error(run_cli(args, capsys, prog="train"), "checkpoint")
    assert not evidence.exists()


def test_planted_symlinks_at_predictable_temp_names_are_never_followed(neox_dir, text_dir, tmp_path, capsys):
    victim_file, victim_dir = tmp_path / "victim.txt", tmp_path / "victim-dir"
    victim_file.write_text("precious")
    victim_dir.mkdir()
    (victim_dir / "data.txt").write_text("precious")
    out = tmp_path / "c"
    # the names the old code used (this process runs the CLI in-process, so its pid is the harvest's)
    (tmp_path / f".mlsae-write-probe-{os.getpid()}").symlink_to(victim_file)
    (tmp_path / f".c.creating-{os.getpid()}").symlink_to(victim_dir)
    code, _, err = run_cli(run_args(neox_dir, text_dir, out), capsys)
    assert code == 0, err
    assert open_cache(out).complete
    assert victim_file.read_text() == "precious"
    assert [p.name for p in victim_dir.iterdir()] == ["data.txt"] and (
        victim_dir / "data.txt"
    ).read_text() == "precious"


# ---------------------------------------------------------------------------------------------
# the model's weights are part of the cache's identity


def test_weights_swapped_in_place_are_refused_on_resume(neox_dir, text_dir, tmp_path, capsys, monkeypatch):
    from tiny import make_neox

    monkeypatch.setenv("MLSAE_HOME", str(tmp_path / "home"))
    model, out = copy_model(neox_dir, tmp_path / "model"), tmp_path / "c"
    assert run_cli(run_args(model, text_dir, out), capsys)[0] == 0
    cache = open_cache(out)
    last = cache.layout.n_blocks - 1
    cache.manifest_path(last).unlink()  # an interrupted harvest
    code, _, err = run_cli(run_args(model, text_dir, out), capsys)  # the same weights resume
    assert code == 0 and "resuming" in err
    cache.manifest_path(last).unlink()
    weights = model / "model.safetensors"
    size = weights.stat().st_size
    make_neox(model, seed=1)  # other weights, same architecture: same file sizes
    assert weights.stat().st_size == size
    one_line_error(run_cli(run_args(model, text_dir, out), capsys), "different spec", "model_identity")
    assert not open_cache(out).complete
    # the hash is computed once per file version and remembered under MLSAE_HOME
    memo = json.loads((tmp_path / "home" / "weight-hashes.json").read_text())
    assert memo[str(weights.resolve())][:2] == [size, weights.stat().st_mtime_ns]


# ---------------------------------------------------------------------------------------------
# NaN / inf activations


@pytest.fixture(scope="module")
def nan_model(neox_dir, tmp_path_factory) -> Path:
    """The tiny model with one NaN weight in block 1's MLP: blocks 1 and 2 output NaN everywhere."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = tmp_path_factory.mktemp("nan") / "model"
    model = AutoModelForCausalLM.from_pretrained(neox_dir)
    with torch.no_grad():
        model.gpt_neox.layers[1].mlp.dense_h_to_4h.weight[0, 0] = float("nan")
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(neox_dir).save_pretrained(folder)
    return folder


def test_nan_activations_stop_the_harvest_and_leave_nothing(nan_model, text_dir, tmp_path, capsys):
    out = tmp_path / "c"
    one_line_error(
        run_cli(run_args(nan_model, text_dir, out), capsys),
        "block 0, layer 1",
        "NaN/inf",
        "in 2 of 3 layers",
        "--allow-nonfinite",
    )
    assert not out.exists()


def test_allow_nonfinite_stores_them_and_counts_them_per_layer(nan_model, text_dir, tmp_path, capsys):
    out = tmp_path / "c"
    code, _, err = run_cli(run_args(nan_model, text_dir, out, "--allow-nonfinite"), capsys)
    assert code == 0, err
    cache = open_cache(out)
    stats = cache.stats()
    n, d = cache.layout.n_tokens, cache.layout.d_model
    assert stats.nonfinite.tolist() == [0, n * d, n * d]
    assert stats.count[0] > 0 and stats.count[1:].tolist() == [0, 0]  # NaN vectors stay out of the moments
    assert torch.isfinite(stats.mean).all()
    assert torch.isnan(cache.read(1).float()).all() and torch.isfinite(cache.read(0).float()).all()
    code, stdout, _ = run_cli(["info", out], capsys)
    assert code == 0 and "NaN/inf values stored" in stdout and f"{2 * n * d:,}" in stdout


# ---------------------------------------------------------------------------------------------
# everything validated before the cache folder exists


def test_context_longer_than_the_models_positions(neox_dir, text_dir, tmp_path, capsys):
    out = tmp_path / "c"
    one_line_error(
        run_cli(
            run_args(neox_dir, text_dir, out, "--context", "512", "--tokens", "1024", "--shuffle-tokens", "512"), capsys
        ),
        "context = 512",
        "256 positions",
        "--context 256",
    )
    assert not out.exists()
    code, _, err = run_cli(
        ["lens", "train", "--model", neox_dir, "--out", tmp_path / "l", "--quiet", "--context", "300"], capsys
    )
    assert code == 2 and "256 positions" in err and not (tmp_path / "l").exists()


@pytest.mark.parametrize(
    "yaml_text, fragments",
    [
        ("tokens: many\n", ["tokens = 'many'", "int"]),
        ("context: [16, 32]\n", ["context", "int"]),
        ("seed: -1\n", ["seed = -1", "out of range", "0 to 2^63-1"]),
        ("dataset: 5\n", ["dataset = 5", "str"]),
        ("special_tokens: all\n", ["special_tokens = 'all'", "reference"]),
        ("allow_nonfinite: maybe\n", ["allow_nonfinite = 'maybe'", "bool"]),
        ("layers: {a: 1}\n", ["layers"]),
        ("- just\n- a list\n", ["must be a mapping"]),
    ],
)
def test_spec_yaml_values_of_the_wrong_type(yaml_text, fragments, tmp_path, capsys):
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml_text)
    out = tmp_path / "c"
    one_line_error(run_cli(["run", "--spec", spec, "--out", out], capsys), *fragments)
    assert not out.exists()


def test_train_and_lens_config_yaml_values_of_the_wrong_type(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("lr: fast\n")
    one_line_error(run_cli(["run", "--config", cfg], capsys, prog="train"), "lr = 'fast'", "float")
    cfg.write_text("steps: [1, 2]\n")
    one_line_error(run_cli(["lens", "train", "--config", cfg], capsys), "steps", "int")


# ---------------------------------------------------------------------------------------------
# unreadable or odd datasets


def _bad_dataset(kind: str, folder: Path) -> Path:
    folder.mkdir()
    if kind == "binary txt":
        (folder / "a.txt").write_text("A fine first document. " * 50)
        (folder / "b.txt").write_bytes(bytes(range(256)) * 40)
    elif kind == "malformed jsonl":
        lines = [json.dumps({"text": f"document {i} " * 30}) for i in range(5)] + ["{not json"]
        (folder / "d.jsonl").write_text("\n".join(lines))
    elif kind == "jsonl of arrays":
        (folder / "d.jsonl").write_text("[1, 2, 3]\n[4]\n")
    elif kind == "corrupt parquet":
        (folder / "d.parquet").write_bytes(b"PAR1" + bytes(range(256)) * 8)
    elif kind == "empty jsonl":
        (folder / "d.jsonl").write_text("")
    return folder


@pytest.mark.parametrize("kind", ["binary txt", "malformed jsonl", "jsonl of arrays", "corrupt parquet", "empty jsonl"])
def test_unreadable_dataset_files_are_one_line(kind, neox_dir, tmp_path, capsys):
    data, out = _bad_dataset(kind, tmp_path / "data"), tmp_path / "c"
    one_line_error(run_cli(run_args(neox_dir, data, out), capsys), "dataset")
    assert not out.exists()


def test_rows_whose_text_is_not_a_string_are_counted_or_refused(neox_dir, tmp_path, capsys):
    data = tmp_path / "d.jsonl"
    rows = [{"text": f"Document {i}. The committee met on Tuesday to discuss the budget. " * 6} for i in range(40)]
    rows[3]["text"], rows[7]["text"], rows[11]["text"] = None, 42, ["a", "list"]
    data.write_text("\n".join(json.dumps(r) for r in rows))
    out = tmp_path / "c"
    code, _, err = run_cli(run_args(neox_dir, data, out), capsys)
    assert code == 0, err
    warnings = [l for l in err.splitlines() if "warning:" in l]
    assert len(warnings) == 1 and "skipped 3 rows" in warnings[0] and "--strict-text" in warnings[0]
    one_line_error(
        run_cli(run_args(neox_dir, data, tmp_path / "c2", "--strict-text"), capsys), "row 3", "NoneType", "not text"
    )
    assert not (tmp_path / "c2").exists()


# ---------------------------------------------------------------------------------------------
# training and analysis CLIs: where they write, what they read

TRAIN = dict(expansion_factor=4, k=4, batch_tokens=512, eval_tokens=1024, round_chunks=4, lr=3e-3)


@pytest.fixture(scope="module")
def train_cache(neox_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("hostile") / "cache"
    spec = dict(context=32, tokens=32 * 256, chunk_tokens=256, shard_tokens=1024, shuffle_tokens=2048, batch_size=8)
    harvest(CacheSpec(model=str(neox_dir), dataset="sotu", out=str(out), **spec), show_progress=False)
    return out


@pytest.fixture(scope="module")
def trained_run(train_cache, tmp_path_factory) -> Path:
    from train.config import TrainConfig
    from train.loop import train

    out = tmp_path_factory.mktemp("hostile") / "run"
    train([TrainConfig(cache=str(train_cache), out=str(out), tokens=512 * 4, **TRAIN)], show_progress=False)
    return out


@pytest.fixture
def read_only_dir(tmp_path):
    with tmpfs(tmp_path / "ro", "ro,size=64k") as mnt:
        yield mnt


def test_train_and_analyze_out_that_is_a_file_or_read_only(train_cache, trained_run, read_only_dir, tmp_path, capsys):
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    for out in (a_file, a_file / "run", read_only_dir / "run"):
        args = ["run", "--quiet", "--cache", train_cache, "--out", out, *flags(**TRAIN, tokens=512)]
        one_line_error(run_cli(args, capsys, prog="train"), str(out.parent if out != a_file else out))
        args = ["variance", "--sae", trained_run, "--out", out, "--tokens", "512"]
        one_line_error(run_cli(args, capsys, prog="analyze"))
    assert a_file.read_text() == "x"


@pytest.mark.parametrize(
    "damage",
    [
        lambda c: (c / "zarr.json").write_text("{not json"),
        lambda c: (c / "zarr.json").write_bytes(b"\xff\xfe binary"),
        lambda c: _edit_attributes(c, lambda a: a.update(layout="a string")),
        lambda c: _edit_attributes(c, lambda a: a["layout"].pop("d_model")),
        lambda c: _edit_zarr_json(c, lambda z: z.update(attributes=[1, 2])),
    ],
    ids=["invalid json", "binary", "layout a string", "layout lacks a field", "attributes a list"],
)
def test_damaged_cache_metadata_is_one_line_everywhere(damage, train_cache, tmp_path, capsys):
    import shutil

    cache = shutil.copytree(train_cache, tmp_path / "cache")
    damage(cache)
    for prog, args in [
        ("harvest", ["info", cache]),
        ("harvest", ["verify", cache]),
        ("train", ["run", "--quiet", "--cache", cache, "--out", tmp_path / "r", *flags(**TRAIN, tokens=512)]),
        ("analyze", ["resid", "--cache", cache, "--out", tmp_path / "a"]),
    ]:
        one_line_error(run_cli(args, capsys, prog=prog), str(cache))


def _edit_zarr_json(cache: Path, edit) -> None:
    z = json.loads((cache / "zarr.json").read_text())
    edit(z)
    (cache / "zarr.json").write_text(json.dumps(z))


def _edit_attributes(cache: Path, edit) -> None:
    _edit_zarr_json(cache, lambda z: edit(z["attributes"]["mlsae_cache"]))


def test_missing_chunk_file_during_training_is_one_line(train_cache, tmp_path, capsys):
    import shutil

    cache = shutil.copytree(train_cache, tmp_path / "cache")
    victim = next((cache / "acts").rglob("c/1/0/0"))
    victim.unlink()
    args = ["run", "--quiet", "--cache", cache, "--out", tmp_path / "r", *flags(**TRAIN, tokens=512 * 8)]
    one_line_error(run_cli(args, capsys, prog="train"), "c/1/0/0")


@pytest.mark.parametrize("damage", ["sae.safetensors", "sae_config.json", "config.json"])
def test_damaged_run_folder_files_are_one_line(damage, trained_run, tmp_path, capsys):
    import shutil

    run = shutil.copytree(trained_run, tmp_path / "run")
    (run / damage).write_text("{not what it should be")
    one_line_error(run_cli(["variance", "--sae", run, "--tokens", "512"], capsys, prog="analyze"), damage)


def _flip(path: Path, offset: int, mask: int = 0x01) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= mask
    path.write_bytes(bytes(data))


def _redirect_index_entry(cache: Path) -> None:
    """Inner chunk 0 of a shard points at chunk 1's bytes, the index crc32c recomputed to match."""
    import google_crc32c

    f = next((cache / "acts").rglob("c/0/1/0"))
    data = bytearray(f.read_bytes())
    n_inner = 4  # shard_tokens / chunk_tokens of `train_cache`
    index = np.frombuffer(bytes(data[-(16 * n_inner + 4) : -4]), "<u8").reshape(n_inner, 2).copy()
    index[0] = index[1]
    raw = index.astype("<u8").tobytes()
    data[-(16 * n_inner + 4) :] = raw + np.uint32(google_crc32c.value(raw)).tobytes()
    f.write_bytes(bytes(data))


CORRUPTIONS = {
    "mantissa flip": lambda c: _flip(c / "acts/c/1/0/0", 100),
    "redirected index entry": _redirect_index_entry,
    "token array byte": lambda c: _flip(c / "keep/c/1", 3),
    "deleted windows chunk": lambda c: (c / "windows/c/0/0").unlink(),
    "flipped windows chunk": lambda c: _flip(c / "windows/c/0/0", 7),
    "edited zarr.json attributes": lambda c: _edit_attributes(c, lambda a: a["layout"].update(layers=[0, 1, 5])),
    "invalid manifest json": lambda c: (c / "manifest/block-000001.json").write_text('{"block": 1, "files": '),
}


@pytest.mark.parametrize("kind", list(CORRUPTIONS))
def test_each_corruption_is_caught_by_verify_and_refused_by_training(kind, train_cache, tmp_path, capsys):
    """The whole list of issue 13, end to end through the CLIs (tests/test_integrity.py checks the reader
    and verify's wording of each, and the compressed byte flip)."""
    import shutil

    cache = shutil.copytree(train_cache, tmp_path / "cache")
    CORRUPTIONS[kind](cache)
    code, _, err = run_cli(["verify", cache], capsys)
    assert code != 0 and "Traceback" not in err
    out = tmp_path / "run"
    args = ["run", "--quiet", "--cache", cache, "--out", out, *flags(**TRAIN, tokens=512 * 8)]
    line = one_line_error(run_cli(args, capsys, prog="train"))
    assert "harvest verify" in line or "re-harvest" in line or "restore" in line, line
    assert not (out / "sae.safetensors").exists()


def test_two_concurrent_train_runs_on_one_out(train_cache, tmp_path, capsys):
    """The second is refused with the holder named; the folder then holds exactly the first run's result."""
    from safetensors.torch import load_file

    out, ref = tmp_path / "run", tmp_path / "ref"
    first = [sys.executable, "-m", "train", "run", "--quiet", "--cache", str(train_cache), "--out", str(out)]
    first += flags(**TRAIN, tokens=512 * 300)
    proc = subprocess.Popen(first, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 180
        while time.time() < deadline and proc.poll() is None and not (out / "metrics.jsonl").is_file():
            time.sleep(0.05)
        second = ["run", "--quiet", "--cache", train_cache, "--out", out, *flags(**{**TRAIN, "k": 3}, tokens=512)]
        one_line_error(run_cli(second, capsys, prog="train"), "in use by", f"pid {proc.pid}")
        assert proc.wait(timeout=600) == 0, proc.stderr.read()[-2000:]
    finally:
        proc.kill()
    alone = ["run", "--quiet", "--cache", train_cache, "--out", ref, *flags(**TRAIN, tokens=512 * 300)]
    assert run_cli(alone, capsys, prog="train")[0] == 0
    mine, single = load_file(str(out / "sae.safetensors")), load_file(str(ref / "sae.safetensors"))
    assert all(torch.equal(mine[k], single[k]) for k in single)


# ---------------------------------------------------------------------------------------------
# full disk


@pytest.fixture
def tiny_disk(tmp_path):
    with tmpfs(tmp_path / "mnt", "size=16k") as mnt:
        yield mnt


def test_full_disk_during_a_lens_checkpoint_is_one_line_and_leaves_no_temp_file(tiny_disk, neox_dir, text_dir, capsys):
    out = tiny_disk / "lens"
    args = lens_args(neox_dir, text_dir, out, "--checkpoint-every", "2")
    one_line_error(run_cli(args, capsys), "disk full", "rerun the same command")
    work = tiny_disk / ".lens.tmp"
    assert not out.exists() and [p.name for p in work.iterdir()] == [".mlsae-lens-work"]


# ---------------------------------------------------------------------------------------------
# Ctrl-C: the line, exit 130, and the work resumes


def _interrupt_when(cmd: list[str], ready, timeout: float = 180) -> subprocess.CompletedProcess:
    """Start `cmd`, send SIGINT (what Ctrl-C sends) once ready(stdout so far) is true, return the result."""
    proc = subprocess.Popen(cmd, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    seen, deadline = b"", time.time() + timeout
    os.set_blocking(proc.stdout.fileno(), False)
    while time.time() < deadline and proc.poll() is None and not ready(seen.decode(errors="replace")):
        try:
            seen += os.read(proc.stdout.fileno(), 1 << 16)
        except BlockingIOError:
            pass
        time.sleep(0.05)
    assert proc.poll() is None, f"ended before it could be interrupted: {proc.stderr.read().decode()[-1000:]}"
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    return subprocess.CompletedProcess(cmd, proc.returncode, seen.decode(errors="replace"), err.decode())


def assert_interrupted(done: subprocess.CompletedProcess, line: str) -> None:
    assert done.returncode == 130, done.stderr[-2000:]
    assert "Traceback" not in done.stderr and line in done.stderr.splitlines(), done.stderr[-2000:]


def test_ctrl_c_during_a_harvest_prints_the_line_and_the_rerun_finishes(neox_dir, tmp_path):
    out = tmp_path / "c"
    spec = dict(context=16, tokens=16 * 1000, chunk_tokens=32, shard_tokens=64, shuffle_tokens=128, batch_size=4)
    cmd = [
        sys.executable,
        "-m",
        "harvest",
        "run",
        "--quiet",
        "--model",
        str(neox_dir),
        "--dataset",
        "sotu",
        "--out",
        str(out),
        *flags(**spec),
    ]
    done = _interrupt_when(
        cmd, lambda _: len(list((out / "manifest").glob("block-*.json"))) >= 2 if (out / "manifest").is_dir() else False
    )
    assert_interrupted(done, "interrupted: rerun the same command to resume")
    assert 0 < len(open_cache(out).complete_blocks()) < open_cache(out).layout.n_blocks
    again = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-2000:]
    assert open_cache(out).complete


def test_ctrl_c_during_training_prints_the_line(train_cache, tmp_path):
    out = tmp_path / "run"
    cmd = [
        sys.executable,
        "-m",
        "train",
        "run",
        "--quiet",
        "--cache",
        str(train_cache),
        "--out",
        str(out),
        *flags(**TRAIN, tokens=512 * 100_000),
    ]
    done = _interrupt_when(cmd, lambda _: (out / "metrics.jsonl").is_file())
    assert_interrupted(done, "interrupted: rerun the same command to resume from the last checkpoint")
    assert not (out / "summary.json").exists()


def test_ctrl_c_during_an_analysis_prints_the_line(trained_run, tmp_path):
    cmd = [
        sys.executable,
        "-m",
        "analyze",
        "report",
        "--sae",
        str(trained_run),
        "--out",
        str(tmp_path / "rep"),
        "--device",
        "cpu",
    ]
    done = _interrupt_when(cmd, lambda seen: "variance" in seen)
    assert_interrupted(done, "interrupted: rerun the same command to start the analysis again")
    assert not (tmp_path / "rep" / "report.html").exists()


# ---------------------------------------------------------------------------------------------
# round 2 (issue 18): outputs, settings, locks, numeric flags, sizes, run folders bound to their weights


def _assert_clean(err: str) -> None:
    assert "Traceback" not in err and "panicked" not in err and "\x1b" not in err, err[-2000:]


def _victim(tmp_path: Path, name: str = "victim") -> Path:
    victim = tmp_path / name
    victim.write_text("precious")
    return victim


def test_train_run_never_appends_to_a_planted_metrics_link(train_cache, tmp_path, capsys):
    """Fresh: a folder holding only the planted link is not a run (refused); resumed: the link is refused
    in one line, its target untouched either way."""
    victim = _victim(tmp_path)
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").symlink_to(victim)
    args = ["run", "--quiet", "--cache", train_cache, "--out", out, *flags(**TRAIN, tokens=512 * 2)]
    one_line_error(run_cli(args, capsys, prog="train"), str(out))
    (out / "metrics.jsonl").unlink()
    assert run_cli(args, capsys, prog="train")[0] == 0
    (out / "summary.json").unlink()  # unfinished: the next command resumes and appends to metrics.jsonl
    (out / "metrics.jsonl").unlink()
    (out / "metrics.jsonl").symlink_to(victim)
    one_line_error(run_cli(args, capsys, prog="train"), "metrics.jsonl", "symbolic link", "remove the link")
    assert victim.read_text() == "precious"


def test_analysis_outputs_replace_planted_links_and_never_write_through_them(trained_run, tmp_path, capsys):
    """CSVs, the PNG and the JSON of `analyze reconstruction`: each planted link is replaced by the real
    file (the rename replaces the link itself), every target stays as it was."""
    out = tmp_path / "out"
    out.mkdir()
    names = ["fvu_matrix.csv", "fvu_feature_matrix.csv", "reconstruction.png", "reconstruction.json"]
    victims = {n: _victim(tmp_path, f"victim-{n}") for n in names}
    for n in names:
        (out / n).symlink_to(victims[n])
    code, _, err = run_cli(["reconstruction", "--sae", trained_run, "--out", out, "--tokens", "256"], capsys, "analyze")
    assert code == 0, err
    _assert_clean(err)
    for n in names:
        assert not (out / n).is_symlink() and (out / n).stat().st_size > 0, n
        assert victims[n].read_text() == "precious", n
    assert (out / "reconstruction.png").read_bytes()[:4] == b"\x89PNG"


def test_open_log_refuses_links_and_files_of_other_kinds(tmp_path):
    from harvest.atomic import open_log
    from harvest.errors import StorageError

    victim = _victim(tmp_path)
    (tmp_path / "link").symlink_to(victim)
    with pytest.raises(StorageError, match="symbolic link"):
        open_log(tmp_path / "link", fresh=False)
    (tmp_path / "folder").mkdir()
    with pytest.raises((StorageError, OSError)):
        open_log(tmp_path / "folder", fresh=False)
    os.link(victim, tmp_path / "hard")
    with pytest.raises(StorageError, match="one name"):
        open_log(tmp_path / "hard", fresh=False)
    with open_log(tmp_path / "link", fresh=True) as f:  # a fresh log replaces the link, never its target
        f.write("x\n")
    assert victim.read_text() == "precious" and (tmp_path / "link").read_text() == "x\n"


@pytest.mark.parametrize("value", ["abc", "nan", "0", "-5", "inf", "1e9"])
def test_bad_lock_lease_setting_is_one_line_naming_it(value, train_cache, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("MLSAE_LOCK_LEASE_SECONDS", value)
    args = ["run", "--quiet", "--cache", train_cache, "--out", tmp_path / "r", *flags(**TRAIN, tokens=512)]
    line = one_line_error(run_cli(args, capsys, prog="train"), "MLSAE_LOCK_LEASE_SECONDS", "from 1 to 604800")
    assert repr(value) in line and not (tmp_path / "r" / "config.json").exists()


@pytest.mark.parametrize(
    "name", ["MLSAE_LOCK_LEASE_SECONDS", "MLSAE_READ_REQUESTS", "MLSAE_STORE_RETRIES", "MLSAE_LOCAL_CACHE_GB"]
)
def test_bad_settings_never_crash_at_import(name):
    code = "import harvest, harvest.lock, harvest.reader, harvest.store, train.loop, analyze.cli; print('ok')"
    done = subprocess.run(
        [sys.executable, "-c", code], env={**env(), name: "abc"}, capture_output=True, text=True,
        cwd=Path(__file__).parents[1],
    )  # fmt: skip
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]


@pytest.mark.parametrize(
    "name, value, fragment",
    [
        ("MLSAE_READ_REQUESTS", "0", "from 1 to 1024"),
        ("MLSAE_STORE_RETRIES", "abc", "from 0 to 100"),
        ("MLSAE_STORE_RETRY_SECONDS", "nan", "from 0.1 to 86400"),
        ("MLSAE_LOCAL_CACHE_GB", "-1", "GB"),
    ],
)
def test_bad_store_settings_name_the_variable_not_the_url(name, value, fragment, monkeypatch):
    from harvest.reader import read_requests
    from harvest.settings import SettingError
    from harvest.store import ObjectStore, ReadThroughStore, open_store

    monkeypatch.setenv(name, value)
    with pytest.raises(SettingError) as e:
        if name == "MLSAE_READ_REQUESTS":
            read_requests()
        elif name == "MLSAE_LOCAL_CACHE_GB":
            ReadThroughStore(open_store("/tmp"), "/tmp/nowhere", lambda k: None, lambda k, data: None)
        else:
            ObjectStore("s3://some-bucket/x")
    msg = str(e.value)
    assert msg.startswith(f"{name}={value!r}") and fragment in msg and "URL" not in msg and "\n" not in msg


LOCK_DAMAGE = {
    "pid a string": ({"pid": "abc"}, "'pid' is \"abc\""),
    "lease_until null": ({"lease_until": None}, "'lease_until' is null"),
    "no pid": ({"pid": None, "_drop": "pid"}, "no 'pid' field"),
    "host a number": ({"host": 7}, "'host' is 7"),
    "negative pid": ({"pid": -4}, "out of range"),
    "not json": (b"{nope", "not JSON"),
    "a list": (b"[1, 2]", "a JSON list"),
}


@pytest.mark.parametrize("kind", list(LOCK_DAMAGE))
def test_malformed_lock_objects_are_one_line_saying_how_to_remove_them(kind, train_cache, tmp_path, capsys):
    from harvest.cache import LOCK_KEY

    out = tmp_path / "r"
    out.mkdir()
    edit, fragment = LOCK_DAMAGE[kind]
    if isinstance(edit, bytes):
        raw = edit
    else:
        body = {"what": "train run", "pid": 1, "host": "elsewhere", "since": "then", "lease_until": time.time() + 60}
        body.update({k: v for k, v in edit.items() if k != "_drop"})
        body.pop(edit.get("_drop", "-"), None)
        raw = json.dumps(body).encode()
    (out / LOCK_KEY).write_bytes(raw)
    args = ["run", "--quiet", "--cache", train_cache, "--out", out, *flags(**TRAIN, tokens=512)]
    line = one_line_error(run_cli(args, capsys, prog="train"), "is not a lock this program wrote", fragment)
    assert f"delete {out / LOCK_KEY}" in line
    assert (out / LOCK_KEY).read_bytes() == raw and not (out / "config.json").exists()


def test_malformed_lock_object_in_a_bucket_is_one_line(bucket):
    from harvest.cache import LOCK_KEY
    from harvest.lock import Lock, LockInvalid
    from harvest.store import open_store

    open_store(bucket + "/place").put(LOCK_KEY, json.dumps({"pid": "abc", "host": "h", "lease_until": None}).encode())
    with pytest.raises(LockInvalid) as e:
        Lock(bucket + "/place", "harvest run").acquire()
    assert f"delete {bucket}/place/{LOCK_KEY}" in str(e.value) and "\n" not in str(e.value)


def test_a_foreign_lock_with_a_far_future_lease_tells_the_truth(train_cache, tmp_path, capsys):
    from harvest.cache import LOCK_KEY

    out = tmp_path / "r"
    out.mkdir()
    until = time.time() + 10 * 365 * 86400
    body = {"what": "train run", "pid": 4242, "host": "elsewhere", "since": "then", "command": "train run --x"}
    (out / LOCK_KEY).write_text(json.dumps({**body, "lease_until": until}))
    args = ["run", "--quiet", "--cache", train_cache, "--out", out, *flags(**TRAIN, tokens=512)]
    line = one_line_error(run_cli(args, capsys, prog="train"), "pid 4242 on elsewhere", "train run --x")
    assert time.strftime("%Y-%m-%d", time.localtime(until)) in line and "within" not in line
    assert f"delete {out / LOCK_KEY}" in line and "deliberately" in line
    (out / LOCK_KEY).unlink()  # the documented way to break it
    assert run_cli(args, capsys, prog="train")[0] == 0


@pytest.mark.parametrize(
    "extra, fragment",
    [
        (["--lr", "inf"], "lr = inf must be a finite number"),
        (["--aux-coef", "nan"], "aux_coef = nan must be a finite number"),
        (["--lr", "0"], "lr = 0.0 must be a positive number"),
        (["--aux-coef", "-1"], "aux_coef = -1.0 must be >= 0"),
        (["--seed", str(2**63)], "seed = 9223372036854775808 is out of range"),
        (["--heldout-seed", "-1"], "heldout_seed = -1 is out of range"),
        (["--dead-tokens", str(10**23)], "dead_tokens = 100000000000000000000000 is out of range"),
    ],
)
def test_numeric_train_flags_out_of_range_are_one_line(extra, fragment, train_cache, tmp_path, capsys):
    out = tmp_path / "r"
    args = ["run", "--quiet", "--cache", train_cache, "--out", out, *flags(**TRAIN, tokens=512), *extra]
    one_line_error(run_cli(args, capsys, prog="train"), fragment)
    assert not out.exists()


def test_harvest_seed_range_matches_trains(neox_dir, text_dir, tmp_path, capsys):
    out = tmp_path / "c"
    one_line_error(run_cli(run_args(neox_dir, text_dir, out, "--seed", str(2**63)), capsys), "0 to 2^63-1")
    assert not out.exists()


def test_an_sae_larger_than_memory_is_refused_before_allocating(train_cache, tmp_path, capsys):
    out = tmp_path / "r"
    args = ["run", "--quiet", "--cache", train_cache, "--out", out, *flags(**{**TRAIN, "expansion_factor": 10**9})]
    line = one_line_error(run_cli(args, capsys, prog="train"), "needs ~", "are available", "lower --expansion-factor")
    assert "TB" in line or "PB" in line or "GB" in line
    assert not out.exists()


def test_examples_top_larger_than_memory_is_refused_before_allocating(trained_run, tmp_path, capsys):
    args = ["examples", "--sae", trained_run, "--top", str(10**12), "--out", tmp_path / "x", "--no-browser"]
    one_line_error(run_cli(args, capsys, "analyze"), "needs ~", "lower --top")
    assert not (tmp_path / "x" / "examples.json").exists()


def _edit_json(path: Path, edit) -> None:
    d = json.loads(path.read_text())
    edit(d)
    path.write_text(json.dumps(d, indent=1))


RUN_EDITS = {
    "bit flip in the weights": lambda r: _flip(r / "sae.safetensors", (r / "sae.safetensors").stat().st_size - 5),
    "k in both JSON files": lambda r: (
        _edit_json(r / "config.json", lambda d: (d["sae"].update(k=3), d["train"].update(k=3))),
        _edit_json(r / "sae_config.json", lambda d: d.update(k=3)),
    ),
    "layers": lambda r: _edit_json(r / "config.json", lambda d: d.update(layers=d["layers"][:-1])),
    "held-out windows": lambda r: _edit_json(r / "config.json", lambda d: d["heldout"]["windows"].pop()),
    "weights swapped with another run's": lambda r: (r / "sae.safetensors").write_bytes(
        (r.parent / "other" / "sae.safetensors").read_bytes()
    ),
}


@pytest.mark.parametrize("kind", list(RUN_EDITS))
def test_run_folder_bound_to_its_weights(kind, trained_run, train_cache, tmp_path, capsys):
    import shutil

    from train.config import TrainConfig
    from train.loop import train

    run = shutil.copytree(trained_run, tmp_path / "run")
    if "another run" in kind:
        other = dict(TRAIN, seed=1)
        train([TrainConfig(cache=str(train_cache), out=str(tmp_path / "other"), tokens=512 * 4, **other)], False)
        capsys.readouterr()
    RUN_EDITS[kind](run)
    line = one_line_error(run_cli(["variance", "--sae", run, "--tokens", "256"], capsys, "analyze"), str(run))
    assert "restore" in line and "retrain" in line, line
    one_line_error(run_cli(["export", run, "--format", "saelens", "--out", tmp_path / "e"], capsys, "train"))
    assert not (tmp_path / "e").exists()


def test_run_folders_of_the_previous_format_still_load_with_a_warning(trained_run, tmp_path, capsys):
    import shutil

    run = shutil.copytree(trained_run, tmp_path / "run")
    _edit_json(run / "config.json", lambda d: (d.update(format_version=2), d.pop("weights_sha256")))
    code, _, err = run_cli(["variance", "--sae", run, "--tokens", "256"], capsys, "analyze")
    assert code == 0, err
    warnings = [l for l in err.splitlines() if l.startswith("warning:")]
    assert warnings and "format 2" in warnings[0] and "not checked" in warnings[0]


def test_resume_refuses_a_checkpoint_of_an_edited_record(train_cache, tmp_path, capsys):
    out = tmp_path / "run"
    args = ["run", "--quiet", "--cache", train_cache, "--out", out, *flags(**TRAIN, tokens=512 * 2)]
    assert run_cli(args, capsys, prog="train")[0] == 0
    (out / "summary.json").unlink()
    _edit_json(out / "config.json", lambda d: (d["sae"].update(k=3), d["train"].update(k=3)))
    # the flags agree with the edited record (same hyperparameters); the checkpoint, trained with k=4, does not
    args = ["run", "--quiet", "--cache", train_cache, "--out", out, *flags(**{**TRAIN, "k": 3}, tokens=512 * 2)]
    one_line_error(run_cli(args, capsys, prog="train"), "checkpoint.pt", "sae, train differ")


def test_pickled_model_weights_are_one_line_without_escape_codes(neox_dir, text_dir, tmp_path, capsys):
    from safetensors.torch import load_file

    model = copy_model(neox_dir, tmp_path / "model")
    tensors = load_file(str(model / "model.safetensors"))
    (model / "model.safetensors").unlink()
    torch.save({**tensors, "x": Planted(tmp_path / "pwned")}, model / "pytorch_model.bin")
    code, out, err = run_cli(run_args(model, text_dir, tmp_path / "c"), capsys)
    line = one_line_error((code, out, err), "cannot load the weights", "could run code", "model.safetensors")
    _assert_clean(err)
    assert "TransformerLens" not in line and not (tmp_path / "pwned").exists()


def test_escape_codes_never_reach_the_terminal():
    from harvest.errors import one_line

    assert one_line("\x1b[1m\x1b[31mbad\x1b[0m thing\nmore\x07") == "bad thing more"


def test_plain_http_endpoint_without_allow_http_says_so(bucket, monkeypatch):
    from harvest.errors import StoreError
    from harvest.store import open_store

    monkeypatch.delenv("AWS_ALLOW_HTTP")
    with pytest.raises(StoreError) as e:
        open_store(bucket + "/x").get("zarr.json")
    msg = str(e.value)
    assert "AWS_ALLOW_HTTP=true" in msg and "rerun" not in msg and "\n" not in msg


def test_byte_counts_are_shown_in_readable_units():
    from harvest.errors import human_bytes

    assert [human_bytes(n) for n in (10, 12_300, 4.56e9, 3e13)] == ["10 B", "12.3 kB", "4.56 GB", "30 TB"]
