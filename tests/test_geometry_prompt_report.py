"""Residual geometry (cosines, norms, MMCS), one-prompt analysis, and the HTML report over real analyses."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from helpers import run_cli

from analyze.geometry import max_cosine, mmcs, run_mmcs, run_resid
from analyze.prompt import PromptError, prompt_stats, run_prompt, tokenize_prompt
from analyze.report import provenance, report_folder
from analyze.results import MmcsResult, PromptResult, ResidResult
from harvest import open_cache
from harvest.errors import CacheError
from harvest.run import harvest
from harvest.spec import CacheSpec
from train.config import TrainConfig
from train.loop import train
from train.record import RunError, load_run

CACHE = dict(context=32, tokens=32 * 32, chunk_tokens=128, shard_tokens=256, shuffle_tokens=512, batch_size=8)
PROMPT = "The committee met on Tuesday to discuss the budget."


@pytest.fixture(scope="module")
def gcache(neox_dir, text_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("gcache") / "cache"
    harvest(CacheSpec(model=str(neox_dir), dataset=str(text_dir), out=str(out), **CACHE), show_progress=False)
    return out


@pytest.fixture(scope="module")
def gsae(gcache, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("gsae") / "run"
    train(
        [
            TrainConfig(
                cache=str(gcache),
                out=str(out),
                expansion_factor=4,
                k=4,
                batch_tokens=256,
                eval_tokens=256,
                round_chunks=2,
                tokens=256 * 4,
                lr=3e-3,
                log_every=2,
                device="cpu",
            )
        ],
        show_progress=False,
    )
    return out


# ---------------------------------------------------------------------------------------------
# geometry


def test_mmcs_matches_brute_force_for_any_chunk():
    g = torch.Generator().manual_seed(0)
    W = torch.randn(37, 8, generator=g)
    W[5] = 3 * W[11]  # a parallel pair: both rows' max cosine is exactly 1
    Wn = W / W.norm(dim=1, keepdim=True)
    sim = Wn @ Wn.t()
    sim.fill_diagonal_(-2)
    want = sim.max(1).values
    for chunk in (1, 4, 36, 37, 1000, None):
        assert torch.allclose(max_cosine(W, chunk), want, atol=1e-6)
        assert mmcs(W, chunk) == pytest.approx(want.double().mean().item(), abs=1e-6)
    assert max_cosine(W, 5)[5].item() == pytest.approx(1.0, abs=1e-6)
    with pytest.raises(ValueError):
        mmcs(W[:1])


def test_resid_cosines_and_norms_match_a_direct_computation(gcache, gsae, tmp_path):
    cache = open_cache(gcache)
    keep = cache.read_tokens("keep")
    assert 0 < int(keep.sum()) < len(keep)  # the cache holds special tokens that must be left out
    xs = [cache.read(l)[keep].double() for l in cache.layers]
    mus = [x.mean(0) for x in xs]
    cos = lambda a, b: torch.nn.functional.cosine_similarity(a, b, dim=1).mean().item()
    want_c = [cos(a - ma, b - mb) for a, b, ma, mb in zip(xs, xs[1:], mus, mus[1:])]
    want_u = [cos(a, b) for a, b in zip(xs, xs[1:])]
    want_n = [x.norm(dim=1).mean().item() for x in xs]

    r = run_resid(gcache, tmp_path)
    assert r.tokens == int(keep.sum()) and r.layers == [0, 1, 2] and r.pairs == [[0, 1], [1, 2]]
    assert r.cosine_centered == pytest.approx(want_c, abs=1e-4)
    assert r.cosine_uncentered == pytest.approx(want_u, abs=1e-4)
    assert r.norm_mean == pytest.approx(want_n, rel=1e-5)
    assert r.norm_growth == pytest.approx(want_n[-1] / want_n[0], rel=1e-5)
    from train import load_sae

    m = run_mmcs(gsae, tmp_path)
    assert m.mmcs == pytest.approx(mmcs(load_sae(gsae).W_dec.detach()), abs=1e-6)
    assert ResidResult.load(tmp_path) == r and MmcsResult.load(tmp_path) == m
    for f in r.figures:
        assert (tmp_path / f).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # a token budget reads exactly that many kept tokens
    assert run_resid(gcache, tmp_path / "small", tokens=100, figures=False).tokens == 100


# ---------------------------------------------------------------------------------------------
# prompt


def test_prompt_stats_on_known_latents():
    # L=3 layers, T=3 tokens (token 0 special), k=2 slots; latent 7 at layers 0,1 of token 1 and layer 2 of
    # token 2; latent 3 only at layer 2 of token 1; latent 9 only on the special token; 5 below threshold
    L, T, k = 3, 3, 2
    values, indices = torch.zeros(L, T, k), torch.zeros(L, T, k, dtype=torch.long)
    indices[:, 0, 0], values[:, 0, 0] = 9, 1.0
    indices[0, 1, 0], values[0, 1, 0] = 7, 1.0
    indices[1, 1, 0], values[1, 1, 0] = 7, 1.0
    indices[2, 1, 0], values[2, 1, 0] = 3, 2.0
    indices[2, 2, 0], values[2, 2, 0] = 7, 2.0
    indices[:, 1:, 1], values[:, 1:, 1] = 5, 5e-4
    st = prompt_stats(values, indices, torch.tensor([False, True, True]), n_latents=10)
    assert st["n_active"].tolist() == [1, 2, 1] and st["n_multi"].tolist() == [1, 1, 0]  # the table: all tokens
    assert sorted(st["per_token"][1]) == [3, 7] and st["per_token"][1][7].tolist() == [1.0, 1.0, 0.0]
    acc = st["acc"]  # the statistics: kept tokens only
    ml = acc.multi_layer()
    assert ml.per_token_pooled == pytest.approx(1 / 3)  # (1 + 0) / (2 + 1), special token left out
    assert ml.per_token_mean == pytest.approx((1 / 2 + 0) / 2)
    assert ml.aggregated == pytest.approx(1 / 2)  # 7 of {3, 7}
    assert acc.mass[7].tolist() == [1.0, 1.0, 2.0] and acc.mass[9].sum() == 0 and acc.mass[5].sum() == 0
    # total mass 6; latent 7: P = (1/4, 1/4, 1/2); per (token, latent) only (1, 7) spreads: Var 1/4, mass 2
    p7 = torch.tensor([0.25, 0.25, 0.5], dtype=torch.float64)
    l = torch.arange(3.0, dtype=torch.float64)
    var7 = float(p7 @ l**2 - (p7 @ l) ** 2)
    v = acc.variances()
    assert v.exp_var_l_given_j == pytest.approx(4 / 6 * var7)
    assert v.exp_var_l_given_jt == pytest.approx(2 / 6 * 0.25)
    assert v.ratio_token == pytest.approx((2 / 6 * 0.25) / (4 / 6 * var7))


def test_prompt_writes_outputs_and_multi_layer_fraction_is_a_direct_count(gcache, gsae, neox_dir, tmp_path, capsys):
    r = run_prompt(gsae, PROMPT, out_dir=tmp_path, device="cpu")
    printed = capsys.readouterr().out
    assert "latents per token" in printed and "aggregated" in printed
    assert (tmp_path / "prompt.png").read_bytes()[:4] == b"\x89PNG"
    assert PromptResult.load(tmp_path) == r

    # the tokenization of the cache: EOS (document separator) + text, no BOS for this tokenizer
    from harvest.models import load_bridge, load_tokenizer, resolve_model
    from harvest.run import forward_layers
    from train import load_sae

    source = resolve_model(str(neox_dir))
    tok = load_tokenizer(source)
    ids = [tok.eos_token_id] + tok(PROMPT, add_special_tokens=False).input_ids
    assert [t.id for t in r.tokens] == ids
    assert r.tokens[0].special and not any(t.special for t in r.tokens[1:])

    # direct count: sets of (latent, layer) pairs per token
    x = forward_layers(load_bridge(source, tok, "cpu", torch.float32), torch.tensor([ids]), [0, 1, 2], "resid_post")
    values, indices = load_sae(gsae).encode(x[:, 0].to(torch.bfloat16).float())
    active, multi, layers_of = [], [], {}
    for t in range(1, len(ids)):
        fired = {}
        for l in range(3):
            for v, j in zip(values[l, t].tolist(), indices[l, t].tolist()):
                if v > 1e-3:
                    fired.setdefault(j, set()).add(l)
                    layers_of.setdefault(j, set()).add(l)
        active.append(len(fired))
        multi.append(sum(len(s) >= 2 for s in fired.values()))
    assert [t.n_active for t in r.tokens[1:]] == active
    assert [t.n_multi for t in r.tokens[1:]] == multi
    ml = r.multi_layer
    assert ml.per_token_pooled == pytest.approx(sum(multi) / sum(active))
    assert ml.per_token_mean == pytest.approx(
        sum(m / a for m, a in zip(multi, active) if a) / sum(a > 0 for a in active)
    )
    assert ml.aggregated == pytest.approx(sum(len(s) >= 2 for s in layers_of.values()) / len(layers_of))
    # aggregating over tokens can only add layers: a latent at >= 2 layers at some token is counted as such
    # (the two FRACTIONS need not be ordered: on Gemma, per-token pooled 0.64 > aggregated 0.53 for one prompt)
    assert round(ml.aggregated * len(layers_of)) >= max(multi)
    assert sorted(r.latents.ids) == sorted(layers_of)
    assert r.latents.mean_layer == sorted(r.latents.mean_layer)


def test_prompt_user_errors(gsae, neox_dir, tmp_path):
    from harvest.models import load_tokenizer, resolve_model

    tok = load_tokenizer(resolve_model(str(neox_dir)))
    with pytest.raises(PromptError, match="empty"):
        tokenize_prompt("  ", tok, False)
    with pytest.raises(PromptError, match="shorten it"):
        tokenize_prompt(PROMPT * 20, tok, False, max_tokens=32)
    with pytest.raises(RunError, match="train run"):
        run_prompt(tmp_path, PROMPT, out_dir=tmp_path, device="cpu", show=False)
    with pytest.raises(CacheError, match="not a cache"):  # the cache given, as every analysis says it (train/inputs.py)
        run_prompt(gsae, PROMPT, out_dir=tmp_path, device="cpu", cache=tmp_path / "gone", show=False)
    moved = tmp_path / "moved"  # the run's recorded cache is gone: the run's own error names --cache
    shutil.copytree(gsae, moved)
    record = json.loads((moved / "config.json").read_text())
    record["cache"]["path"] = str(tmp_path / "gone")
    (moved / "config.json").write_text(json.dumps(record))
    with pytest.raises(RunError, match="--cache"):
        run_prompt(moved, PROMPT, out_dir=tmp_path, device="cpu", show=False)


# ---------------------------------------------------------------------------------------------
# report


def test_report_over_the_real_analyses(gcache, gsae, neox_dir, tmp_path):
    """Every analysis of this package into one folder, then one report: all figures and headlines in it."""
    from analyze.delta_ce import run_delta_ce
    from analyze.layers import run_variance
    from analyze.reconstruction import run_reconstruction

    out = tmp_path / "analysis"
    single = tmp_path / "single"
    train(
        [
            TrainConfig(
                cache=str(gcache),
                out=str(single),
                layers="1",
                expansion_factor=4,
                k=4,
                batch_tokens=256,
                eval_tokens=256,
                round_chunks=2,
                tokens=256 * 2,
                lr=3e-3,
                device="cpu",
            )
        ],
        show_progress=False,
    )
    var = run_variance(
        gsae, gcache, 400, out, reference_formulas=True, reference_batch_tokens=128, device="cpu", progress=False
    )
    rec = run_reconstruction([gsae, single], out_dir=out, device="cpu")
    dce = run_delta_ce(gsae, tokens=64, out_dir=out, device="cpu")
    run_resid(gcache, out)
    run_mmcs(gsae, out)
    pr = run_prompt(gsae, PROMPT, out_dir=out, device="cpu", show=False)
    provenance([gsae, single], gcache).save(out)
    doc = report_folder(out).read_text()
    pngs = list(out.glob("*.png"))
    assert len(pngs) >= 6 and len(re.findall(r'src="data:image/png;base64,', doc)) == len(pngs)
    assert "Other figures" not in doc  # every figure found its section
    fmt = lambda v: f"{v:.4g}"
    for v in [
        var.variances.ratio_token,
        var.reference.rel_var_t,
        var.multi_layer.per_token_pooled,
        dce.delta_ce_mean,
        rec.runs[0].held_out.fvu_mean,
        rec.runs[0].held_out.l0[1],
        pr.multi_layer.aggregated,
    ]:
        assert fmt(v) in doc
    assert str(gsae) in doc and open_cache(gcache).fingerprint[:16] in doc  # provenance
    claims = doc.split("Claims checked")[1].split("<h2 id=provenance>")[0]
    for claim in [
        "held-out FVU",
        "diagonal",
        "off-diagonal",
        "delta CE",
        "over the cache",
        "one prompt",
        "Adjacent layers",
        "norm grows",
        "(not a proper variance)",
    ]:
        assert claim in claims


def test_analyze_report_cli_writes_every_typed_result_and_the_html(gcache, gsae, tmp_path, capsys):
    from analyze.results import load_analyses

    out = tmp_path / "report"
    args = ["--sae", gsae, "--reference-formulas", "--tokens", 600, "--delta-ce-tokens", 64, "--prompt", PROMPT]
    code, printed, _ = run_cli(["report", *args, "--device", "cpu", "--out", out], capsys, "analyze")
    assert code == 0
    assert "reference code's formulas" in printed and "report" in printed
    a = load_analyses(out)
    assert a.latent_browser is None  # no `analyze examples` here
    for r in (a.provenance, a.variance, a.reconstruction, a.training, a.delta_ce, a.resid, a.mmcs, a.prompt):
        assert r is not None
    # the training curve is train's heldout.csv: its last point is the final held-out evaluation
    (curve,) = a.training.curves
    final = load_run(gsae).summary()["held_out"]
    assert len(curve.tokens) >= 2 and curve.fvu_mean[-1] == pytest.approx(final["fvu_mean"], rel=1e-5)
    # with the reference formulas the tokens are whole windows: 600 rounded up to the window holding the 600th
    assert a.variance.tokens_requested == 600 <= a.variance.tokens < 600 + CACHE["context"]
    assert a.variance.reference is not None and a.variance.reference.batch_tokens == 2048
    assert a.provenance.runs[0].folder == str(gsae) and a.provenance.cache.fingerprint == open_cache(gcache).fingerprint
    doc = (out / "report.html").read_text()
    assert doc.count("<h2 id=") == 9  # claims + 8 sections


def test_report_of_a_legacy_run_leaves_out_delta_ce_in_one_line_and_no_stale_result(gcache, gsae, tmp_path, capsys):
    """A run of the first releases (held out: the cache's last chunks, no whole window) still gets a report;
    delta CE, which needs whole held-out windows, is left out with its reason, and the delta_ce.json of an
    earlier report does not pass for this one's."""
    import shutil

    from analyze.results import load_analyses
    from train.split import HeldOut

    legacy = tmp_path / "legacy"
    shutil.copytree(gsae, legacy, ignore=shutil.ignore_patterns("analysis"))
    record = load_run(legacy)
    sae = record.load_sae()
    record.heldout = HeldOut.legacy([7], 128)  # one shuffled chunk: no window lies wholly in it
    record.save_with_weights(sae)  # as training would have written it
    out = tmp_path / "report"
    out.mkdir()
    (out / "delta_ce.json").write_text("{}")  # stale, and even of an older format
    args = ["--sae", legacy, "--tokens", 300, "--delta-ce-tokens", 64, "--prompt", PROMPT, "--device", "cpu"]
    code, _, err = run_cli(["report", *args, "--out", out], capsys, "analyze")
    assert code == 0, err
    assert "delta CE left out of the report: the run holds out no whole context window" in " ".join(err.split())
    a = load_analyses(out)
    assert a.delta_ce is None and a.reconstruction.held_out_set.method == "legacy-chunks"
    assert 100 < a.reconstruction.tokens <= 128 and "last 1 chunks" in a.provenance.runs[0].held_out
    doc = (out / "report.html").read_text()
    assert "Downstream loss" not in doc and "legacy split: their windows were partly trained on)" in doc.split("<h2")[1]
