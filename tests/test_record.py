"""The run record (config.json): one loader for old and new run folders, one error type, one line each."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from train.config import TrainConfig
from train.record import CacheRef, RunError, RunRecord, load_run, read_record
from train.sae import SaeConfig, TopKSae
from train.split import HeldOut

FIXTURE = Path(__file__).parent / "fixtures" / "run_v1"  # a config.json + summary.json written by the first release


def _old_run(tmp_path: Path) -> Path:
    folder = tmp_path / "old"
    shutil.copytree(FIXTURE, folder)
    TopKSae(SaeConfig(d_model=32, n_latents=128, k=4), generator=torch.Generator().manual_seed(0)).save(folder)
    return folder


def _record(folder: Path, **kw) -> RunRecord:
    base = dict(
        dir=folder,
        train=TrainConfig(cache="c", layers="1", expansion_factor=2, k=3, out=str(folder)),
        sae=SaeConfig(d_model=8, n_latents=16, k=3),
        layers=[1],
        cache=CacheRef("/c", "abc123", "m", "d", "resid_post", None, "bfloat16", 4096),
        heldout=HeldOut("windows", 7, [3, 1, 9], 96, [0, 2]),
        special_tokens="exclude",
        steps=12,
        lr_effective=1e-3,
        world_size=1,
        versions={"torch": "x"},
    )
    return RunRecord(**{**base, **kw})


def test_an_old_run_folder_loads_with_its_chunk_split(tmp_path):
    folder = _old_run(tmp_path)
    rec = load_run(folder)
    assert rec.dir == folder and rec.layers == [0, 1, 2] and rec.label() == "MLSAE" and rec.finished
    assert rec.heldout.method == "legacy-chunks" and rec.heldout.chunks == [6, 7] and rec.heldout.windows == []
    assert "legacy" in rec.heldout.describe()
    assert rec.special_tokens == "cache"  # include_special: false = follow the cache's keep mask
    assert rec.train.expansion_factor == 4 and rec.train.eval_tokens == 256 and rec.steps == 4
    assert rec.sae == SaeConfig(d_model=32, n_latents=128, k=4)
    assert rec.cache.fingerprint == "d2c0f59e8a97a182" and rec.cache.lens["translators"] == {"0": 1, "1": 2, "2": None}
    assert rec.summary()["held_out"]["fvu_mean"] == pytest.approx(0.433545, abs=1e-6)
    assert rec.load_sae().cfg.n_latents == 128
    # every token of a legacy held-out chunk is held out
    assert rec.heldout.mask(torch.tensor([5, 0, 9])).tolist() == [True, True, True]
    # include_special: true meant feeding the real special-token vectors
    cfg = json.loads((folder / "config.json").read_text())
    cfg["train"]["include_special"] = True
    (folder / "config.json").write_text(json.dumps(cfg))
    assert load_run(folder).special_tokens == "include-real"


def test_a_new_record_round_trips_and_masks_by_window(tmp_path):
    rec = _record(tmp_path)
    path = rec.save()
    d = json.loads(path.read_text())
    assert d["format_version"] == 3 and "eval_chunks" not in d and d["heldout"]["windows"] == [1, 3, 9]
    back = read_record(tmp_path)
    assert back.label() == "L1" and not back.finished and not back.has_sae
    assert back.to_json() == rec.to_json()
    assert back.heldout.mask(torch.tensor([0, 1, 2, 3, 9, 10], dtype=torch.int32)).tolist() == [
        False,
        True,
        False,
        True,
        True,
        False,
    ]
    assert read_record(tmp_path / "nothing") is None


def test_guard_windows_are_listed_next_to_the_held_out_windows_and_old_records_load_without_them(tmp_path):
    rec = _record(tmp_path, heldout=HeldOut("documents", 7, [3, 1, 9], 96, [0, 2], [4, 0, 8], "documents"))
    d = json.loads(rec.save().read_text())
    assert d["heldout"]["windows"] == [1, 3, 9] and d["heldout"]["excluded_windows"] == [0, 4, 8]
    back = read_record(tmp_path).heldout
    seq = torch.tensor([0, 1, 2, 3, 4, 8, 9, 10])
    assert back.mask(seq).tolist() == [False, True, False, True, False, False, True, False]  # evaluated
    assert back.training_mask(seq).tolist() == [True, True, False, True, True, True, True, False]  # not trained
    # a format-2 record written before guards existed
    for key in ("excluded_windows", "guards"):
        del d["heldout"][key]
    (tmp_path / "config.json").write_text(json.dumps(d))
    old = read_record(tmp_path).heldout
    assert old.excluded_windows == [] and old.guards == "" and old.training_mask(seq).tolist() == old.mask(seq).tolist()
    assert "NOT document-disjoint" in old.describe()


def _one_line(exc: pytest.ExceptionInfo, *fragments: str) -> None:
    msg = str(exc.value)
    assert "\n" not in msg and isinstance(exc.value, RunError)
    for f in fragments:
        assert f in msg, msg


def test_every_bad_run_folder_is_one_run_error_line(tmp_path):
    with pytest.raises(RunError) as e:
        load_run(tmp_path / "missing")
    _one_line(e, "not a training run", "train run")
    afile = tmp_path / "afile"
    afile.write_text("x")
    with pytest.raises(RunError) as e:
        load_run(afile)
    _one_line(e, "is a file")

    folder = _old_run(tmp_path)
    good = (folder / "config.json").read_text()
    for text, fragment in [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "not a training run's record"),
        (json.dumps({k: v for k, v in json.loads(good).items() if k != "sae"}), "lacks 'sae'"),
        (good.replace('"expansion_factor": 4', '"expansion_factor": "four"'), "expansion_factor"),
        (good.replace('"k": 4,\n  "k_aux"', '"k": 400,\n  "k_aux"'), "invalid"),
    ]:
        (folder / "config.json").write_text(text)
        with pytest.raises(RunError) as e:
            load_run(folder)
        _one_line(e, fragment)
    (folder / "config.json").write_text(good)

    # the SAE files: missing, corrupt, or another run's
    (folder / "sae.safetensors").write_bytes(b"\x00" * 20)
    rec = load_run(folder)
    with pytest.raises(RunError) as e:
        rec.load_sae()
    _one_line(e, "unreadable", "sae.safetensors")
    TopKSae(SaeConfig(d_model=32, n_latents=64, k=4)).save(folder)
    with pytest.raises(RunError) as e:
        load_run(folder).load_sae()
    _one_line(e, "does not match")
    (folder / "sae.safetensors").unlink()
    with pytest.raises(RunError) as e:
        load_run(folder)
    _one_line(e, "not a finished training run")
    assert load_run(folder, require_sae=False).layers == [0, 1, 2]
    (folder / "summary.json").write_text("{")
    with pytest.raises(RunError) as e:
        load_run(folder, require_sae=False).summary()
    _one_line(e, "summary.json")
