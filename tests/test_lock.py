"""One writer per location: the lock object with a lease, on a local disk and in a bucket (real S3 server)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from helpers import run_cli

from harvest.cache import LOCK_KEY
from harvest.lock import Lock, LockHeld, exclusive
from harvest.store import open_store


@pytest.fixture(params=["local", "s3"])
def location(request, tmp_path) -> str:
    if request.param == "local":
        return str(tmp_path / "place")
    return request.getfixturevalue("bucket") + "/place"


def test_second_holder_is_refused_with_the_holder_named(location):
    with Lock(location, "harvest run"):
        with pytest.raises(LockHeld) as e:
            Lock(location, "train run").acquire()
        msg = str(e.value)
        assert f"pid {os.getpid()} on {socket.gethostname()}" in msg and "`harvest run`" in msg and "\n" not in msg
    assert not open_store(location).exists(LOCK_KEY)  # released
    with Lock(location, "train run"):  # and free again
        pass


def test_local_lock_leaves_nothing_behind(tmp_path):
    with Lock(tmp_path / "new-folder", "harvest run"):
        assert (tmp_path / "new-folder" / LOCK_KEY).is_file()
    assert not (tmp_path / "new-folder").exists()  # it made the folder for the lock, and removed it again


def test_stale_lock_of_a_killed_process_is_taken_over(location):
    code = (
        f"import sys, time; from harvest.lock import Lock; Lock({location!r}, 'harvest run').acquire(); print('held')"
    )
    code += "; sys.stdout.flush(); time.sleep(120)"
    child = subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, cwd=Path(__file__).parents[1]
    )
    try:
        assert child.stdout.readline().strip() == "held"
        with pytest.raises(LockHeld, match=f"pid {child.pid} "):
            Lock(location, "x").acquire()
        child.send_signal(signal.SIGKILL)
        child.wait()
        assert open_store(location).exists(LOCK_KEY)  # kill -9 left it behind
        with Lock(location, "harvest run") as lock:
            assert lock.took_over["pid"] == child.pid
    finally:
        child.kill()


def _plant(location: str, **holder) -> None:
    body = {"what": "harvest run", "pid": 1, "host": "elsewhere", "since": "then", "command": "harvest run"}
    open_store(location).put(LOCK_KEY, json.dumps({**body, **holder}).encode())


def test_lease_decides_for_holders_on_other_hosts(location):
    _plant(location, lease_until=time.time() + 300)
    with pytest.raises(LockHeld, match="on elsewhere"):
        Lock(location, "x").acquire()
    _plant(location, lease_until=time.time() - 1)  # expired: its holder stopped renewing it
    with Lock(location, "x") as lock:
        assert lock.took_over["host"] == "elsewhere"


def test_takeover_of_a_stale_lock_is_race_free(location):
    _plant(location, lease_until=time.time() - 1)
    barrier, won, refused = threading.Barrier(8), [], []

    def contend() -> None:
        lock = Lock(location, "contender")
        barrier.wait()
        try:
            lock.acquire()
            won.append(lock)
        except LockHeld:
            refused.append(1)

    threads = [threading.Thread(target=contend) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(won) == 1 and len(refused) == 7
    won[0].release()


def test_the_lease_is_renewed_while_held(location):
    with Lock(location, "long job", lease_seconds=0.9) as lock:
        time.sleep(2.0)  # more than twice the lease
        with pytest.raises(LockHeld):
            Lock(location, "x").acquire()
        assert not lock.lost


def test_ranks_of_one_torchrun_job_share_rank_0s_lock(location, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    with exclusive(location, "harvest run") as lock:
        assert lock is None and not open_store(location).exists(LOCK_KEY)
    monkeypatch.setenv("RANK", "0")
    with exclusive(location, "harvest run") as lock:
        assert lock is not None and open_store(location).exists(LOCK_KEY)


def test_two_harvests_on_one_out_then_kill_9_and_takeover(neox_dir, tmp_path, capsys):
    from harvest import open_cache
    from harvest.cache import verify_cache

    out = tmp_path / "cache"
    args = ["--quiet", "--model", str(neox_dir), "--dataset", "sotu", "--out", str(out), "--context", "16"]
    args += ["--tokens", str(16 * 2000), "--chunk-tokens", "32", "--shard-tokens", "64", "--shuffle-tokens", "128"]
    cmd = [sys.executable, "-m", "harvest", "run", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    first = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 180
        while time.time() < deadline and first.poll() is None and not list(out.glob("manifest/block-*[0-9].json")):
            time.sleep(0.05)
        assert first.poll() is None, first.stderr.read()[-1000:]
        code, _, err = run_cli(["run", *args], capsys)  # in-process: it reaches the lock within a second
        assert code == 2, err[-1000:]
        err = " ".join(err.split())
        assert f"pid {first.pid} on {socket.gethostname()}" in err and "Traceback" not in err
        first.send_signal(signal.SIGKILL)
        first.wait()
        assert (out / LOCK_KEY).exists()
    finally:
        first.kill()
    again = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    assert verify_cache(open_cache(out)) == [] and not (out / LOCK_KEY).exists()
