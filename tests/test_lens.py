"""Tuned lens: identity at init, exact inverse, layer mapping, FAR.AI files, chunked KL, training."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from harvest.errors import UserError
from harvest.lens import Lens, LensError, Unembed, final_norm_and_unembed, translator_for_block_output
from harvest.lens_train import LensTrainConfig, chunked_kl, train_lens
from harvest.models import load_bridge, load_tokenizer, resolve_model
from harvest.run import forward_layers


@pytest.fixture(scope="module")
def bridge(neox_dir):
    src = resolve_model(str(neox_dir))
    return load_bridge(src, load_tokenizer(src), "cpu", torch.float32)


def _random_lens(d: int = 16, n: int = 4, seed: int = 0) -> Lens:
    torch.manual_seed(seed)
    lens = Lens.for_model(d, n, "tiny")
    with torch.no_grad():
        for t in lens.layer_translators:
            t.weight.normal_(0, 0.3 / d**0.5)
            t.bias.normal_(0, 0.5)
    return lens


def test_layer_mapping_pinned():
    # Block l's output is hidden_states[l + 1]: translator l + 1; the last block feeds the unembedding as is.
    assert [translator_for_block_output(l, 4) for l in range(4)] == [1, 2, 3, None]
    assert translator_for_block_output(0, 1) is None
    with pytest.raises(ValueError):
        translator_for_block_output(4, 4)
    lens = _random_lens()
    h = torch.randn(3, 16)
    assert torch.equal(lens.transform(h, 3), h)
    t2 = lens.layer_translators[2]
    assert torch.allclose(lens.transform(h, 1), h + h @ t2.weight.T + t2.bias)


def test_fresh_lens_is_logit_lens(bridge):
    n, d = bridge.cfg.n_layers, bridge.cfg.d_model
    lens = Lens.for_model(d, n)
    norm, unembed = final_norm_and_unembed(bridge)
    ids = torch.randint(0, 300, (2, 12))
    resid = forward_layers(bridge, ids, list(range(n)), "resid_post")
    for l in range(n):
        assert torch.equal(lens.transform(resid[l], l), resid[l])
        assert torch.allclose(lens.logits(resid[l], l, norm, unembed), unembed(norm(resid[l])))
    # The readout reproduces the model's own logits from the last block's output.
    with torch.no_grad():
        assert torch.allclose(unembed(norm(resid[-1])), bridge(ids), atol=1e-4)


def test_softcap_applied():
    w = torch.randn(10, 4) * 20
    x = torch.randn(3, 4)
    z = Unembed(w, softcap=5.0)(x)
    assert z.abs().max() <= 5.0 and torch.allclose(z, 5.0 * torch.tanh(x @ w.T / 5.0))


def test_inverse_exact_fp32():
    lens = _random_lens(d=64, n=3)
    h = torch.randn(2, 5, 64) * 3
    for l in range(3):
        y = lens.transform(h, l)
        if l < 2:
            assert not torch.allclose(y, h)
        back = lens.inverse(y, l)
        assert back.shape == h.shape and back.dtype == torch.float32
        assert ((back - h).norm() / h.norm()).item() < 1e-4


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_farai_layout_roundtrip(tmp_path, dtype):
    lens = _random_lens()
    folder = tmp_path / "lens"
    folder.mkdir()
    # Written by hand in the library's layout, with a config key we do not know.
    torch.save({k: v.to(dtype) for k, v in lens.layer_translators.state_dict().items()}, folder / "params.pt")
    (folder / "config.json").write_text(
        json.dumps(
            {
                "base_model_name_or_path": "tiny",
                "d_model": 16,
                "num_hidden_layers": 4,
                "bias": True,
                "unembed_hash": None,
                "lens_type": "linear_tuned_lens",
                "future_key": 1,
            }
        )
    )
    loaded = Lens.load(folder, d_model=16, n_layers=4)
    tol = 1e-3 if dtype == torch.float16 else 0
    for a, b in zip(loaded.state_dict().values(), lens.state_dict().values()):
        assert torch.allclose(a, b, atol=tol)
    again = Lens.load(loaded.save(tmp_path / "saved"))
    for a, b in zip(again.state_dict().values(), loaded.state_dict().values()):
        assert torch.equal(a, b)
    cfg = json.loads((tmp_path / "saved" / "config.json").read_text())
    assert {
        "base_model_name_or_path",
        "d_model",
        "num_hidden_layers",
        "bias",
        "base_model_revision",
        "unembed_hash",
        "lens_type",
    } == set(cfg)
    keys = set(torch.load(tmp_path / "saved" / "params.pt"))
    assert keys == {f"{i}.{p}" for i in range(4) for p in ("weight", "bias")}


def _one_line_lens_error(fn) -> str:
    with pytest.raises(LensError) as e:
        fn()
    assert isinstance(e.value, UserError) and "\n" not in str(e.value)
    return str(e.value)


def test_wrong_shape_and_old_layout(tmp_path):
    folder = _random_lens().save(tmp_path / "lens")
    msg = _one_line_lens_error(lambda: Lens.load(folder, d_model=32, n_layers=4))
    assert "d_model=16" in msg and "d_model=32" in msg
    msg = _one_line_lens_error(lambda: Lens.load(folder, d_model=16, n_layers=6))
    assert "4 layers" in msg and "6 layers" in msg
    # config agrees with the model but a tensor does not
    state = torch.load(folder / "params.pt")
    state["2.weight"] = torch.zeros(16, 8)
    torch.save(state, folder / "params.pt")
    assert "2.weight" in _one_line_lens_error(lambda: Lens.load(folder, 16, 4))
    old = tmp_path / "old"
    old.mkdir()
    torch.save(
        {"layer_translators.0.weight": torch.zeros(16, 16), "unembed.final_norm.weight": torch.ones(16)},
        old / "params.pt",
    )
    (old / "config.json").write_text(json.dumps({"d_model": 16, "num_hidden_layers": 1}))
    assert "v0.0.x" in _one_line_lens_error(lambda: Lens.load(old))
    assert "no lens" in _one_line_lens_error(lambda: Lens.load(tmp_path / "missing"))


def test_hub_offline_is_one_line_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    msg = _one_line_lens_error(lambda: Lens.from_hub("definitely/not-a-model-xyz"))
    assert "harvest lens train" in msg


@pytest.mark.parametrize("softcap", [None, 3.0])
def test_chunked_kl_matches_unchunked(softcap):
    torch.manual_seed(0)
    u = Unembed(torch.randn(103, 8), torch.randn(103), softcap)
    x = torch.randn(2, 5, 8, requires_grad=True)
    target = torch.randn(2, 5, 8)
    ref = F.kl_div(F.log_softmax(u(x), -1), F.log_softmax(u(target), -1), log_target=True, reduction="none").sum(-1)
    got = chunked_kl(x, target, u, chunk=10)  # 103 = 10 chunks + a ragged one
    assert torch.allclose(got, ref, atol=1e-5)
    w = torch.randn(2, 5)
    (g_ref,) = torch.autograd.grad((ref * w).sum(), x)
    (g_got,) = torch.autograd.grad((got * w).sum(), x)
    assert torch.allclose(g_got, g_ref, atol=1e-5)
    assert torch.allclose(chunked_kl(target, target, u, chunk=7), torch.zeros(2, 5), atol=1e-5)


def test_chunked_kl_layers_share_target():
    torch.manual_seed(1)
    u = Unembed(torch.randn(50, 8), None, 4.0)
    xs = torch.randn(3, 2, 5, 8, requires_grad=True)  # 3 layers against one target
    target = torch.randn(2, 5, 8)
    got = chunked_kl(xs, target, u, chunk=16)
    ref = torch.stack([chunked_kl(xs[l], target, u, chunk=50) for l in range(3)])
    assert got.shape == (3, 2, 5) and torch.allclose(got, ref, atol=1e-5)
    (g_got,) = torch.autograd.grad(got.sum(), xs)
    (g_ref,) = torch.autograd.grad(ref.sum(), xs)
    assert torch.allclose(g_got, g_ref, atol=1e-5)


def test_trained_lens_beats_logit_lens(bridge):
    torch.manual_seed(0)
    windows = torch.randint(0, 400, (48, 16))
    lens, report = train_lens(
        bridge, windows, cfg=LensTrainConfig(steps=60, batch=8, heldout=8, vocab_chunk=128), progress=False
    )
    n = bridge.cfg.n_layers
    assert report.blocks == list(range(n))
    for l in range(n - 1):
        assert report.kl_tuned_lens[l] < report.kl_logit_lens[l], report.table()
    assert report.kl_tuned_lens[-1] == report.kl_logit_lens[-1] and report.kl_tuned_lens[-1] < 1e-4
    assert torch.count_nonzero(lens.layer_translators[0].weight) == 0  # embeddings translator left out
    assert report.config["lr"] == pytest.approx(0.1)


def test_interrupted_lens_training_resumes_bit_for_bit(bridge, tmp_path, monkeypatch):
    import harvest.lens_train as lt

    torch.manual_seed(1)
    windows = torch.randint(0, 400, (12, 16))
    cfg = LensTrainConfig(steps=7, batch=2, heldout=2, vocab_chunk=128, checkpoint_every=2)
    whole, _ = train_lens(bridge, windows, cfg=cfg, progress=False)

    real, calls = lt.chunked_kl, [0]

    def dies_at_step_6(*a, **kw):
        calls[0] += 1
        if calls[0] == 6:
            raise KeyboardInterrupt
        return real(*a, **kw)

    ckpt = tmp_path / "checkpoint.pt"
    monkeypatch.setattr(lt, "chunked_kl", dies_at_step_6)
    with pytest.raises(KeyboardInterrupt):
        train_lens(bridge, windows, cfg=cfg, progress=False, checkpoint=ckpt)
    monkeypatch.setattr(lt, "chunked_kl", real)
    assert torch.load(ckpt, weights_only=True)["step"] == 4  # the last checkpoint before the interruption
    said = []
    resumed, _ = train_lens(bridge, windows, cfg=cfg, progress=False, checkpoint=ckpt, log=said.append)
    assert said == ["resuming lens training at step 4/7"]
    for a, b in zip(whole.state_dict().values(), resumed.state_dict().values()):
        assert torch.equal(a, b)
    # another recipe ignores the checkpoint instead of resuming from it
    said.clear()
    train_lens(bridge, windows, cfg=replace(cfg, steps=5), progress=False, checkpoint=ckpt, log=said.append)
    assert said and said[0].startswith("ignoring the checkpoint")


def test_bfloat16_kl_is_close_to_float32():
    g = torch.Generator().manual_seed(0)
    u = Unembed(torch.randn(1000, 16, generator=g), softcap=30.0)
    xs = torch.randn(3, 40, 16, generator=g, requires_grad=True)
    target = torch.randn(40, 16, generator=g)
    ref = chunked_kl(xs, target, u, 256)
    low = chunked_kl(xs, target, u.in_dtype(torch.bfloat16), 256)
    assert u.in_dtype(torch.bfloat16).weight.dtype == torch.bfloat16 and u.weight.dtype == torch.float32
    assert torch.allclose(low, ref, rtol=0.05, atol=0.05) and not torch.equal(low, ref)
    (g_ref,) = torch.autograd.grad(ref.sum(), xs)
    (g_low,) = torch.autograd.grad(low.sum(), xs)
    assert torch.nn.functional.cosine_similarity(g_ref.flatten(), g_low.flatten(), dim=0) > 0.99
