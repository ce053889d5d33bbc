"""Experiment logging: metrics.jsonl always; wandb (offline) and trackio (local) with SAELens key names."""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SAELENS_KEYS = [
    "losses/overall_loss",
    "metrics/explained_variance",
    "metrics/l0",
    "sparsity/dead_features",
    "details/current_learning_rate",
]


def _train_cli(cache: Path, out: Path, env: dict[str, str], *extra: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "train", "run", "--quiet", "--cache", str(cache), "--out", str(out)]
    cmd += ["--expansion-factor", "2", "-k", "4", "--batch-tokens", "128", "--tokens", "640", "--eval-tokens", "256"]
    cmd += ["--log-every", "1", "--eval-every", "2", *extra]
    return subprocess.run(
        cmd, env={**os.environ, "OMP_NUM_THREADS": "1", **env}, capture_output=True, text=True, timeout=300
    )


def test_wandb_offline_gets_the_saelens_keys_and_metrics_jsonl_stays(docs_cache, tmp_path):
    pytest.importorskip("wandb")
    out = tmp_path / "run"
    env = {
        "WANDB_MODE": "offline",
        "WANDB_SILENT": "true",
        "WANDB_DIR": str(tmp_path),
        "WANDB_CONFIG_DIR": str(tmp_path),
    }
    done = _train_cli(docs_cache, out, env, "--log-to", "wandb", "--log-project", "mlsae-test")
    assert done.returncode == 0, done.stderr[-2000:]
    [history] = glob.glob(str(out / "wandb" / "offline-run-*" / "run-*.wandb"))
    raw = Path(history).read_bytes()
    for key in [*SAELENS_KEYS, "heldout/fvu_mean", "metrics/fvu_layer_2"]:
        assert key.encode() in raw, key
    lines = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [l for l in lines if "loss" in l]
    assert [l["step"] for l in steps] == [0, 1, 2, 3, 4] and all("l0" in l and "dead_latents" in l for l in steps)
    assert [l["tokens"] for l in lines if "held_out" in l] == [0, 256, 512, 640]


def test_trackio_logs_locally_under_the_same_names(docs_cache, tmp_path):
    pytest.importorskip("trackio")
    out = tmp_path / "run"
    done = _train_cli(docs_cache, out, {"TRACKIO_DIR": str(tmp_path / "trackio")}, "--log-to", "trackio")
    assert done.returncode == 0, done.stderr[-2000:]
    code = (
        "import json; from trackio.sqlite_storage import SQLiteStorage; "
        "print(json.dumps(SQLiteStorage.get_logs('mlsae-cache', 'run')))"
    )
    read = subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, "TRACKIO_DIR": str(tmp_path / "trackio")},
        capture_output=True,
        text=True,
        timeout=120,
    )
    logs = json.loads(read.stdout.strip().splitlines()[-1])
    steps = [l for l in logs if "losses/overall_loss" in l]
    assert [l["step"] for l in steps] == [0, 1, 2, 3, 4]
    for key in SAELENS_KEYS:
        assert key in steps[-1], key
    assert any("heldout/fvu_mean" in l for l in logs)


def test_a_missing_or_failing_tracker_is_one_line_before_any_work(docs_cache, tmp_path):
    out = tmp_path / "run"
    # no such package: a path entry that shadows wandb with a module that fails to import
    shadow = tmp_path / "shadow"
    shadow.mkdir()
    (shadow / "wandb.py").write_text("raise ImportError('not installed')\n")
    env = {"PYTHONPATH": os.pathsep.join([str(shadow), os.environ.get("PYTHONPATH", "")])}
    done = _train_cli(docs_cache, out, env, "--log-to", "wandb")
    errors = [l for l in done.stderr.splitlines() if l.startswith("error:")]
    assert done.returncode == 2 and "Traceback" not in done.stderr and len(errors) == 1, done.stderr[-2000:]
    assert "pip install wandb" in errors[0]
    assert not (out / "metrics.jsonl").exists() and not (out / "checkpoint.pt").exists()
    # online without credentials and no network: one line that names the offline mode
    env = {"WANDB_MODE": "online", "WANDB_API_KEY": "", "WANDB_DIR": str(tmp_path), "WANDB_CONFIG_DIR": str(tmp_path)}
    env["WANDB_BASE_URL"] = "http://127.0.0.1:9"  # nothing listens there
    env["WANDB_INIT_TIMEOUT"] = "20"
    done = _train_cli(docs_cache, tmp_path / "run2", env, "--log-to", "wandb")
    errors = [l for l in done.stderr.splitlines() if l.startswith("error:")]
    assert done.returncode == 2 and "Traceback" not in done.stderr and len(errors) == 1, done.stderr[-2000:]
    assert "WANDB_MODE=offline" in errors[0]
