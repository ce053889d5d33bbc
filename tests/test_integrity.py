"""Integrity: every chunk a reader hands out is checked against the checksum recorded at harvest time; each
kind of corruption is reported by `harvest verify` AND refused by readers and training with one line."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import zlib
from pathlib import Path

import google_crc32c
import numpy as np
import pytest
import zarr
from helpers import read_all, run_cli

from harvest import ChunkReader, UserError, open_cache
from harvest.cache import encode_shard, upgrade_cache, verify_cache
from harvest.errors import CacheError, IntegrityError
from harvest.run import harvest
from harvest.spec import CacheSpec

SMALL = dict(context=16, tokens=16 * 21, chunk_tokens=32, shard_tokens=64, shuffle_tokens=128, batch_size=3)


@pytest.fixture(scope="module")
def pristine(neox_dir, text_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("integrity") / "cache"
    harvest(CacheSpec(model=str(neox_dir), dataset=str(text_dir), out=str(out), **SMALL), show_progress=False)
    return out


@pytest.fixture
def cache_copy(pristine, tmp_path) -> Path:
    out = tmp_path / "cache"
    shutil.copytree(pristine, out)
    return out


def flip(path: Path, offset: int, mask: int = 0x01) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= mask
    path.write_bytes(bytes(data))


def read_everything(path: Path) -> None:
    cache = open_cache(path)
    for name in ("token_ids", "keep", "seq", "pos"):
        cache.read_tokens(name)
    for _ in ChunkReader(cache, prefetch=2):
        pass
    cache.windows()
    cache.stats()


def assert_caught(path: Path, *words: str) -> None:
    """verify lists the problem, and reading refuses with one line naming `harvest verify`."""
    problems = verify_cache(open_cache(path)) if _opens(path) else ["(refused on open)"]
    assert problems, "verify must report the corruption"
    for w in words:
        assert any(w in p for p in problems), (w, problems)
    with pytest.raises(UserError) as e:
        read_everything(path)
    msg = str(e.value)
    assert "\n" not in msg and ("harvest verify" in msg or "re-harvest" in msg), msg


def _opens(path: Path) -> bool:
    try:
        open_cache(path)
        return True
    except CacheError:
        return False


# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("compression", ["none", "blosc-zstd"])
@pytest.mark.parametrize("n_rows", [64, 50, 20])
def test_shards_are_byte_identical_to_zarr_pythons_own(tmp_path, compression, n_rows):
    """The writer encodes shards itself (so that it can checksum chunks and write whole objects to any store);
    zarr-python writing the same rows must give the same bytes, including a partial last shard."""
    from harvest.cache import _codecs

    rows = np.random.default_rng(0).integers(0, 2**16, size=(n_rows, 8), dtype=np.uint16)
    arr = zarr.create_array(
        str(tmp_path / "z"),
        shape=(1, n_rows, 8),
        dtype="uint16",
        chunks=(1, 16, 8),
        shards=(1, 64, 8),
        fill_value=0,
        **_codecs(compression, 2),
    )
    arr[0] = rows
    ours, pieces = encode_shard(rows, 64, 16, compression)
    assert (tmp_path / "z" / "c" / "0" / "0" / "0").read_bytes() == ours
    assert sum(p is None for p in pieces) == 4 - (-(-n_rows // 16))  # chunks past the end are absent


def test_pristine_cache_verifies_and_reads(pristine):
    assert verify_cache(open_cache(pristine)) == []
    read_everything(pristine)


def test_flipped_mantissa_bit(cache_copy):
    flip(cache_copy / "acts/c/1/0/0", 100, 0x01)  # lowest mantissa bit of one bf16 value in chunk 0
    assert_caught(cache_copy, "acts/c/1/0/0: crc32 mismatch", "inner chunk 0")


def test_slice_wise_hashing_reads_the_same_chunks_and_catches_the_same_flip(pristine, cache_copy, monkeypatch):
    """MLSAE_HASH_SLICE: each slice hashed as it is read must give the recorded one-shot xxh3 (a slice size
    that does not divide the chunk, so the last slice is short), and still catch a flipped bit."""
    whole = [c.acts.clone() for c in ChunkReader(open_cache(pristine), seed=1)]
    monkeypatch.setenv("MLSAE_HASH_SLICE", "1000")
    sliced = ChunkReader(open_cache(pristine), seed=1)
    assert sliced.store.hash_slice == 1000
    assert all(x.equal(c.acts) for x, c in zip(whole, sliced, strict=True))
    flip(cache_copy / "acts/c/1/0/0", 100, 0x01)
    with pytest.raises(IntegrityError):
        for _ in ChunkReader(open_cache(cache_copy), seed=1):
            pass


@pytest.mark.parametrize("value", ["-5", "256k", ""])
def test_bad_hash_slice_setting_is_one_line(pristine, monkeypatch, value):
    monkeypatch.setenv("MLSAE_HASH_SLICE", value)
    with pytest.raises(UserError, match="MLSAE_HASH_SLICE=.* is not a byte count") as e:
        open_cache(pristine)
    assert "\n" not in str(e.value)


def test_flipped_token_array_byte(cache_copy):
    flip(cache_copy / "keep/c/1", 3)
    assert_caught(cache_copy, "keep/c/1")
    with pytest.raises(IntegrityError, match="keep/c/1 chunk 0"):
        open_cache(cache_copy).read_tokens("keep", 64, 80)  # the checked token reads refuse it too


def test_redirected_shard_index_entry_with_a_valid_crc(cache_copy):
    f = cache_copy / "acts/c/0/1/0"
    data = bytearray(f.read_bytes())
    n_inner = 2
    index = np.frombuffer(bytes(data[-(16 * n_inner + 4) : -4]), "<u8").reshape(n_inner, 2).copy()
    index[0] = index[1]  # chunk 0 now points at chunk 1's bytes; the index crc32c is made to match
    raw = index.astype("<u8").tobytes()
    data[-(16 * n_inner + 4) :] = raw + np.uint32(google_crc32c.value(raw)).tobytes()
    f.write_bytes(bytes(data))
    assert_caught(cache_copy, "redirected")


def test_torn_shard_index_fails_its_crc32c(cache_copy):
    f = cache_copy / "pos/c/2"
    flip(f, f.stat().st_size - 10)
    assert_caught(cache_copy, "crc32c")


def test_compressed_byte_flip(neox_dir, text_dir, tmp_path):
    out = tmp_path / "z"
    spec = CacheSpec(model=str(neox_dir), dataset=str(text_dir), out=str(out), compression="blosc-zstd", **SMALL)
    harvest(spec, show_progress=False)
    read_everything(out)
    flip(out / "acts/c/2/0/0", 40, 0x10)  # inside the first compressed chunk (past the blosc header)
    assert_caught(out, "acts/c/2/0/0", "inner chunk 0")


def test_deleted_and_flipped_windows_chunks(cache_copy, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(cache_copy, other)
    (cache_copy / "windows/c/0/0").unlink()
    assert_caught(cache_copy, "windows/c/0/0: file missing")
    flip(other / "windows/c/0/0", 7)
    assert_caught(other, "windows/c/0/0")


def test_flipped_stats_file(cache_copy):
    flip(cache_copy / "manifest/block-000001.stats.safetensors", 200)
    assert_caught(cache_copy, "block-000001.stats.safetensors")


@pytest.mark.parametrize("edit", ["n_tokens", "layers"])
def test_hand_edited_metadata(cache_copy, edit):
    f = cache_copy / "zarr.json"
    doc = json.loads(f.read_text())
    layout = doc["attributes"]["mlsae_cache"]["layout"]
    if edit == "n_tokens":
        layout["n_tokens"] -= 16  # one window fewer: still a valid-looking layout
    else:
        layout["layers"] = [0, 1, 5]  # relabelled layers
    f.write_text(json.dumps(doc))
    assert_caught(cache_copy, "edited")


def test_invalid_manifest_json_is_corrupt_for_every_command(cache_copy, capsys):
    (cache_copy / "manifest/block-000001.json").write_text('{"block": 1, "files": ')
    assert_caught(cache_copy, "block-000001.json is corrupt (invalid JSON)")
    for cmd in (["info", cache_copy], ["verify", cache_copy]):
        code, _, err = run_cli(cmd, capsys)
        assert code != 0 and "invalid JSON" in err and "Traceback" not in err, (cmd, err)


def test_training_refuses_a_corrupt_cache_with_one_line(cache_copy, tmp_path):
    flip(cache_copy / "acts/c/0/2/0", 64)
    run = [sys.executable, "-m", "train", "run", "--cache", str(cache_copy), "--out", str(tmp_path / "run")]
    run += ["--expansion-factor", "2", "-k", "2", "--batch-tokens", "64", "--eval-tokens", "64", "--tokens", "128"]
    done = subprocess.run(run, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr[-2000:]
    lines = [l for l in done.stderr.splitlines() if l.strip()]
    assert "Traceback" not in done.stderr and lines[-1].startswith("error:") and "harvest verify" in lines[-1]
    assert "acts/c/0/2/0" in lines[-1]
    assert not (tmp_path / "run" / "sae.safetensors").exists()


# ---------------------------------------------------------------------------------------------
# caches harvested before chunk checksums existed


def make_old(path: Path) -> None:
    """Rewrite a cache's manifests as the previous version wrote them (size + crc32 per file, no chunk
    checksums, no metadata hash, no windows manifest): the format of every cache harvested before."""
    for m in (path / "manifest").glob("block-*[0-9].json"):
        d = json.loads(m.read_text())
        files = {k: {"size": v["size"], "crc32": v["crc32"]} for k, v in d["files"].items()}
        m.write_text(json.dumps({"block": d["block"], "start": d["start"], "stop": d["stop"], "files": files}))
    (path / "manifest/windows.json").unlink()


def test_old_cache_says_upgrade_then_upgrade_makes_it_readable(cache_copy, pristine, capsys):
    make_old(cache_copy)
    with pytest.raises(CacheError, match="harvest upgrade"):
        ChunkReader(open_cache(cache_copy))
    code, out, _ = run_cli(["info", cache_copy], capsys)
    assert code == 0 and "harvest upgrade" in " ".join(out.split())
    code, out, err = run_cli(["upgrade", cache_copy], capsys)
    assert code == 0 and "3 manifests upgraded" in " ".join(out.split()), err
    # the upgraded manifests are exactly what a fresh harvest writes
    for m in (pristine / "manifest").glob("*.json"):
        assert json.loads((cache_copy / "manifest" / m.name).read_text()) == json.loads(m.read_text()), m.name
    assert verify_cache(open_cache(cache_copy)) == []
    read_everything(cache_copy)
    assert run_cli(["upgrade", cache_copy], capsys)[0] == 0  # again: nothing to do


def test_upgrade_refuses_damaged_old_files(cache_copy):
    make_old(cache_copy)
    flip(cache_copy / "acts/c/2/1/0", 10)
    with pytest.raises(IntegrityError, match="acts/c/2/1/0"):
        upgrade_cache(open_cache(cache_copy), log=lambda m: None)


def test_upgrade_checks_old_windows_against_the_token_arrays(cache_copy):
    make_old(cache_copy)
    f = cache_copy / "windows/c/0/0"
    data = bytearray(f.read_bytes())
    data[0:4] = np.int32(int(np.frombuffer(bytes(data[:4]), "<i4")[0]) + 1).tobytes()
    f.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match="windows"):
        upgrade_cache(open_cache(cache_copy), log=lambda m: None)


def test_whole_file_crc32_in_the_manifest_is_zlibs(pristine):
    """push/pull, the read-through cache and older tools check files by the manifest's crc32 (zlib)."""
    cache = open_cache(pristine)
    m = cache.manifests()[0]
    for key, entry in m.files.items():
        assert zlib.crc32((pristine / key).read_bytes()) == entry.crc32
    assert read_all(cache)["acts"].shape[0] == 3
