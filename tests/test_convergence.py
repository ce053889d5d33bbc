"""analyze convergence: the numbers at each snapshot along training, and the seed spread as error bars."""

from __future__ import annotations

import csv
import json
import statistics

import pytest

from analyze.convergence import format_convergence, run_convergence, training_points
from analyze.results import ResultError, VarianceResult
from train.config import TrainConfig
from train.loop import train


def _train(cache, out, **kw):
    cfg = TrainConfig(
        cache=str(cache), out=str(out), expansion_factor=2, k=4, batch_tokens=128, eval_tokens=512, round_chunks=4
    )
    train([cfg.replace(**kw)], show_progress=False, log=lambda s: None)


def test_points_along_training_and_the_seed_spread_recompute(docs_cache, tmp_path):
    run, seed = tmp_path / "run", tmp_path / "seed1"
    _train(docs_cache, run, tokens=128 * 8, snapshot_tokens="256,512")
    _train(docs_cache, seed, tokens=128 * 4, seed=1)
    assert [p.name for p in training_points(run)] == ["tokens-000000256", "tokens-000000512", "run"]
    res = run_convergence(run, 10**9, tmp_path / "conv", seeds=[seed], log=lambda s: None)
    points = res["points"]
    assert [p["tokens"] for p in points] == [256, 512, 1024]
    for p, folder in zip(points, training_points(run)):
        var = VarianceResult.load(folder)  # written into each point's folder, with the reference's formulas
        summary = json.loads((folder / "summary.json").read_text())
        assert p["ratio_token"] == var.variances.ratio_token and p["ref_ratio_token"] == var.reference.rel_var_t
        assert (
            p["fvu"] == summary["held_out"]["fvu_mean"] and p["fvu_feature"] == summary["held_out"]["fvu_feature_mean"]
        )
    assert points[0]["fvu"] != points[-1]["fvu"]
    # the spread at 512 tokens: the run's snapshot there and the other seed
    [at] = res["seeds"]  # the one point all runs have
    spread = {s["quantity"]: s for s in at["spread"]}
    both = [points[1]["ratio_token"], VarianceResult.load(seed).variances.ratio_token]
    assert at["tokens"] == 512 and spread["ratio_token"]["n"] == 2
    assert spread["ratio_token"]["mean"] == pytest.approx(statistics.mean(both))
    assert spread["ratio_token"]["std"] == pytest.approx(statistics.stdev(both)) and spread["ratio_token"]["std"] > 0
    with open(tmp_path / "conv" / "convergence.csv") as f:
        rows = list(csv.reader(f))
    assert rows[0][:3] == ["tokens", "fvu", "fvu_feature"] and [r[0] for r in rows[1:]] == ["256", "512", "1024"]
    assert (tmp_path / "conv" / "convergence.png").stat().st_size > 1000
    assert "| 512, 2 seeds |" in format_convergence(res)
    # seeds must share a point with the run
    with pytest.raises(ResultError, match="--seeds must be runs with a point"):
        run_convergence(
            seed, 10**9, tmp_path / "bad", seeds=[run / "snapshots" / "tokens-000000256"], log=lambda s: None
        )
