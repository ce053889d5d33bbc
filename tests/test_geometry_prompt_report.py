"""Residual geometry (cosines, norms, MMCS), one-prompt analysis, and the HTML report."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import pytest
import torch

from analyze.geometry import max_cosine, mmcs, run_resid
from analyze.prompt import PromptError, prompt_stats, run_prompt, tokenize_prompt
from analyze.report import collect_sections, report_folder, write_report
from harvest import open_cache
from harvest.run import harvest
from harvest.spec import CacheSpec
from train.config import TrainConfig
from train.loop import train
from train.record import RunError

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

    r = run_resid(gcache, tmp_path, sae_dir=gsae)
    assert r["tokens"] == int(keep.sum()) and r["layers"] == [0, 1, 2] and r["pairs"] == [[0, 1], [1, 2]]
    assert r["cosine_centered"] == pytest.approx(want_c, abs=1e-4)
    assert r["cosine_uncentered"] == pytest.approx(want_u, abs=1e-4)
    assert r["norm_mean"] == pytest.approx(want_n, rel=1e-5)
    assert r["norm_growth"] == pytest.approx(want_n[-1] / want_n[0], rel=1e-5)
    from train import load_sae

    assert r["mmcs"]["mmcs"] == pytest.approx(mmcs(load_sae(gsae).W_dec.detach()), abs=1e-6)
    assert json.loads((tmp_path / "resid.json").read_text())["cosine_centered"] == r["cosine_centered"]
    for f in r["figures"]:
        assert (tmp_path / f).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # a token budget reads exactly that many kept tokens
    assert run_resid(gcache, tmp_path / "small", tokens=100, figures=False)["tokens"] == 100


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
    assert ml["per_token_pooled"] == pytest.approx(1 / 3)  # (1 + 0) / (2 + 1), special token left out
    assert ml["per_token_mean"] == pytest.approx((1 / 2 + 0) / 2)
    assert ml["aggregated"] == pytest.approx(1 / 2)  # 7 of {3, 7}
    assert acc.mass[7].tolist() == [1.0, 1.0, 2.0] and acc.mass[9].sum() == 0 and acc.mass[5].sum() == 0
    # total mass 6; latent 7: P = (1/4, 1/4, 1/2); per (token, latent) only (1, 7) spreads: Var 1/4, mass 2
    p7 = torch.tensor([0.25, 0.25, 0.5], dtype=torch.float64)
    l = torch.arange(3.0, dtype=torch.float64)
    var7 = float(p7 @ l**2 - (p7 @ l) ** 2)
    v = acc.variances()
    assert v["exp_var_l_given_j"] == pytest.approx(4 / 6 * var7)
    assert v["exp_var_l_given_jt"] == pytest.approx(2 / 6 * 0.25)
    assert v["ratio_token"] == pytest.approx((2 / 6 * 0.25) / (4 / 6 * var7))


def test_prompt_writes_outputs_and_multi_layer_fraction_is_a_direct_count(gcache, gsae, neox_dir, tmp_path, capsys):
    r = run_prompt(gsae, PROMPT, out_dir=tmp_path, device="cpu")
    printed = capsys.readouterr().out
    assert "latents per token" in printed and "aggregated" in printed
    assert (tmp_path / "prompt.png").read_bytes()[:4] == b"\x89PNG"
    saved = json.loads((tmp_path / "prompt.json").read_text())
    assert saved["multi_layer"] == r["multi_layer"] and saved["tokens"] == r["tokens"]

    # the tokenization of the cache: EOS (document separator) + text, no BOS for this tokenizer
    from harvest.models import load_bridge, load_tokenizer, resolve_model
    from harvest.run import forward_layers
    from train import load_sae

    source = resolve_model(str(neox_dir))
    tok = load_tokenizer(source)
    ids = [tok.eos_token_id] + tok(PROMPT, add_special_tokens=False).input_ids
    assert [t["id"] for t in r["tokens"]] == ids
    assert r["tokens"][0]["special"] and not any(t["special"] for t in r["tokens"][1:])

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
    assert [t["n_active"] for t in r["tokens"][1:]] == active
    assert [t["n_multi"] for t in r["tokens"][1:]] == multi
    ml = r["multi_layer"]
    assert ml["per_token_pooled"] == pytest.approx(sum(multi) / sum(active))
    assert ml["per_token_mean"] == pytest.approx(
        sum(m / a for m, a in zip(multi, active) if a) / sum(a > 0 for a in active)
    )
    assert ml["aggregated"] == pytest.approx(sum(len(s) >= 2 for s in layers_of.values()) / len(layers_of))
    # aggregating over tokens can only add layers: a latent at >= 2 layers at some token is counted as such
    # (the two FRACTIONS need not be ordered: on Gemma, per-token pooled 0.64 > aggregated 0.53 for one prompt)
    assert round(ml["aggregated"] * len(layers_of)) >= max(multi)
    assert sorted(r["latents"]["ids"]) == sorted(layers_of)
    assert r["latents"]["mean_layer"] == sorted(r["latents"]["mean_layer"])


def test_prompt_user_errors(gsae, neox_dir, tmp_path):
    from harvest.models import load_tokenizer, resolve_model

    tok = load_tokenizer(resolve_model(str(neox_dir)))
    with pytest.raises(PromptError, match="empty"):
        tokenize_prompt("  ", tok, False)
    with pytest.raises(PromptError, match="shorten it"):
        tokenize_prompt(PROMPT * 20, tok, False, max_tokens=32)
    with pytest.raises(RunError, match="train run"):
        run_prompt(tmp_path, PROMPT, out_dir=tmp_path, device="cpu", show=False)
    with pytest.raises(PromptError, match="--cache"):
        run_prompt(gsae, PROMPT, out_dir=tmp_path, device="cpu", cache=tmp_path / "gone", show=False)


# ---------------------------------------------------------------------------------------------
# report


def _png(path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(2, 1))
    ax.plot([0, 1], [1, 0])
    fig.savefig(path, dpi=40)
    plt.close(fig)


def test_report_is_self_contained_with_figures_numbers_and_claims(gcache, gsae, tmp_path):
    out = tmp_path / "analysis"
    run_resid(gcache, out, sae_dir=gsae)
    (out / "variance.json").write_text(
        json.dumps(
            {  # the layout of analyze/layers.py
                "tokens": 123456,
                "layers": [0, 1, 2],
                "var_l": 0.66,
                "exp_var_l_given_j": 0.47,
                "ratio_latent": 0.7123,
                "ratio_token": 0.04321,
                "multi_layer": {"per_token_mean": 0.25, "per_token_pooled": 0.2345, "aggregated": 0.8765},
                "reference_formulas": {"ratio_token_ref": 0.999},
                "figures": ["layer_heatmap.png"],
            }
        )
    )
    (out / "reconstruction.json").write_text(
        json.dumps(
            {  # the layout of analyze/reconstruction.py
                "layers": [0, 1, 2],
                "rows": ["MLSAE", "L1"],
                "fvu_matrix": [[0.11, 0.13, 0.17], [0.5, 0.12, 0.6]],
                "runs": [{"label": "MLSAE", "multi_layer": True, "held_out": {"fvu_mean": 0.1357}}],
                "comparison": {
                    "fvu": {
                        "mlsae_over_diagonal_mean": 1.0833,
                        "mlsae_beats_off_diagonal": 2,
                        "off_diagonal_compared": 2,
                    }
                },
            }
        )
    )
    (out / "delta_ce.json").write_text("{not json")  # a broken file is shown as such, not fatal
    for name in ["layer_heatmap.png", "reconstruction.png", "delta_ce.png", "mystery.png"]:
        _png(out / name)

    secs = collect_sections(out)
    assert set(secs) == {"variance", "reconstruction", "delta_ce", "resid", "other"}
    assert [p.name for p in secs["variance"]["figures"]] == ["layer_heatmap.png"]
    doc = report_folder(out, sae_dirs=[gsae]).read_text()
    assert len(re.findall(r'src="data:image/png;base64,[A-Za-z0-9+/=]+"', doc)) == len(list(out.glob("*.png"))) == 6
    assert not re.search(r'(src|href)="?(https?:|//|file:)', doc) and "<link" not in doc and "<script" not in doc
    for number in ["0.04321", "0.7123", "0.1357", "0.2345", "0.8765", "123,456", "1.08", "2/2 layers"]:
        assert number in doc
    assert "0.999" not in doc.split("Claims checked")[1].split("Provenance")[0]  # reference formulas: never a claim
    assert "E[Var(L|J,T)]/E[Var(L|J)]" in doc and "supported (&lt; 0.1)" in doc
    assert "could not read delta_ce.json" in doc
    assert str(gsae) in doc and open_cache(gcache).fingerprint[:16] in doc  # provenance
    resid = json.loads((out / "resid.json").read_text())
    assert f"{resid['cosine_centered'][0]:.4g}" in doc


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
    var = run_variance(gsae, gcache, 400, out, device="cpu", progress=False, log=lambda s: None)
    rec = run_reconstruction([gsae, single], out_dir=out, device="cpu")
    dce = run_delta_ce(gsae, tokens=64, out_dir=out, device="cpu")
    run_resid(gcache, out, sae_dir=gsae)
    pr = run_prompt(gsae, PROMPT, out_dir=out, device="cpu", show=False)
    doc = report_folder(out, sae_dirs=[gsae, single]).read_text()
    pngs = list(out.glob("*.png"))
    assert len(pngs) >= 6 and len(re.findall(r'src="data:image/png;base64,', doc)) == len(pngs)
    assert "Other figures" not in doc  # every figure found its section
    fmt = lambda v: f"{v:.4g}"
    for v in [
        var["ratio_token"],
        var["multi_layer"]["per_token_pooled"],
        dce["delta_ce_mean"],
        rec["runs"][0]["held_out"]["fvu_mean"],
        pr["multi_layer"]["aggregated"],
    ]:
        assert fmt(v) in doc
    claims = doc.split("Claims checked")[1].split("Provenance")[0]
    for claim in [
        "held-out mean FVU",
        "diagonal",
        "off-diagonal",
        "delta CE",
        "over the cache",
        "one prompt",
        "Adjacent layers",
        "norm grows",
    ]:
        assert claim in claims


def test_report_tolerates_missing_sections_and_unknown_keys(tmp_path):
    out = write_report(
        tmp_path / "r.html",
        {"prompt": {"data": {"text": "hi <b>", "weird": {"x": [1, 2]}}, "figures": []}, "custom": {"answer": 42}},
    )
    doc = out.read_text()
    assert "hi &lt;b&gt;" in doc and "weird.x" in doc and "42" in doc
    assert "no analysis with the numbers for a claim" in doc


def test_compare_puts_headline_numbers_side_by_side(tmp_path, capsys):
    from analyze.cli import main as analyze_main
    from analyze.compare import CompareError, compare_folders

    a, b, empty = tmp_path / "plain" / "analysis", tmp_path / "lens" / "analysis", tmp_path / "empty"
    for folder, ratio, lens in [(a, 0.11, None), (b, 0.05, {"source": "lenses/x", "params_sha256": "ab"})]:
        folder.mkdir(parents=True)
        (folder / "variance.json").write_text(json.dumps({"tokens": 100, "ratio_latent": ratio, "lens": lens}))
    (a / "delta_ce.json").write_text(json.dumps({"delta_ce_mean": 0.5}))
    empty.mkdir()
    res = compare_folders([a, b])
    assert res["labels"] == ["plain", "lens"]
    rows = {r["label"]: r["values"] for r in res["rows"]}
    assert rows["tuned lens"] == ["none", "lenses/x"]
    assert rows["E[Var(L|J)] / Var(L)"] == [0.11, 0.05] and rows["mean delta CE (nats)"] == [0.5, None]
    for bad in ([a, empty], [a, tmp_path / "missing"]):
        with pytest.raises(CompareError):
            compare_folders(bad)
    with pytest.raises(CompareError, match="one --label per folder"):
        compare_folders([a, b], ["only one"])

    import sys

    argv, sys.argv = sys.argv, ["analyze", "compare", str(a), str(b), "--out", str(tmp_path / "cmp")]
    try:
        analyze_main()
    except SystemExit as e:
        assert e.code in (0, None)
    finally:
        sys.argv = argv
    printed = capsys.readouterr().out
    assert "| variance | E[Var(L|J)] / Var(L) | 0.11 | 0.05 |" in printed
    assert (tmp_path / "cmp" / "compare.md").read_text().startswith("| section | number | plain | lens |")
    with open(tmp_path / "cmp" / "compare.csv") as f:
        assert next(csv.reader(f)) == ["section", "number", "plain", "lens"]
