"""Typed analysis results: save/load round trips, strict loading, and a report and a comparison that
read every headline through the types (a renamed field breaks a test, never a report row)."""

from __future__ import annotations

import csv
import dataclasses
import html
import json
import math
import re
from pathlib import Path

import pytest
from helpers import run_cli

from analyze.claims import Claim, claims
from analyze.compare import CompareError, compare_folders, format_compare
from analyze.report import report_folder
from analyze.results import (
    RESULT_TYPES,
    Analyses,
    CacheInfo,
    Comparison,
    DeltaCeResult,
    ExamplesSummary,
    HeldOutCurve,
    LayerComparison,
    LayerVariances,
    MmcsResult,
    MultiLayer,
    PromptLatents,
    PromptResult,
    PromptToken,
    Provenance,
    ReconstructionResult,
    ReferenceFormulas,
    ResidResult,
    ResultError,
    RunInfo,
    RunReconstruction,
    TopLatent,
    TrainingResult,
    VarianceResult,
    WindowSource,
    format_value,
    load_analyses,
)
from train.evaluate import EvalResult
from train.split import HeldOut

LAYERS = [0, 1, 2]


def _png(path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(2, 1))
    ax.plot([0, 1], [1, 0])
    fig.savefig(path, dpi=40)
    plt.close(fig)


def example_results(scale: float = 1.0) -> list:
    """One result of every type, with distinctive numbers (scaled, for a second folder to compare)."""
    s = scale
    held = EvalResult(
        tokens=8181,
        layers=LAYERS,
        fvu=[0.0741 * s, 0.0472 * s, 0.0433 * s],
        fvu_feature=[0.0991 * s, 1.0713 * s, 0.7514 * s],
        mse=[12.34, 23.45, 34.56],
        l0=[31.17, 30.93, 29.88],
        silent_on_heldout=[0.0123, 0.0234, 0.0345],
        firing_density=[0.00611, 0.00604, 0.00583],
        fvu_mean=0.05487 * s,
        fvu_feature_mean=0.6406 * s,
        silent_on_heldout_all_layers=0.00456,
    )
    single = dataclasses.replace(
        held,
        layers=[1],
        fvu=[0.0388],
        fvu_feature=[0.8123],
        mse=[9.87],
        l0=[31.5],
        silent_on_heldout=[0.0567],
        firing_density=[0.00622],
        fvu_mean=0.0388,
        fvu_feature_mean=0.8123,
        silent_on_heldout_all_layers=0.0567,
    )
    single_row = dataclasses.replace(
        held, fvu=[0.5123, 0.0388, 0.6234], fvu_feature=[1.1, 0.8123, 1.3], mse=[1.0, 9.87, 3.0], fvu_mean=0.3915
    )
    comparison = Comparison(
        mlsae="MLSAE",
        per_layer=[
            LayerComparison(0, 0.0741 * s, None, 0.5123, 1),
            LayerComparison(1, 0.0472 * s, 0.0388, None, None),
            LayerComparison(2, 0.0433 * s, None, 0.6234, 1),
        ],
        mlsae_over_diagonal_mean=1.2165 * s,
        mlsae_beats_off_diagonal=2,
        off_diagonal_compared=2,
    )
    variances = LayerVariances(23.81, 2.7143, 2.0736 * s, 0.11399, 0.76395 * s)
    multi = MultiLayer(0.5876, 0.6021, 0.99812, 5110, 5100, 40902, 87.65)
    where = dict(model="gemma-3-270m", cache="caches/x", lens=None, layers=LAYERS)  # shared by several results
    return [
        Provenance(
            cache=CacheInfo(
                "caches/x",
                "gemma-3-270m",
                "sotu",
                40960,
                1024,
                LAYERS,
                640,
                "bfloat16",
                "resid_post",
                "exclude",
                True,
                "none",
                "ab" * 32,
            ),
            runs=[
                RunInfo("runs/mlsae", "MLSAE", LAYERS, 5120, 32, 96, 98304, "exclude", "windows, seed 0"),
                RunInfo("runs/l1", "L1", [1], 5120, 32, 96, 98305, "exclude", "windows, seed 0"),
            ],
            created="2026-11-20 10:00 UTC",
        ),
        VarianceResult(
            tokens=40902,
            tokens_requested=1_000_000,
            layers=LAYERS,
            n_latents=5120,
            k=32,
            variances=variances,
            multi_layer=multi,
            reference=ReferenceFormulas(0.3456, 0.004321, 0.3512, 0.98406, 0.012503, 19, 2048, 38912, "ref code"),
            special_tokens="exclude",
            sae="runs/mlsae",
            cache="caches/x",
            cache_fingerprint="ab" * 32,
            lens=None,
            seed=0,
            device="cpu",
            world_size=1,
            seconds=37.5,
            tokens_per_s=1090.7,
            figures=["layer_heatmap.png"],
        ),
        ReconstructionResult(
            cache="caches/x",
            fingerprint="ab" * 32,
            model="gemma-3-270m",
            lens=None,
            held_out_set=HeldOut("documents", 0, [3, 17], 2048, [0, 1]),
            tokens=8181,
            special_tokens="exclude",
            layers=LAYERS,
            runs=[
                RunReconstruction("MLSAE", "runs/mlsae", LAYERS, True, 5120, 32, held, held),
                RunReconstruction("L1", "runs/l1", [1], False, 5120, 32, single, single_row),
            ],
            comparison_fvu=comparison,
            comparison_fvu_feature=comparison,
            figures=["reconstruction.png"],
        ),
        TrainingResult(
            curves=[
                HeldOutCurve(
                    "MLSAE",
                    "runs/mlsae",
                    LAYERS,
                    [0, 32768, 65536, 98304],
                    [0.389, 0.0712, 0.0551, 0.05487],
                    [3.84, 0.91, 0.7, 0.6406],
                    [[0.4, 0.4, 0.367]] * 4,
                ),
            ],
            figures=["heldout_fvu.png"],
        ),
        DeltaCeResult(
            run="runs/mlsae",
            hook="blocks.{l}.hook_resid_post",
            **where,
            tokens=1019,
            clean_ce=3.7123,
            ce=[8.01, 7.02, 6.03],
            delta_ce=[4.2977, 3.3077, 2.3177],
            kl=[4.5611, 3.5622, 2.5633],
            delta_ce_mean=4.3745 * s,
            kl_mean=4.5712,
            windows=1,
            context=1024,
            positions=1024,
            special_tokens="exclude",
            window_source=WindowSource("heldout", [3, 17], None, 1.0, 2),
            seconds=168.0,
            figures=["delta_ce.png"],
        ),
        ResidResult(
            hook="resid_post",
            tokens=40902,
            **where,
            pairs=[[0, 1], [1, 2]],
            cosine_centered=[0.2713, 0.9217],
            cosine_uncentered=[0.5, 0.95],
            norm_mean=[176.3, 1234.5, 41612.0],
            norm_growth=236.03,
            figures=["resid_norm.png"],
        ),
        MmcsResult(sae="runs/mlsae", n_latents=5120, mmcs=0.16612, max_cosine_quantiles={"0.5": 0.15}),
        PromptResult(
            text="The President <b>spoke</b>",
            sae="runs/mlsae",
            hook="resid_post",
            prepend_bos=True,
            n_latents=5120,
            k=32,
            **where,
            n_tokens=3,
            n_tokens_used=2,
            variances=dataclasses.replace(variances, ratio_token=0.91614),
            multi_layer=dataclasses.replace(multi, per_token_pooled=0.63712, aggregated=0.52488),
            tokens=[
                PromptToken(0, 2, "<bos>", True, 10, 9, []),
                PromptToken(1, 651, "The", False, 40, 25, [TopLatent(4242, 12.5, [0, 1], [6.0, 6.5])]),
                PromptToken(2, 4565, " President", False, 41, 26, []),
            ],
            latents=PromptLatents([4242], [0.52], [0.25], [2]),
            figures=["prompt.png"],
        ),
        ExamplesSummary("runs/mlsae", "latents/browser/index.html", tokens=40902, latents=5077, examples_per_latent=20),
    ]


def write_example_folder(folder: Path, scale: float = 1.0) -> list:
    folder.mkdir(parents=True, exist_ok=True)
    results = example_results(scale)
    for r in results:
        r.save(folder)
        for f in r.figures:
            _png(folder / f)
    _png(folder / "mystery.png")  # a figure no result names: "Other figures"
    return results


# ---------------------------------------------------------------------------------------------
# the types


def test_every_result_type_round_trips_through_its_file(tmp_path):
    results = write_example_folder(tmp_path)
    assert sorted(type(r).__name__ for r in results) == sorted(t.__name__ for t in RESULT_TYPES)
    for r in results:
        assert type(r).load(tmp_path) == r
        saved = json.loads((tmp_path / r.FILE).read_text())
        assert saved["kind"] == r.KIND and saved["version"] == 2
    a = load_analyses(tmp_path)
    assert [type(r) for r in a.present()] == list(RESULT_TYPES)


def test_reconstruction_results_and_summaries_written_with_the_old_dead_names_still_load(tmp_path):
    """The per-layer "dead" fraction of a held-out evaluation is now `silent_on_heldout` (never fires at that
    layer on held-out tokens; not the training dead counter); files with the old names still load."""
    rec = next(r for r in example_results() if isinstance(r, ReconstructionResult))
    rec.save(tmp_path)
    text = (tmp_path / rec.FILE).read_text()
    old = text.replace('"silent_on_heldout_all_layers"', '"dead_fraction"').replace(
        '"silent_on_heldout"', '"dead_fraction_per_layer"'
    )
    assert old != text and "silent" not in old
    (tmp_path / rec.FILE).write_text(old)
    assert ReconstructionResult.load(tmp_path) == rec
    h = rec.runs[0].held_out.to_dict()
    legacy = {{"silent_on_heldout": "dead_fraction_per_layer"}.get(k, k): v for k, v in h.items()}
    legacy["dead_fraction"] = legacy.pop("silent_on_heldout_all_layers")
    assert EvalResult.from_dict(legacy) == rec.runs[0].held_out


def test_nan_is_written_as_null_and_read_back_as_nan(tmp_path):
    v = example_results()[1]
    v.variances.ratio_token = math.nan
    v.save(tmp_path)
    assert json.loads((tmp_path / "variance.json").read_text())["variances"]["ratio_token"] is None
    assert math.isnan(VarianceResult.load(tmp_path).variances.ratio_token)


@pytest.mark.parametrize(
    "edit, message",
    [
        (
            lambda d: d["variances"].update(ratio_tok=d["variances"].pop("ratio_token")),
            "unknown field variances.ratio_tok",
        ),
        (lambda d: d["multi_layer"].pop("aggregated"), "missing field multi_layer.aggregated"),
        (lambda d: d.update(tokens="many"), "tokens = 'many' should be of type int"),
        (lambda d: d.update(version=1), "rerun `analyze variance`"),
        (lambda d: d.update(version=3), "update mlsae-cache"),
        (lambda d: d.update(kind="resid"), "holds a 'resid' result"),
        (lambda d: d.pop("kind"), "older version of the analyses"),
    ],
)
def test_a_renamed_missing_or_mistyped_field_is_one_line_naming_it(edit, message, tmp_path):
    example_results()[1].save(tmp_path)
    data = json.loads((tmp_path / "variance.json").read_text())
    edit(data)
    (tmp_path / "variance.json").write_text(json.dumps(data))
    for load in (lambda: VarianceResult.load(tmp_path), lambda: report_folder(tmp_path)):
        with pytest.raises(ResultError, match=re.escape(message)) as e:
            load()
        assert "\n" not in str(e.value) and "variance.json" in str(e.value)
    assert not (tmp_path / "report.html").exists()


def test_an_untyped_folder_of_the_previous_version_asks_for_a_rerun(tmp_path):
    (tmp_path / "delta_ce.json").write_text(json.dumps({"delta_ce_mean": 0.5, "layers": [0]}))
    with pytest.raises(ResultError, match=r"rerun `analyze delta-ce`"):
        load_analyses(tmp_path)
    (tmp_path / "delta_ce.json").write_text("{not json")
    with pytest.raises(ResultError, match="not readable JSON"):
        load_analyses(tmp_path)


# ---------------------------------------------------------------------------------------------
# the report


def test_report_shows_every_headline_of_every_result_with_its_value(tmp_path):
    results = write_example_folder(tmp_path)
    doc = report_folder(tmp_path).read_text()
    for r in results:
        section = doc.split(f"<h2 id={r.KIND}>")[1].split("<h2 ")[0]
        heads = r.headlines()
        assert heads, type(r).__name__
        for h in heads:
            row = f"<tr><td>{html.escape(h.label)}</td><td class=n>{html.escape(format_value(h.value))}</td></tr>"
            assert row in section, (type(r).__name__, h.label)
    # self-contained: every PNG embedded, nothing fetched from elsewhere; the browser link is relative
    assert len(re.findall(r'src="data:image/png;base64,[A-Za-z0-9+/=]+"', doc)) == len(list(tmp_path.glob("*.png")))
    assert not re.search(r"""(src|href)=["']?(https?:|//|file:)""", doc) and "<link" not in doc and "<script" not in doc
    assert "href='latents/browser/index.html'" in doc and "Other figures" in doc and "mystery.png" in doc
    assert "The President &lt;b&gt;spoke&lt;/b&gt;" in doc  # prompt text escaped
    # per-layer dead fraction, L0 and firing density of the held-out evaluation
    recon = doc.split("<h2 id=reconstruction>")[1]
    for v in ["0.0123", "0.0234", "0.0345", "31.17", "0.00611", "0.00583"]:
        assert f"<td class=n>{v}</td>" in recon
    # the proper and the reference-formula ratios side by side, the latter labelled as no variance
    var = doc.split("<h2 id=variance>")[1].split("<h2 ")[0]
    assert "<td>E[Var(L|J,T)] / E[Var(L|J)]</td><td class=n>0.764</td><td class=n>0.0125</td>" in var
    assert "NOT a proper variance" in var


def test_claims_come_from_the_typed_results(tmp_path):
    write_example_folder(tmp_path)
    rows = {c.claim: c for c in claims(load_analyses(tmp_path))}
    token = rows["The layer index varies >10x less within a token: E[Var(L|J,T)]/E[Var(L|J)] (over the cache's tokens)"]
    assert token.ours.startswith("0.764") and token.reference.startswith("0.0125")
    assert token.verdict.startswith("not supported (0.764 > 0.1; below 1 is automatic")
    assert "reproduces the claim where the proper variance does not" in token.would_change
    prompt = rows["The layer index varies >10x less within a token: E[Var(L|J,T)]/E[Var(L|J)] (one prompt)"]
    assert prompt.ours.startswith("0.9161") and prompt.reference == ""
    diag = rows["MLSAE ~ single-layer SAE on that SAE's own layer (diagonal)"]
    assert "1.216" in diag.ours and diag.verdict.startswith("supported")
    assert (
        rows["MLSAE better than single-layer SAEs on the other layers (off-diagonal)"].verdict
        == "supported (2/2 layers)"
    )
    fvu = rows["A multi-layer SAE reconstructs well (held-out FVU, mean over layers)"]
    assert fvu.verdict.startswith("partly: <= 0.106 on the poster's definition only; per feature 0.6406")
    assert "has flattened (0.4% drop" in fvu.would_change
    assert "gemma-3-270m, R=8, k=32, 98,304 training tokens" in fvu.ours and "R=64, k=32, 1B" in fvu.poster
    assert rows["Splicing in reconstructions costs little loss (mean delta CE over layers)"].verdict.startswith(
        "not supported"
    )
    assert rows["Residual norm grows with depth"].verdict.startswith("supported")
    assert rows["Adjacent layers' residuals are similar (cosine of layer-mean-centered vectors)"].verdict.startswith(
        "supported"
    )
    assert all(c.would_change for c in rows.values())


def _claims_of(ratio=0.76, fvu=(0.05, 0.64), delta_ce=4.37, curve=(0.0551, 0.05487)) -> dict[str, Claim]:
    """The claims of the example results with constructed numbers (curve: the last two held-out FVUs,
    None for no curve)."""
    folder = Analyses(Path("."))
    for r in example_results():
        setattr(folder, r.KIND, r)
    folder.variance.variances = dataclasses.replace(folder.variance.variances, ratio_token=ratio)
    folder.prompt = None
    h = folder.reconstruction.runs[0].held_out
    folder.reconstruction.runs[0].held_out = dataclasses.replace(h, fvu_mean=fvu[0], fvu_feature_mean=fvu[1])
    folder.delta_ce.delta_ce_mean = delta_ce
    if curve is None:
        folder.training = None
    else:
        folder.training.curves[0].fvu_mean[-2:] = list(curve)
    return {c.claim.split(" (")[0].split(":")[0]: c for c in claims(folder)}


def test_each_verdict_band_is_hit_by_constructed_numbers():
    token = "The layer index varies >10x less within a token"
    fvu = "A multi-layer SAE reconstructs well"
    dce = "Splicing in reconstructions costs little loss"
    # the per-token variance ratio: supported only at <= 0.1; below 1 is automatic, not support
    assert _claims_of(ratio=0.1)[token].verdict.startswith("supported (0.1 <= 0.1)")
    assert _claims_of(ratio=0.05)[token].verdict_class() == "ok"
    mid = _claims_of(ratio=0.5)[token]
    assert mid.verdict.startswith("not supported (0.5 > 0.1; below 1 is automatic") and mid.verdict_class() == "no"
    assert _claims_of(ratio=1.2)[token].verdict == "not supported (1.2)"
    # FVU on the poster's definition against its worst (0.106), the per-feature FVU beside it
    assert _claims_of(fvu=(0.2, 0.3))[fvu].verdict.startswith("not supported (0.2 > 0.106")
    assert _claims_of(fvu=(0.05, 0.08))[fvu].verdict.startswith("supported (<= 0.106 on the poster's definition and")
    assert _claims_of(fvu=(0.05, 0.5))[fvu].verdict.startswith("partly: <= 0.106 on the poster's definition only")
    assert _claims_of(delta_ce=0.3)[dce].verdict.startswith("supported (<= 0.565")
    assert _claims_of(delta_ce=0.7)[dce].verdict.startswith("not supported (> 0.565")
    # not converged: every claim about the SAE is inconclusive, with what the numbers say now; the
    # residual-geometry claims (the model's) are not
    falling = _claims_of(ratio=0.05, curve=(0.07, 0.055))
    assert falling[token].verdict.startswith("inconclusive (still training; the numbers now: supported (0.05")
    assert falling[token].verdict_class() == "meh"
    assert "training until the held-out FVU flattens (< 2% drop" in falling[fvu].would_change
    assert "21.4% drop" in falling[fvu].would_change
    assert all(falling[k].verdict.startswith("inconclusive (still training") for k in (fvu, dce, token))
    assert falling["Residual norm grows with depth"].verdict.startswith("supported")
    unknown = _claims_of(curve=None)
    assert unknown[fvu].verdict.startswith("inconclusive (convergence unknown; the numbers now: partly")
    assert "no held-out curve" in unknown[fvu].would_change


# ---------------------------------------------------------------------------------------------
# analyze compare


def test_compare_puts_headlines_and_claims_side_by_side(tmp_path, capsys):
    a, b, empty = tmp_path / "quick" / "analysis", tmp_path / "scale" / "analysis", tmp_path / "empty"
    write_example_folder(a)
    write_example_folder(b, scale=0.1)
    (b / "prompt.json").unlink()  # a result present in one folder only
    empty.mkdir()
    res = compare_folders([a, b])
    assert res.labels == ["quick", "scale"]
    rows = {(r.section, r.label): r.values for r in res.rows}
    assert rows[("cache", "tuned lens")] == ["none", "none"]
    assert rows[("variance", "E[Var(L|J,T)] / E[Var(L|J)]")] == pytest.approx([0.76395, 0.076395])
    assert rows[("variance", "E[Var(L|J,T)] / E[Var(L|J)], reference formula (not a variance)")] == [0.012503] * 2
    assert rows[
        ("reconstruction", "MLSAE: never fires at a layer on held-out tokens, mean over layers")
    ] == pytest.approx([0.0234] * 2)
    assert rows[("prompt", "E[Var(L|J,T)] / E[Var(L|J)] (this prompt)")] == [0.91614, None]
    claim = {r.label: r.values for r in res.claims}
    cell = claim["The layer index varies >10x less within a token: E[Var(L|J,T)]/E[Var(L|J)] (over the cache's tokens)"]
    assert cell[0].startswith("0.764") and "[not supported" in cell[0] and "[supported" in cell[1]
    for bad in ([a, empty], [a, tmp_path / "missing"]):
        with pytest.raises(CompareError):
            compare_folders(bad)
    with pytest.raises(CompareError, match="one --label per folder"):
        compare_folders([a, b], ["only one"])
    assert "| variance | E[Var(L\\|J)] / Var(L) | 0.114 | 0.114 |" in format_compare(res)

    code, printed, _ = run_cli(["compare", a, b, "--out", tmp_path / "cmp"], capsys, "analyze")
    assert code == 0
    assert "| variance | E[Var(L\\|J,T)] / E[Var(L\\|J)] | 0.764 | 0.0764 |" in printed
    assert (tmp_path / "cmp" / "compare.md").read_text().startswith("| section | number | quick | scale |")
    with open(tmp_path / "cmp" / "compare.csv") as f:
        table = list(csv.reader(f))
    assert table[0] == ["section", "number", "quick", "scale"] and any(r[0] == "claims" for r in table)
    assert json.loads((tmp_path / "cmp" / "compare.json").read_text())["labels"] == ["quick", "scale"]


# ---------------------------------------------------------------------------------------------
# training curves from the runs' heldout.csv


def test_training_curves_read_heldout_csv_and_refuse_a_malformed_one(tmp_path):
    from analyze.training import read_curve, run_training

    run, bare = tmp_path / "run", tmp_path / "bare"
    run.mkdir()
    bare.mkdir()
    rows = [[8192, 0.08, 0.9, 0.1, 0.06], [0, 0.4, 3.8, 0.5, 0.3], [16384, 0.05, 0.7, 0.06, 0.04]]
    with open(run / "heldout.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["tokens", "fvu_mean", "fvu_feature_mean", "fvu_layer_0", "fvu_layer_2"])
        w.writerows(rows)
    c = read_curve(run, "MLSAE", [0, 2])
    assert c.tokens == [0, 8192, 16384] and c.fvu_mean == [0.4, 0.08, 0.05]  # sorted by tokens
    assert c.fvu == [[0.5, 0.3], [0.1, 0.06], [0.06, 0.04]] and c.fvu_feature_mean[-1] == 0.7
    assert c.last_quarter_drop() == pytest.approx((0.08 - 0.05) / 0.08)
    assert read_curve(bare, "L1", [1]) is None

    out = tmp_path / "analysis"
    t = run_training([(run, "MLSAE", [0, 2]), (bare, "L1", [1])], out)
    assert [x.label for x in t.curves] == ["MLSAE"] and TrainingResult.load(out) == t
    assert (out / "heldout_fvu.png").read_bytes()[:4] == b"\x89PNG"
    assert run_training([(bare, "L1", [1])], tmp_path / "none") is None and not (tmp_path / "none").exists()

    with pytest.raises(ResultError, match="one FVU per layer of the run") as e:
        read_curve(run, "MLSAE", [0, 1, 2])  # a layer more than the file has
    assert "\n" not in str(e.value) and "heldout.csv" in str(e.value)
    (run / "heldout.csv").write_text("tokens,fvu_mean,fvu_feature_mean,fvu_layer_0,fvu_layer_2\n0,x,1,1,1\n")
    with pytest.raises(ResultError, match="not a number"):
        read_curve(run, "MLSAE", [0, 2])


def test_the_report_links_the_latent_browser_of_analyze_examples(tmp_path):
    from analyze.report import BROWSER_INDEX, find_browser

    run, folder = tmp_path / "run", tmp_path / "run" / "analysis"
    folder.mkdir(parents=True)
    assert find_browser(folder, run) is None and not (folder / "latent_browser.json").exists()
    (run / BROWSER_INDEX).parent.mkdir(parents=True)
    (run / BROWSER_INDEX).write_text("<html></html>")
    doc = report_folder(folder, sae_dirs=[run]).read_text()  # finds it, and records it for `analyze compare`
    assert "href='../latents/browser/index.html'" in doc
    found = ExamplesSummary.load(folder)
    assert found.browser == "../latents/browser/index.html" and (folder / found.browser).is_file()
    assert found.tokens is None and find_browser(folder, run) == found
