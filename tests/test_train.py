"""Training from a cache: data stream, learning, exact resume after kill -9, sweeps, DDP, bad input."""

from __future__ import annotations

import csv
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from harvest import open_cache
from harvest.run import harvest
from harvest.spec import CacheSpec
from train import load_sae
from train.config import TrainConfig
from train.data import MinibatchStream
from train.evaluate import evaluate
from train.loop import train
from train.objectives import FIRE_THRESHOLD
from train.record import load_run
from train.sae import SaeConfig, TopKSae
from train.split import choose_heldout

CACHE = dict(context=32, tokens=32 * 512, chunk_tokens=256, shard_tokens=1024, shuffle_tokens=4096, batch_size=8)
FAST = dict(expansion_factor=4, k=4, batch_tokens=512, eval_tokens=2048, round_chunks=6, lr=3e-3, log_every=5)


@pytest.fixture(scope="module")
def tcache(neox_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tcache") / "cache"
    harvest(CacheSpec(model=str(neox_dir), dataset="sotu", out=str(out), **CACHE), show_progress=False)
    return out


def cfg(tcache: Path, out: Path, **kw) -> TrainConfig:
    return TrainConfig(cache=str(tcache), out=str(out), **{**FAST, **kw})


def weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "sae.safetensors"))


def test_stream_covers_every_kept_training_token_once_per_epoch_with_diverse_batches(tcache):
    cache = open_cache(tcache)
    held = choose_heldout(cache, 2048, seed=0)
    assert len(held.windows) == 2048 // 32 and held.n_tokens == 2048
    keep, seq_all = cache.read_tokens("keep").numpy(), cache.read_tokens("seq").numpy()
    is_held = np.isin(seq_all, held.windows + held.excluded_windows)  # held out, or a guard
    expected = sorted(np.flatnonzero(keep & ~is_held).tolist())
    chunks = cache.complete_chunks()
    stream = MinibatchStream(cache, chunks, [0, 2], 500, round_chunks=5, device="cpu", seed=1, heldout=held)
    seen, seqs = [], []
    for batch in stream:
        assert batch.acts.shape == (2, 500, 32)
        seen += batch.positions.tolist()
        seqs.append(len(set(seq_all[batch.positions.numpy()])))
        if stream.state.epoch == 1:
            break
    first_epoch = seen[: len(expected) - len(expected) % 500]
    assert len(set(first_epoch)) == len(first_epoch)  # no token twice within an epoch
    assert set(first_epoch) <= set(expected)
    assert len(set(expected) - set(first_epoch)) < 500  # at most the last partial batch is carried over
    assert min(seqs) > 100  # a 500-token batch draws on far more than a handful of the 512 sequences
    batch = next(iter(MinibatchStream(cache, chunks, [0, 2], 500, 5, "cpu", seed=1, heldout=held)))
    pos = batch.positions[:7]
    for i, layer in enumerate([0, 2]):  # the vectors are the cache's vectors at those positions
        want = torch.stack([cache.read(layer, p, p + 1)[0] for p in pos.tolist()])
        assert torch.equal(batch.acts[i, :7], want)


def test_training_lowers_held_out_fvu_and_reported_fvu_recomputes(tcache, tmp_path):
    out = tmp_path / "run"
    [s] = train([cfg(tcache, out, tokens=512 * 120)], show_progress=False)
    assert s["held_out"]["fvu_mean"] < 0.6 * s["held_out_initial"]["fvu_mean"]
    assert all(l0 <= 4 for l0 in s["held_out"]["l0"])
    record = load_run(out)
    assert record.cache.fingerprint == open_cache(tcache).fingerprint and record.layers == [0, 1, 2]
    sae = load_sae(out)
    again = evaluate(sae, open_cache(tcache), record.heldout, record.layers, "cpu")
    assert again.fvu == pytest.approx(s["held_out"]["fvu"], rel=1e-6)
    assert again.fvu_feature == pytest.approx(s["held_out"]["fvu_feature"], rel=1e-6)
    lines = [l for l in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in l]
    assert lines[0]["step"] == 0 and lines[-1]["step"] == 119 and lines[-1]["loss"] < lines[0]["loss"]
    x = torch.randn(2, 3, 32)  # any leading shape
    assert sae.decode(*sae.encode(x)).shape == (2, 3, 32)
    # the decoder rows stayed unit norm through training
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(sae.cfg.n_latents))


def test_per_layer_dead_fraction_l0_and_firing_density_equal_a_brute_force_count(tcache):
    """A wide random SAE leaves many latents silent on 1,024 held-out tokens, differently per layer."""
    cache = open_cache(tcache)
    held = choose_heldout(cache, 1024, seed=3)
    n_latents = 2048
    sae = TopKSae(SaeConfig(d_model=32, n_latents=n_latents, k=4), generator=torch.Generator().manual_seed(0))
    res = evaluate(sae, cache, held, [0, 2], "cpu")
    seq, keep = cache.read_tokens("seq").numpy(), cache.read_tokens("keep").numpy()
    pos = torch.from_numpy(np.flatnonzero(keep & np.isin(seq, held.windows)))
    assert res.tokens == len(pos) and res.layers == [0, 2]
    fired_any = set()
    for i, layer in enumerate([0, 2]):
        values, indices = sae.encode(cache.read(layer)[pos].float())
        active = values > FIRE_THRESHOLD
        fired = set(indices[active].tolist())
        fired_any |= fired
        assert res.silent_on_heldout[i] == pytest.approx(1 - len(fired) / n_latents, abs=1e-12)
        assert res.l0[i] == pytest.approx(active.sum(1).double().mean().item(), rel=1e-9)
        per_latent = torch.bincount(indices[active], minlength=n_latents).double() / len(pos)
        assert res.firing_density[i] == pytest.approx(per_latent.mean().item(), rel=1e-9)
    assert res.silent_on_heldout_all_layers == pytest.approx(1 - len(fired_any) / n_latents, abs=1e-12)
    assert min(res.silent_on_heldout) > 0 and res.silent_on_heldout_all_layers < min(res.silent_on_heldout)
    assert res.silent_on_heldout[0] != res.silent_on_heldout[1]


def test_periodic_held_out_evaluation_writes_the_curve(tcache, tmp_path):
    out = tmp_path / "curve"
    [s] = train(
        [cfg(tcache, out, tokens=512 * 12, eval_every=5, snapshot_tokens="1536,5120,1600")], show_progress=False
    )
    lines = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [l for l in lines if "held_out" in l]
    assert [l["tokens"] for l in evals] == [0, 3 * 512, 5 * 512, 10 * 512, 12 * 512]
    # snapshots (1600 tokens rounds down to step 3 as 1536 does): loadable run folders of the SAE at that step
    assert sorted(p.name for p in (out / "snapshots").iterdir()) == ["tokens-000001536", "tokens-000005120"]
    snap = load_run(out / "snapshots" / "tokens-000001536")
    assert snap.steps == 3 and snap.heldout == load_run(out).heldout
    assert snap.summary()["held_out"] == evals[1]["held_out"]
    again = evaluate(snap.load_sae(), open_cache(tcache), snap.heldout, snap.layers, "cpu")
    assert again.fvu_mean == pytest.approx(evals[1]["held_out"]["fvu_mean"], rel=1e-6) != s["held_out"]["fvu_mean"]
    assert evals[0]["held_out"] == s["held_out_initial"] and evals[-1]["held_out"] == s["held_out"]
    assert evals[1]["held_out"]["fvu_mean"] < evals[0]["held_out"]["fvu_mean"]
    summary = json.loads((out / "summary.json").read_text())
    assert len(summary["held_out"]["silent_on_heldout"]) == 3 and summary["held_out"]["firing_density"][0] > 0
    with open(out / "heldout.csv") as f:
        table = list(csv.reader(f))
    assert table[0] == ["tokens", "fvu_mean", "fvu_feature_mean", "fvu_layer_0", "fvu_layer_1", "fvu_layer_2"]
    assert [int(r[0]) for r in table[1:]] == [0, 1536, 2560, 5120, 6144]
    assert float(table[-1][1]) == pytest.approx(s["held_out"]["fvu_mean"], rel=1e-5)
    assert (out / "heldout.png").stat().st_size > 1000


def test_non_finite_held_out_vectors_are_refused_in_one_line(tcache, monkeypatch):
    from harvest.errors import CacheError
    from harvest.reader import ChunkReader

    cache = open_cache(tcache)
    held = choose_heldout(cache, 1024, seed=0)
    sae = TopKSae(SaeConfig(d_model=32, n_latents=64, k=4))
    real = ChunkReader.iter_chunks

    def nan_in_layer_1(self, order):  # what a model that overflowed would have stored
        for chunk in real(self, order):
            chunk.acts[1, :, 0] = float("nan")
            yield chunk

    monkeypatch.setattr(ChunkReader, "iter_chunks", nan_in_layer_1)
    with pytest.raises(CacheError) as e:
        evaluate(sae, cache, held, [0, 1, 2], "cpu")
    assert "\n" not in str(e.value) and "layer 1" in str(e.value) and "not finite" in str(e.value)


def test_single_layer_sae_and_sweep_in_one_pass_equal_separate_runs(tcache, tmp_path):
    common = dict(tokens=512 * 20)
    [a] = train([cfg(tcache, tmp_path / "a", layers="1", **common)], show_progress=False)
    [_b] = train([cfg(tcache, tmp_path / "b", k=8, **common)], show_progress=False)
    sweep = train(
        [cfg(tcache, tmp_path / "sa", layers="1", **common), cfg(tcache, tmp_path / "sb", k=8, **common)],
        show_progress=False,
    )
    assert [s["layers"] for s in sweep] == [[1], [0, 1, 2]]
    for single, swept in [("a", "sa"), ("b", "sb")]:
        w1, w2 = weights(tmp_path / single), weights(tmp_path / swept)
        for name in w1:
            assert torch.equal(w1[name], w2[name]), name
    assert a["held_out"]["layers"] == [1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cli(tcache: Path, out: Path, **kw) -> list[str]:
    args = ["run", "--quiet", "--cache", str(tcache), "--out", str(out)]
    for k, v in {**FAST, **kw}.items():
        args += [f"--{k.replace('_', '-')}", str(v)]
    return args


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def test_kill_9_then_resume_equals_the_uninterrupted_run(tcache, tmp_path):
    kw = dict(tokens=512 * 80, checkpoint_every=4, expansion_factor=16, dead_tokens=1024)  # AuxK active
    ref = tmp_path / "ref"
    subprocess.run([sys.executable, "-m", "train", *_cli(tcache, ref, **kw)], env=_env(), check=True, timeout=300)
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "train", *_cli(tcache, out, **kw)]
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if (out / "checkpoint.pt").exists() and torch.load(out / "checkpoint.pt", weights_only=False)["step"] >= 20:
            break
        time.sleep(0.05)
    assert proc.poll() is None, proc.stderr.read().decode()[-800:]
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "summary.json").exists()
    done = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "resuming at step" in done.stdout + done.stderr
    w_ref, w = weights(ref), weights(out)
    for name in w_ref:
        assert torch.equal(w_ref[name], w[name]), name
    lines = [l for l in map(json.loads, (ref / "metrics.jsonl").read_text().splitlines()) if "loss" in l]
    assert max(l["auxk"] for l in lines) > 0, "the test should exercise AuxK (dead latents)"


def test_two_ranks_under_torchrun_finish(tcache, tmp_path):
    out = tmp_path / "ddp"
    torchrun = Path(sys.executable).parent / "torchrun"
    cmd = [
        str(torchrun),
        "--nproc-per-node",
        "2",
        "--master-port",
        str(_free_port()),
        "-m",
        "train",
        *_cli(tcache, out, tokens=512 * 30, checkpoint_every=7),
    ]
    done = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    s = json.loads((out / "summary.json").read_text())
    assert s["steps"] == 30 and s["held_out"]["fvu_mean"] < s["held_out_initial"]["fvu_mean"]
    assert load_run(out).world_size == 2
    assert torch.load(out / "checkpoint.pt", weights_only=False)["step"] == 30


def _run_cli(argv, capsys):
    from train.cli import main

    old, sys.argv = sys.argv, ["train", *map(str, argv)]
    try:
        main()
        code = 0
    except SystemExit as e:
        code = e.code
    finally:
        sys.argv = old
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _one_line_error(result, *fragments):
    code, _out, err = result
    assert code == 2 and "Traceback" not in err, err
    lines = [l for l in err.splitlines() if l.startswith("error:")]
    assert len(lines) == 1, err
    for f in fragments:
        assert f in lines[0], lines[0]


def test_bad_input_gives_one_line_errors(tcache, tmp_path, capsys):
    out = tmp_path / "r"
    _one_line_error(_run_cli(_cli(tmp_path / "nope", out), capsys), "not a cache")
    _one_line_error(_run_cli(_cli(tcache, out, layers=7), capsys), "layer 7 is not in the cache")
    _one_line_error(_run_cli(_cli(tcache, out, k=200), capsys), "k must be")
    assert _run_cli(_cli(tcache, out, tokens=512 * 3), capsys)[0] == 0
    _one_line_error(
        _run_cli(_cli(tcache, out, tokens=512 * 3, lr=0.5, k=3), capsys),
        "other settings",
        "k: 4 -> 3",
        "lr: 0.003 -> 0.5",
    )
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    _one_line_error(_run_cli(_cli(tcache, other), capsys), "holds no training run")
    # an incomplete cache
    bad = tmp_path / "incomplete"
    import shutil

    shutil.copytree(tcache, bad)
    (bad / "manifest" / "block-000001.json").unlink()
    _one_line_error(_run_cli(_cli(bad, tmp_path / "r2"), capsys), "incomplete", "harvest run")


def test_nan_loss_stops_with_a_clear_error_and_keeps_the_last_checkpoint(tcache, tmp_path, capsys, monkeypatch):
    import train.loop

    out = tmp_path / "nan"
    real = train.loop.training_loss
    calls = {"n": 0}

    def poisoned(x, o, aux_coef, layer_dim=0):
        calls["n"] += 1
        parts = real(x, o, aux_coef, layer_dim)
        if calls["n"] == 7:  # the 7th step's loss is NaN
            return parts._replace(loss=parts.loss * float("nan"))
        return parts

    monkeypatch.setattr(train.loop, "training_loss", poisoned)
    _one_line_error(
        _run_cli(_cli(tcache, out, tokens=512 * 20, checkpoint_every=5), capsys),
        "loss became nan",
        "step 6",
        "lower --lr",
    )
    assert torch.load(out / "checkpoint.pt", weights_only=True)["step"] == 5
    assert not (out / "summary.json").exists()
    # before the first checkpoint, the message does not name one
    calls["n"] = 0
    _one_line_error(
        _run_cli(_cli(tcache, tmp_path / "nan2", tokens=512 * 20, checkpoint_every=50), capsys),
        "loss became nan",
        "no checkpoint was written yet",
    )


class _Evil:
    """Unpickling this runs code: it creates the file named by `marker`."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def _interrupted_run(tcache: Path, out: Path, capsys) -> None:
    """A run folder as a kill leaves it: config.json, metrics, checkpoint.pt; no weights, no summary."""
    assert _run_cli(_cli(tcache, out, tokens=512 * 4, checkpoint_every=2), capsys)[0] == 0
    for name in ("summary.json", "sae.safetensors", "sae_config.json"):
        (out / name).unlink()


def test_checkpoints_hold_plain_data_and_a_planted_pickle_never_runs(tcache, tmp_path, capsys):
    out = tmp_path / "run"
    _interrupted_run(tcache, out, capsys)
    ck = torch.load(out / "checkpoint.pt", weights_only=True)  # tensors and plain containers only
    assert ck["step"] == 4 and set(ck) == {"step", "sae", "opt", "dead", "stream", "fvu_initial", "run"}
    assert ck["run"] == load_run(out, require_sae=False).binding()  # bound to the record it was trained under
    marker = tmp_path / "pwned"
    torch.save({"step": 2, "sae": _Evil(marker)}, out / "checkpoint.pt")
    _one_line_error(_run_cli(_cli(tcache, out, tokens=512 * 4, checkpoint_every=2), capsys), "checkpoint.pt", "delete")
    assert not marker.exists()
    for junk in (b"", b"not a checkpoint", b"PK\x03\x04" + b"\x00" * 64):
        (out / "checkpoint.pt").write_bytes(junk)
        _one_line_error(_run_cli(_cli(tcache, out, tokens=512 * 4, checkpoint_every=2), capsys), "checkpoint.pt")
    (out / "checkpoint.pt").unlink()  # deleted as advised: the run starts again and finishes
    assert _run_cli(_cli(tcache, out, tokens=512 * 4, checkpoint_every=2), capsys)[0] == 0


def test_a_failed_checkpoint_write_leaves_no_temporary_file_and_the_old_checkpoint(
    tcache, tmp_path, capsys, monkeypatch
):
    out = tmp_path / "run"
    real_save, calls = torch.save, {"n": 0}

    def disk_full_on_second_checkpoint(obj, path, *a, **kw):
        calls["n"] += 1
        if calls["n"] == 1:
            return real_save(obj, path, *a, **kw)
        Path(path).write_bytes(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full_on_second_checkpoint)
    _one_line_error(
        _run_cli(_cli(tcache, out, tokens=512 * 6, checkpoint_every=2), capsys), "could not write", "No space", "rerun"
    )
    assert torch.load(out / "checkpoint.pt", weights_only=True)["step"] == 2  # the previous one, intact
    assert [p.name for p in out.iterdir() if p.name.startswith(".") and "lock" not in p.name] == []
    monkeypatch.setattr(torch, "save", real_save)  # space freed: the same command resumes and finishes
    assert _run_cli(_cli(tcache, out, tokens=512 * 6, checkpoint_every=2), capsys)[0] == 0


def test_bad_run_folders_and_out_paths_are_one_line(tcache, tmp_path, capsys):
    out = tmp_path / "run"
    _interrupted_run(tcache, out, capsys)
    good = (out / "config.json").read_text()
    for text, fragment in [("{oops", "not valid JSON"), ('{"format_version": 2}', "lacks")]:
        (out / "config.json").write_text(text)
        _one_line_error(_run_cli(_cli(tcache, out, tokens=512 * 4), capsys), "config.json", fragment)
    (out / "config.json").write_text(good)
    afile = tmp_path / "afile"
    afile.write_text("x")
    _one_line_error(_run_cli(_cli(tcache, afile), capsys), "is a file")
    _one_line_error(_run_cli(_cli(tcache, afile / "run"), capsys), "afile")


def test_two_trainings_on_one_folder_one_is_refused_naming_the_holder(tcache, tmp_path, capsys):
    from harvest.lock import exclusive

    out = tmp_path / "run"
    with exclusive(out, "train run"):  # another `train run` holds the folder
        _one_line_error(_run_cli(_cli(tcache, out, tokens=512 * 2), capsys), "in use by", f"pid {os.getpid()}")
    assert _run_cli(_cli(tcache, out, tokens=512 * 2), capsys)[0] == 0  # released: it runs


def test_train_config_yaml_names_every_field():
    from train.config import config_fields

    root = Path(__file__).parent.parent
    text = (root / "train_config.yaml").read_text()
    loaded = TrainConfig.from_yaml(root / "train_config.yaml")
    for f in config_fields():
        assert f"\n{f.name}:" in text, f"train_config.yaml lacks {f.name}"
    assert loaded.expansion_factor == 8 and loaded.validate()


def test_sweep_cli_makes_one_folder_per_combination(tcache, tmp_path, capsys):
    args = [
        "sweep",
        "--quiet",
        "--cache",
        tcache,
        "--out",
        tmp_path,
        "--expansion-factor",
        "2,4",
        "--layers",
        "all,1",
        "--batch-tokens",
        512,
        "--tokens",
        512 * 4,
        "--eval-tokens",
        2048,
        "-k",
        4,
    ]
    code, _out, err = _run_cli(args, capsys)
    assert code == 0, err
    name = Path(tcache).name
    folders = sorted(p.name for p in tmp_path.iterdir())
    assert folders == sorted(f"{name}-{tag}-x{x}-k4" for x in (2, 4) for tag in ("mlsae", "layer1"))
    for f in folders:
        s = json.loads((tmp_path / f / "summary.json").read_text())
        assert s["steps"] == 4 and s["held_out"]["layers"] == ([1] if "layer1" in f else [0, 1, 2])
