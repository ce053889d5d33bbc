"""Harvest on a tiny random GPT-NeoX: correctness of the cached vectors, order, mask, stats, reader."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import hf_block_outputs, read_all

from harvest import ChunkReader, open_cache
from harvest.run import harvest
from harvest.spec import CacheSpec

SMALL = dict(context=16, tokens=16 * 20, chunk_tokens=32, shard_tokens=64, shuffle_tokens=128, batch_size=3)


def small_spec(neox_dir, text_dir, out, **kw) -> CacheSpec:
    return CacheSpec(model=str(neox_dir), dataset=str(text_dir), out=str(out), **{**SMALL, **kw})


@pytest.fixture(scope="module")
def cache_path(neox_dir, text_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("caches") / "c"
    harvest(small_spec(neox_dir, text_dir, out), show_progress=False)
    return out


def test_cached_vectors_equal_independent_hf_hooks(cache_path, neox_dir):
    cache = open_cache(cache_path)
    windows = cache.windows()
    ref = hf_block_outputs(neox_dir, windows.long())  # [n_layers] x [n_seq, ctx, d], then the normed last
    seq, pos = cache.read_tokens("seq").long(), cache.read_tokens("pos").long()
    for layer in cache.layers:
        got = cache.read(layer).float()
        want = ref[layer][seq, pos]
        # identical up to bfloat16 rounding of the stored value (2^-8 relative)
        torch.testing.assert_close(got, want.to(torch.bfloat16).float(), rtol=0, atol=0)
    # the last block's output is stored BEFORE the final norm
    last = cache.read(cache.layers[-1]).float()
    normed = ref[-1][seq, pos]
    assert (last - normed).abs().max() > 0.1


def test_every_window_position_stored_exactly_once_and_token_columns_agree(cache_path):
    cache = open_cache(cache_path)
    lay = cache.layout
    seq, pos = cache.read_tokens("seq").numpy(), cache.read_tokens("pos").numpy()
    flat = seq.astype(np.int64) * lay.context + pos
    assert sorted(flat.tolist()) == list(range(lay.n_tokens))
    assert not np.array_equal(flat, np.arange(lay.n_tokens)), "tokens must be shuffled within blocks"
    for b in range(lay.n_blocks):  # shuffled only WITHIN each block
        s, e = lay.block_range(b)
        assert sorted(flat[s:e].tolist()) == list(range(s, e))
    windows = cache.windows().numpy()
    assert np.array_equal(cache.read_tokens("token_ids").numpy(), windows[seq, pos])


def test_keep_mask_marks_special_tokens(cache_path):
    cache = open_cache(cache_path)
    ids = cache.read_tokens("token_ids").numpy()
    keep = cache.read_tokens("keep").numpy()
    special = set(cache.meta["tokenizer"]["special_ids"])
    eos = cache.meta["tokenizer"]["eos_token_id"]
    assert (ids == eos).sum() > 0, "documents are EOS-separated, so some EOS must be present"
    assert np.array_equal(keep, ~np.isin(ids, list(special)))


def test_windows_follow_the_reference_tokenization(cache_path, neox_dir):
    from tiny import documents
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(neox_dir)
    cache = open_cache(cache_path)
    assert cache.meta["tokenizer"]["prepend_bos"] is False  # Pythia-style tokenizer adds no BOS
    stream = []
    for d in documents():  # the files doc000.txt... are read in name order = this order
        stream += [tok.eos_token_id, *tok(d, add_special_tokens=False).input_ids]
    n = cache.layout.n_tokens
    assert cache.windows().reshape(-1).tolist() == stream[:n]


def test_stats_match_direct_computation(cache_path):
    cache = open_cache(cache_path)
    keep = cache.read_tokens("keep").bool()
    st = cache.stats()
    for i, layer in enumerate(cache.layers):
        x = cache.read(layer).double()[keep]
        assert st.count[i] == len(x)
        torch.testing.assert_close(st.mean[i], x.mean(0))
        torch.testing.assert_close(st.var[i], x.var(0, unbiased=False))
        torch.testing.assert_close(st.mean_norm[i], x.norm(dim=1).mean())


def test_reference_special_tokens_are_stored_as_zeros_and_kept(neox_dir, text_dir, tmp_path, cache_path):
    """--special-tokens reference: zeros at BOS/EOS/PAD positions with keep=True (the reference code), every
    other vector as in the default (exclude) cache, and the statistics count the zeros."""
    out = tmp_path / "ref"
    harvest(small_spec(neox_dir, text_dir, out, special_tokens="reference"), show_progress=False)
    cache, base = open_cache(out), open_cache(cache_path)
    special = torch.from_numpy(np.isin(cache.read_tokens("token_ids").numpy(), cache.meta["tokenizer"]["special_ids"]))
    assert special.sum() > 0 and cache.read_tokens("keep").all()
    assert torch.equal(base.read_tokens("keep"), ~special)  # the default marks exactly those positions
    st, n = cache.stats(), cache.layout.n_tokens
    for i, layer in enumerate(cache.layers):
        x = cache.read(layer)
        assert (x[special] == 0).all()
        assert torch.equal(x[~special].view(torch.int16), base.read(layer)[~special].view(torch.int16))
        assert st.count[i] == n  # the zero vectors count as kept tokens
        torch.testing.assert_close(st.mean[i], x.double().sum(0) / n)
        torch.testing.assert_close(st.mean_norm[i], x.double().norm(dim=1).sum() / n)


def test_include_real_keeps_the_real_special_vectors_and_include_is_its_old_name(
    neox_dir, text_dir, tmp_path, cache_path
):
    out = tmp_path / "real"
    harvest(small_spec(neox_dir, text_dir, out, special_tokens="include"), show_progress=False)
    cache, base = open_cache(out), open_cache(cache_path)
    assert cache.meta["spec"]["special_tokens"] == "include-real" and cache.read_tokens("keep").all()
    for layer in cache.layers:
        assert torch.equal(cache.read(layer).view(torch.int16), base.read(layer).view(torch.int16))
    # the same command with the new name resumes (here: finds complete) the same cache
    s = harvest(small_spec(neox_dir, text_dir, out, special_tokens="include-real"), show_progress=False)
    assert s.blocks_this_run == 0


def test_fast_reader_equals_zarr_python(cache_path):
    cache = open_cache(cache_path)
    reader = ChunkReader(cache, seed=3, prefetch=3)
    seen = []
    for chunk in reader:
        s = chunk.start
        e = s + chunk.acts.shape[1]
        for i, layer in enumerate(cache.layers):
            assert torch.equal(chunk.acts[i].view(torch.int16), cache.read(layer, s, e).view(torch.int16))
        for name in ["token_ids", "keep", "seq", "pos"]:
            assert torch.equal(getattr(chunk, name), cache.read_tokens(name, s, e))
        seen.append(chunk.index)
    assert sorted(seen) == list(range(cache.layout.n_chunks))
    assert seen != sorted(seen), "chunks come in a seeded random order"
    assert list(ChunkReader(cache, seed=3).order(0)) == seen
    assert list(ChunkReader(cache, seed=4).order(0)) != seen


def test_reader_layer_subset_ranks_and_held_buffers(cache_path):
    cache = open_cache(cache_path)
    a = ChunkReader(cache, layers=[2], seed=0, rank=0, world_size=2)
    b = ChunkReader(cache, layers=[2], seed=0, rank=1, world_size=2)
    assert sorted([*a.order(), *b.order()]) == list(range(cache.layout.n_chunks))
    assert set(a.order()).isdisjoint(b.order())
    held = ChunkReader(cache, layers=[0, 2], seed=0, prefetch=2, hold=3)
    chunks = []
    for chunk in held.epoch(1):
        chunks.append(chunk)
        if len(chunks) > 3:
            chunks.pop(0)
        for c in chunks:  # the last `hold` chunks are still intact
            s, e = c.start, c.start + c.acts.shape[1]
            assert torch.equal(c.acts[1].view(torch.int16), cache.read(2, s, e).view(torch.int16))


@pytest.mark.parametrize("dtype,compression", [("float32", "none"), ("bfloat16", "blosc-zstd")])
def test_other_dtypes_and_compression_round_trip(neox_dir, text_dir, tmp_path, cache_path, dtype, compression):
    out = tmp_path / "c2"
    harvest(small_spec(neox_dir, text_dir, out, dtype=dtype, compression=compression, layers="1"), show_progress=False)
    cache, base = open_cache(out), open_cache(cache_path)
    assert cache.layers == (1,)
    x = cache.read(1)
    assert x.dtype == {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    # same windows, same permutation: the bf16 cache is the rounding of the float32 one
    assert torch.equal(cache.read_tokens("seq"), base.read_tokens("seq"))
    torch.testing.assert_close(x.to(torch.bfloat16).float(), base.read(1).float(), rtol=0, atol=0)
    reader = ChunkReader(cache, seed=0)
    for chunk in reader:
        s, e = chunk.start, chunk.start + chunk.acts.shape[1]
        assert torch.equal(chunk.acts[0], cache.read(1, s, e))


def test_harvest_stops_after_the_last_requested_layer(neox_dir):
    from harvest.models import load_bridge, load_tokenizer, resolve_model
    from harvest.run import forward_layers

    src = resolve_model(str(neox_dir))
    bridge = load_bridge(src, load_tokenizer(src), "cpu", torch.float32)
    hf = bridge.original_model
    ran = []
    handles = [
        layer.register_forward_hook(lambda m, i, o, k=k: ran.append(k)) for k, layer in enumerate(hf.base_model.layers)
    ]
    handles.append(hf.get_output_embeddings().register_forward_hook(lambda *a: ran.append("unembed")))
    ids = torch.randint(0, 300, (2, 8))
    x = forward_layers(bridge, ids, [0, 1], "resid_post")
    assert x.shape == (2, 2, 8, 32)
    assert "unembed" not in ran and 2 not in ran
    ran.clear()
    forward_layers(bridge, ids, [0, 1, 2], "resid_post")
    assert "unembed" not in ran
    for h in handles:
        h.remove()
    # and user hooks registered on the bridge survive a harvest forward (TransformerLens #1636)
    seen = []
    bridge.add_hook("blocks.0.hook_resid_post", lambda x, hook: seen.append(1) or x, is_permanent=True)
    forward_layers(bridge, ids, [1], "resid_post")
    assert seen == [1]


def test_same_spec_again_is_a_no_op(cache_path, neox_dir, text_dir):
    before = {p: p.stat().st_mtime_ns for p in cache_path.rglob("*") if p.is_file()}
    s = harvest(small_spec(neox_dir, text_dir, cache_path), show_progress=False)
    assert s.blocks_this_run == 0 and s.resumed
    assert before == {p: p.stat().st_mtime_ns for p in cache_path.rglob("*") if p.is_file()}


def test_verify_detects_truncation_corruption_and_missing_blocks(neox_dir, text_dir, tmp_path):
    from harvest.cache import verify_cache

    out = tmp_path / "v"
    harvest(small_spec(neox_dir, text_dir, out), show_progress=False)
    cache = open_cache(out)
    assert verify_cache(cache) == []
    f = cache.shard_file("acts", (1, 0, 0))
    data = bytearray(f.read_bytes())
    data[100] ^= 0xFF
    f.write_bytes(bytes(data))
    g = cache.shard_file("acts", (2, 1, 0))
    g.write_bytes(g.read_bytes()[:-10])
    cache.manifest_path(2).unlink()
    problems = verify_cache(cache)
    assert any("crc32" in p and "acts/c/1/0/0" in p for p in problems)
    assert any("truncated" in p and "acts/c/2/1/0" in p for p in problems)
    assert any("block 2 is missing" in p for p in problems)
    assert not cache.complete
    with pytest.raises(Exception, match="incomplete"):
        ChunkReader(cache)


def test_read_back_all_is_stable_for_the_same_spec(neox_dir, text_dir, tmp_path, cache_path):
    """Two independent runs of one spec give byte-identical caches (the basis of resume and multi-rank)."""
    out = tmp_path / "again"
    harvest(small_spec(neox_dir, text_dir, out), show_progress=False)
    a, b = read_all(open_cache(cache_path)), read_all(open_cache(out))
    for k in a:
        assert np.array_equal(a[k], b[k]), k
    assert open_cache(out).fingerprint == open_cache(cache_path).fingerprint


def test_chunks_equal_to_the_fill_value_are_still_written_and_read(neox_dir, text_dir, tmp_path):
    """One window per block: block 0's `seq` column is all 0 (zarr's fill value) and must still exist."""
    out = tmp_path / "one-window-blocks"
    harvest(
        small_spec(neox_dir, text_dir, out, chunk_tokens=16, shard_tokens=16, shuffle_tokens=16, tokens=64),
        show_progress=False,
    )
    cache = open_cache(out)
    assert cache.shard_file("seq", (0,)).is_file()
    from harvest.cache import verify_cache

    assert verify_cache(cache) == []
    for chunk in ChunkReader(cache):
        assert (chunk.seq == chunk.index).all()


def test_reference_mode_zeroes_only_bos_eos_pad_as_the_reference_other_special_ids_keep_real_vectors(
    neox_dir, tmp_path
):
    """Text holding other special tokens of the tokenizer (<unk>, and <bos>, which is not this tokenizer's
    BOS: NeoX's BOS is its EOS): `reference` zeroes only BOS/EOS/PAD and keeps every other vector real,
    `exclude` marks every special id keep=False."""
    from tiny import documents, write_text_folder

    docs = [d.replace("board", "<unk> board").replace("Rivers", "<bos> Rivers") for d in documents(24)]
    text = write_text_folder(tmp_path / "docs", docs)
    ref, exc = tmp_path / "ref", tmp_path / "exc"
    harvest(small_spec(neox_dir, text, ref, special_tokens="reference"), show_progress=False)
    harvest(small_spec(neox_dir, text, exc), show_progress=False)
    r, x = open_cache(ref), open_cache(exc)
    tok = r.meta["tokenizer"]
    ids = r.read_tokens("token_ids").numpy()
    reference_ids = [tok["bos_token_id"], tok["eos_token_id"], tok["pad_token_id"]]
    zeroed, special = np.isin(ids, reference_ids), np.isin(ids, tok["special_ids"])
    others = special & ~zeroed  # <unk>, <bos>
    assert zeroed.sum() > 0 and others.sum() >= 2 and r.read_tokens("keep").all()
    assert torch.equal(x.read_tokens("keep"), torch.from_numpy(~special))  # exclude: every special id
    for layer in r.layers:
        v, real = r.read(layer), x.read(layer)
        assert (v[torch.from_numpy(zeroed)] == 0).all()
        assert (v[torch.from_numpy(others)].abs().sum(1) > 0).all()
        assert torch.equal(
            v[torch.from_numpy(~zeroed)].view(torch.int16), real[torch.from_numpy(~zeroed)].view(torch.int16)
        )
