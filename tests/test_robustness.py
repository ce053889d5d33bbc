"""kill -9 and resume, two ranks under torchrun: the cache must equal an uninterrupted single-process run."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from helpers import read_all

from harvest import open_cache
from harvest.run import harvest
from harvest.spec import CacheSpec

BIG = dict(context=16, tokens=16 * 640, chunk_tokens=32, shard_tokens=64, shuffle_tokens=128, batch_size=4)


def cli_args(neox_dir: Path, text_dir: Path, out: Path, dtype: str = "bfloat16") -> list[str]:
    args = ["run", "--quiet", "--model", neox_dir, "--dataset", "sotu", "--out", out, "--dtype", dtype]
    for k, v in BIG.items():
        args += [f"--{k.replace('_', '-')}", v]
    return [str(a) for a in args]


def env() -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


@pytest.fixture(scope="module")
def reference(neox_dir, text_dir, tmp_path_factory) -> dict[str, np.ndarray]:
    out = tmp_path_factory.mktemp("ref") / "cache"
    harvest(CacheSpec(model=str(neox_dir), dataset="sotu", out=str(out), **BIG), show_progress=False)
    return read_all(open_cache(out))


@pytest.fixture(scope="module")
def reference_float8(neox_dir, text_dir, tmp_path_factory) -> dict[str, np.ndarray]:
    out = tmp_path_factory.mktemp("ref8") / "cache"
    harvest(CacheSpec(model=str(neox_dir), dataset="sotu", out=str(out), dtype="float8", **BIG), show_progress=False)
    return read_all(open_cache(out))


def assert_same(cache_dir: Path, reference: dict[str, np.ndarray]) -> None:
    cache = open_cache(cache_dir)
    assert cache.complete
    got = read_all(cache)
    for k in reference:
        assert np.array_equal(got[k], reference[k]), f"{k} differs from the uninterrupted run"


@pytest.mark.parametrize("dtype", ["bfloat16", "float8"])
def test_kill_9_then_resume_gives_the_uninterrupted_cache(neox_dir, text_dir, tmp_path, request, dtype):
    """float8 too: the resumed run decodes with the scales the killed one fixed, so the codes (and the scales,
    in read_all) equal the uninterrupted run's byte for byte."""
    reference = request.getfixturevalue("reference" if dtype == "bfloat16" else "reference_float8")
    out = tmp_path / "cache"
    cmd = [sys.executable, "-m", "harvest", *cli_args(neox_dir, text_dir, out, dtype)]
    kills = 0
    for wait_blocks in (3, 30):  # kill early, then again later in the resumed run
        proc = subprocess.Popen(cmd, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.time() + 300  # a shared, loaded machine can take minutes to the first blocks
        while time.time() < deadline and proc.poll() is None:
            manifests = list((out / "manifest").glob("block-*.json")) if (out / "manifest").exists() else []
            if len(manifests) >= wait_blocks:
                break
            time.sleep(0.02)
        assert proc.poll() is None, f"the run ended before it could be killed: {proc.stderr.read().decode()[-500:]}"
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        kills += 1
        cache = open_cache(out)
        n_done = len(cache.complete_blocks())
        assert 0 < n_done < cache.layout.n_blocks
        # whatever the manifest lists is whole: every listed block's files check out
        from harvest.cache import verify_cache

        assert all("missing (cache incomplete)" in p for p in verify_cache(cache))
    done = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert kills == 2
    assert_same(out, reference)


def test_stale_partial_block_files_are_rewritten_on_resume(neox_dir, text_dir, tmp_path, reference):
    out = tmp_path / "cache"
    spec = CacheSpec(model=str(neox_dir), dataset="sotu", out=str(out), **BIG)
    harvest(spec, show_progress=False)
    cache = open_cache(out)
    # simulate a crash after block 5's data files were written but before its manifest was
    cache.manifest_path(5).unlink()
    f = cache.shard_file("acts", (0, 5 * 2, 0))
    f.write_bytes(b"\0" * 100)
    s = harvest(spec, show_progress=False)
    assert s.blocks_this_run == 1
    assert_same(out, reference)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_ranks_under_torchrun_equal_one_process(neox_dir, text_dir, tmp_path, reference):
    out = tmp_path / "cache"
    torchrun = Path(sys.executable).parent / "torchrun"
    cmd = [
        str(torchrun),
        "--nproc-per-node",
        "2",
        "--master-port",
        str(_free_port()),
        "-m",
        "harvest",
        *cli_args(neox_dir, text_dir, out),
    ]
    done = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    cache = open_cache(out)
    assert_same(out, reference)
    # both ranks wrote: blocks alternate between ranks, so every block exists and each is whole
    assert len(cache.complete_blocks()) == cache.layout.n_blocks > 2
