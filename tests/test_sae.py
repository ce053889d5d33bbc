"""The TopK (ML)SAE and its objectives, on tiny shapes against dense reference computations."""

from __future__ import annotations

import math

import pytest
import torch

from train.objectives import DeadLatents, FvuAccumulator, auxk_loss, minibatch_fvu, training_loss
from train.sae import (
    SaeConfig,
    TopKSae,
    _SparseDecode,
    _TopKEncode,
    gather_rows,
    geometric_median,
    load_sae,
    row_dots,
    scatter_rows,
    standardize,
)

D, M, K = 12, 48, 4


def make_sae(seed: int = 0, k_aux: int = 6, dtype=torch.float64, **kw) -> TopKSae:
    cfg = SaeConfig(d_model=D, n_latents=M, k=K, k_aux=k_aux, **kw)
    sae = TopKSae(cfg, generator=torch.Generator().manual_seed(seed)).to(dtype)
    with torch.no_grad():
        sae.b_pre.normal_(0, 0.1, generator=torch.Generator().manual_seed(seed + 1))
        sae.W_enc.add_(0.3 * torch.randn(M, D, generator=torch.Generator().manual_seed(seed + 2), dtype=dtype))
    return sae


def data(*shape, seed: int = 0, dtype=torch.float64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return 3 * torch.randn(*shape, generator=g, dtype=dtype) + torch.randn(shape[-1], generator=g, dtype=dtype)


def dense_reference(sae: TopKSae, x: torch.Tensor, dead_mask: torch.Tensor | None = None):
    """The SAE written the obvious, dense way: [N, n_latents] matrices everywhere."""
    mean = x.mean(-1, keepdim=True)
    std = x.std(-1, keepdim=True, unbiased=False)
    xt = (x - mean) / (std + 1e-5)
    pre = (xt - sae.b_pre) @ sae.W_enc.T
    top = pre.topk(sae.cfg.k, dim=-1)
    z = torch.zeros_like(pre).scatter(-1, top.indices, top.values.relu())
    xht = z @ sae.W_dec + sae.b_pre
    aux_recon = None
    if dead_mask is not None and dead_mask.any():
        k_aux = min(sae.cfg.k_aux, int(dead_mask.sum()))
        top_aux = pre.masked_fill(~dead_mask, -math.inf).topk(k_aux, dim=-1)
        z_aux = torch.zeros_like(pre).scatter(-1, top_aux.indices, top_aux.values.relu())
        aux_recon = z_aux @ sae.W_dec
    return xht * std + mean, z, xt, xht, aux_recon


# ---------------------------------------------------------------------------------------------
# encode / decode


def test_standardize_is_per_vector_population():
    x = data(5, D)
    xt, mean, std = standardize(x)
    torch.testing.assert_close(mean, x.mean(-1, keepdim=True))
    torch.testing.assert_close(std, x.std(-1, keepdim=True, unbiased=False))
    torch.testing.assert_close(xt.mean(-1), torch.zeros(5, dtype=x.dtype), atol=1e-12, rtol=0)
    torch.testing.assert_close(xt.pow(2).mean(-1), (std / (std + 1e-5)).squeeze(-1) ** 2)


def test_topk_encode_matches_dense_reference():
    sae = make_sae()
    x = data(40, D)
    values, indices = sae.encode(x)
    _, z, _, _, _ = dense_reference(sae, x)
    got = torch.zeros_like(z).scatter(-1, indices, values)
    torch.testing.assert_close(got, z)
    assert (values >= 0).all() and indices.shape == (40, K)
    assert (indices.sort(-1).values.diff(dim=-1) > 0).all()  # k distinct latents per vector


def test_forward_matches_dense_reference_including_aux():
    sae = make_sae()
    x = data(30, D)
    dead = torch.zeros(M, dtype=torch.bool)
    dead[::3] = True
    out = sae(x, dead)
    x_hat, _, xt, xht, aux = dense_reference(sae, x, dead)
    for got, want in [(out.x_hat, x_hat), (out.x_tilde, xt), (out.x_hat_tilde, xht), (out.aux_recon, aux)]:
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("path", ["all dead latents", "top k_aux", "positives shortcut"])
def test_aux_selection_paths_match_dense_reference(path):
    """The three ways the encoder selects AuxK latents (k_aux >= n_dead; a TopK over the dead
    columns; no TopK when no row has more than k_aux positive dead pre-activations) all equal the
    dense masked TopK."""
    sae = make_sae(seed=6)
    x = data(40, D, seed=6)
    xt, _, _ = standardize(x)
    positives = ((xt - sae.b_pre) @ sae.W_enc.T > 0).sum(0)  # rows with a positive entry, per latent
    dead = torch.zeros(M, dtype=torch.bool)
    dead[positives.argsort()[:16]] = True  # the least active latents, as real dead latents are
    max_pos = int((((xt - sae.b_pre) @ sae.W_enc.T)[:, dead] > 0).sum(1).max())
    k_aux = {"all dead latents": 20, "top k_aux": max(1, max_pos - 2), "positives shortcut": max_pos}[path]
    assert k_aux >= 16 if path == "all dead latents" else 0 < k_aux < 16
    sae.cfg.k_aux = k_aux
    out = sae(x, dead)
    torch.testing.assert_close(out.aux_recon, dense_reference(sae, x, dead)[4])


def test_sparse_primitives_match_dense():
    g = torch.Generator().manual_seed(3)
    idx = torch.stack([torch.randperm(M, generator=g)[:K] for _ in range(9)])
    w = torch.randn(9, K, generator=g, dtype=torch.float64)
    W = torch.randn(M, D, generator=g, dtype=torch.float64)
    A = torch.randn(9, D, generator=g, dtype=torch.float64)
    S = torch.zeros(9, M, dtype=torch.float64).scatter(1, idx, w)  # the dense [N, M] matrix they avoid
    torch.testing.assert_close(gather_rows(W, idx, w), S @ W)
    torch.testing.assert_close(row_dots(A, W, idx), (A @ W.T).gather(1, idx))
    torch.testing.assert_close(scatter_rows(idx, w, A, M), S.T @ A)


def test_sparse_decode_forward_backward_vs_dense():
    g = torch.Generator().manual_seed(1)
    idx = torch.stack([torch.randperm(M, generator=g)[:K] for _ in range(7)])
    vals = torch.rand(7, K, generator=g, dtype=torch.float64, requires_grad=True)
    W = torch.randn(M, D, generator=g, dtype=torch.float64, requires_grad=True)
    up = torch.randn(7, D, generator=g, dtype=torch.float64)
    out = _SparseDecode.apply(vals, idx, W)
    (out * up).sum().backward()
    gv, gW = vals.grad.clone(), W.grad.clone()
    vals.grad = W.grad = None
    dense = torch.zeros(7, M, dtype=torch.float64).scatter(1, idx, vals) @ W
    torch.testing.assert_close(out, dense)
    (dense * up).sum().backward()
    torch.testing.assert_close(gv, vals.grad)
    torch.testing.assert_close(gW, W.grad)
    assert torch.autograd.gradcheck(
        lambda v, w: _SparseDecode.apply(v, idx, w), (vals.detach().requires_grad_(), W.detach().requires_grad_())
    )


@pytest.mark.parametrize("k", [K, 30])
def test_topk_encode_gradcheck(k):
    """Every gradient of the encode Function (x~, b_pre, W_enc; main and aux outputs) by finite
    differences: tiny shapes, float64, random data whose TopK selection is stable under the probe.
    With k = 30 of 48 some kept pre-activations are negative: ReLU must stop their gradient."""
    sae = make_sae(seed=4)
    xt, _, _ = standardize(data(6, D, seed=5))
    dead = torch.arange(0, M, 4)
    inputs = (
        xt.clone().requires_grad_(),
        sae.b_pre.detach().clone().requires_grad_(),
        sae.W_enc.detach().clone().requires_grad_(),
    )

    def f(x, b, W):
        # chunks of 4 rows: chunking exercised; a reused pre-activation buffer (as on CPU) or none
        workspace = torch.empty(4, M, dtype=x.dtype) if k == K else None
        values, _, aux = _TopKEncode.apply(x, b, W, k, dead, 5, 4, workspace)
        return values, aux

    values = f(*inputs)[0]
    assert (values == 0).any() == (k == 30)
    assert torch.autograd.gradcheck(f, inputs)


def test_full_backward_matches_dense_reference():
    """Gradients of the whole training loss (FVU + AuxK with dead latents) wrt every parameter equal
    those of the dense implementation."""
    x = data(3, 10, D, seed=7)
    dead = torch.zeros(M, dtype=torch.bool)
    dead[torch.randperm(M, generator=torch.Generator().manual_seed(0))[:20]] = True
    grads = []
    for mode in ("sparse", "dense"):
        sae = make_sae(seed=2)
        if mode == "sparse":
            parts = training_loss(x, sae(x, dead), sae.cfg.aux_coef)
        else:
            x_hat, _, xt, xht, aux = dense_reference(sae, x, dead)
            per_layer = ((x_hat - x) ** 2).sum((1, 2)) / ((x - x.mean((1, 2), keepdim=True)) ** 2).sum((1, 2))
            r = (xt - xht).detach().reshape(-1, D)
            a = aux.reshape(-1, D)
            loss = per_layer.mean() + sae.cfg.aux_coef * ((r - a) ** 2).sum() / ((r - r.mean(0)) ** 2).sum()
            parts = [loss]
        parts[0].backward()
        grads.append([p.grad for p in (sae.W_enc, sae.W_dec, sae.b_pre)])
    for got, want in zip(*grads):
        assert want.abs().max() > 0
        torch.testing.assert_close(got, want)


def test_any_leading_shape():
    sae = make_sae()
    x = data(2, 3, 5, D)
    values, indices = sae.encode(x)
    assert values.shape == indices.shape == (2, 3, 5, K)
    flat_v, flat_i = sae.encode(x.reshape(-1, D))
    torch.testing.assert_close(values.reshape(-1, K), flat_v)
    assert torch.equal(indices.reshape(-1, K), flat_i)
    out = sae(x)
    assert out.x_hat.shape == x.shape and out.std.shape == (2, 3, 5, 1)
    _, mean, std = standardize(x)
    torch.testing.assert_close(sae.decode(values, indices, mean, std), out.x_hat)
    torch.testing.assert_close(sae.decode(values, indices), out.x_hat_tilde)
    torch.testing.assert_close(sae.decode(values[0, 1], indices[0, 1], mean[0, 1], std[0, 1]), out.x_hat[0, 1])
    assert sae.encode(x[0, 0, 0]).values.shape == (K,)  # a single vector


# ---------------------------------------------------------------------------------------------
# decoder maintenance, init


def train_step(sae, opt, x, dead=None):
    out = sae(x, dead)
    parts = training_loss(x, out, sae.cfg.aux_coef)
    opt.zero_grad()
    parts.loss.backward()
    sae.remove_parallel_grads_()
    opt.step()
    sae.renormalize_decoder_()
    return parts, out


def test_decoder_rows_unit_norm_after_each_step():
    sae = make_sae(dtype=torch.float32)
    opt = torch.optim.Adam(sae.parameters(), lr=0.05)
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(M))
    x = data(2, 16, D, dtype=torch.float32)
    for _ in range(3):
        before = sae.W_dec.detach().clone()
        train_step(sae, opt, x)
        assert not torch.equal(before, sae.W_dec)  # it did move
        torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(M))


def test_remove_parallel_grads_leaves_only_the_orthogonal_part():
    sae = make_sae()
    with torch.no_grad():
        sae.W_dec.mul_(torch.linspace(0.5, 2, M, dtype=torch.float64)[:, None])  # any norm, not only 1
    x = data(20, D)
    training_loss(x, sae(x), 0.0).loss.backward()
    g0 = sae.W_dec.grad.clone()
    W = sae.W_dec.detach()
    assert (g0 * W).sum(1).abs().max() > 1e-6  # there was a parallel part to remove
    sae.remove_parallel_grads_()
    g = sae.W_dec.grad
    torch.testing.assert_close((g * W).sum(1), torch.zeros(M, dtype=torch.float64), atol=1e-12, rtol=0)
    unit = W / W.norm(dim=1, keepdim=True)
    torch.testing.assert_close(g, g0 - (g0 * unit).sum(1, keepdim=True) * unit)


def test_init_unit_norm_transpose_and_seeded():
    a = TopKSae(SaeConfig(D, M, K), generator=torch.Generator().manual_seed(0))
    b = TopKSae(SaeConfig(D, M, K), generator=torch.Generator().manual_seed(0))
    c = TopKSae(SaeConfig(D, M, K), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(a.W_dec.norm(dim=1), torch.ones(M))
    assert torch.equal(a.W_enc, a.W_dec) and a.W_enc.data_ptr() != a.W_dec.data_ptr()
    assert torch.equal(a.W_enc, b.W_enc) and not torch.equal(a.W_enc, c.W_enc)
    assert torch.equal(a.b_pre, torch.zeros(D))


def sum_dist(p: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return (p - y).norm(dim=-1).sum(-1)


def test_geometric_median_vs_brute_force():
    g = torch.Generator().manual_seed(0)
    p = torch.randn(200, 3, generator=g, dtype=torch.float64) * torch.tensor([1.0, 3.0, 0.5], dtype=torch.float64)
    p[:20] += 25  # outliers pull the mean, much less the median
    y = geometric_median(p)
    best = sum_dist(p, y)
    # brute force: a fine grid around the result and random candidates over the data's range
    axes = [torch.linspace(-0.2, 0.2, 21, dtype=torch.float64)] * 3
    grid = torch.stack(torch.meshgrid(*axes, indexing="ij"), -1).reshape(-1, 3) + y
    rand = p.min(0).values + torch.rand(20000, 3, generator=g, dtype=torch.float64) * (
        p.max(0).values - p.min(0).values
    )
    cands = torch.cat([grid, rand, p, p.mean(0, keepdim=True), p.median(0).values[None]])
    others = sum_dist(p[None], cands[:, None])
    assert best <= others.min() + 1e-9
    assert best < sum_dist(p, p.mean(0)) - 1.0


def test_geometric_median_of_collinear_points_is_the_median():
    g = torch.Generator().manual_seed(1)
    t = torch.randn(101, generator=g, dtype=torch.float64) ** 3  # skewed, so mean != median
    direction = torch.tensor([1.0, -2.0, 0.5, 3.0], dtype=torch.float64)
    p = 7.0 + t[:, None] * direction
    y = geometric_median(p, iters=500)
    torch.testing.assert_close(y, 7.0 + t.median() * direction, atol=1e-5, rtol=0)


def test_init_b_pre_is_median_of_standardized_first_batch():
    sae = make_sae(dtype=torch.float32)
    x = data(3, 50, D, dtype=torch.float32) * 10 + 100  # raw scale far from the standardized one
    sae.init_b_pre(x)
    xt, _, _ = standardize(x.reshape(-1, D))
    torch.testing.assert_close(sae.b_pre.detach(), geometric_median(xt.double()).float(), atol=1e-4, rtol=0)
    assert sae.b_pre.abs().max() < 3  # standardized space, not the raw vectors' median (~100)


# ---------------------------------------------------------------------------------------------
# objectives


def layered(seed: int, n: int = 64, layers: int = 3):
    g = torch.Generator().manual_seed(seed)
    scale = torch.tensor([1.0, 5.0, 0.2])[:layers, None, None]
    offset = torch.randn(layers, 1, D, generator=g) * 4  # per-feature means differ: the two FVUs differ
    x = torch.randn(layers, n, D, generator=g) * scale + offset
    x_hat = x + 0.3 * scale * torch.randn(x.shape, generator=g)
    return x, x_hat


def direct_fvu(x: torch.Tensor, x_hat: torch.Tensor):
    """Straight from the definitions, with torch.var (population), per layer."""
    x, x_hat = x.double(), x_hat.double()
    sse = ((x - x_hat) ** 2).sum((1, 2))
    n_scalars = x[0].numel()
    scalar = torch.stack([xl.reshape(-1).var(unbiased=False) * n_scalars for xl in x])
    feature = torch.stack([xl.var(0, unbiased=False).sum() * xl.shape[0] for xl in x])
    return sse / scalar, sse / feature


def test_fvu_accumulator_vs_torch_var_pooled_over_batches():
    batches = [layered(s, n) for s, n in [(0, 40), (1, 7), (2, 90)]]
    x = torch.cat([b[0] for b in batches], 1)
    x_hat = torch.cat([b[1] for b in batches], 1)
    want_scalar, want_feature = direct_fvu(x, x_hat)
    assert (want_feature / want_scalar).min() > 1.1  # the two definitions really differ here

    acc = FvuAccumulator.zeros(3, D)
    for xb, xhb in batches:
        acc.update(xb, xhb)
    one = FvuAccumulator.of(x, x_hat).compute()
    res = acc.compute()
    for r in (res, one):
        torch.testing.assert_close(torch.tensor(r.fvu, dtype=torch.float64), want_scalar, rtol=1e-8, atol=0)
        torch.testing.assert_close(torch.tensor(r.fvu_feature, dtype=torch.float64), want_feature, rtol=1e-8, atol=0)
    assert res.fvu_mean == pytest.approx(want_scalar.mean().item(), rel=1e-8)
    assert res.fvu_feature_mean == pytest.approx(want_feature.mean().item(), rel=1e-8)
    assert res.mse == pytest.approx((((x - x_hat).double() ** 2).mean((1, 2))).tolist(), rel=1e-8)
    # NOT the mean of per-batch ratios
    per_batch = torch.stack([direct_fvu(xb, xhb)[0] for xb, xhb in batches]).mean(0)
    assert (per_batch - want_scalar).abs().max() > 1e-3
    # merge is order-independent and round-trips through plain tensors
    a, b = FvuAccumulator.of(*batches[0]), FvuAccumulator.of(*batches[2])
    torch.testing.assert_close(torch.tensor(a.merge(b).compute().fvu), torch.tensor(b.merge(a).compute().fvu))
    back = FvuAccumulator.from_tensors(acc.to_tensors())
    assert back.compute() == res


def test_fvu_layer_axis_and_large_offsets():
    x, x_hat = layered(3)
    ref = FvuAccumulator.of(x, x_hat).compute().fvu
    assert FvuAccumulator.of(x.transpose(0, 1), x_hat.transpose(0, 1), layer_dim=1).compute().fvu == pytest.approx(ref)
    # float32 input with a large common offset: the float64 sums keep the denominator exact
    big, big_hat = x + 1e4, x_hat + 1e4
    assert FvuAccumulator.of(big, big_hat).compute().fvu == pytest.approx(
        direct_fvu(big, big_hat)[0].tolist(), rel=1e-4
    )
    single = FvuAccumulator.of(x[1], x_hat[1], layer_dim=None).compute().fvu
    assert single == pytest.approx([ref[1]], rel=1e-12)


def test_minibatch_fvu_loss_vs_torch_var():
    x, x_hat = layered(4)
    want, _ = direct_fvu(x, x_hat)
    torch.testing.assert_close(minibatch_fvu(x, x_hat).double(), want, rtol=1e-5, atol=0)
    torch.testing.assert_close(
        minibatch_fvu(x.transpose(0, 1), x_hat.transpose(0, 1), layer_dim=1).double(), want, rtol=1e-5, atol=0
    )


def test_auxk_touches_only_dead_latents():
    sae = make_sae(k_aux=5)
    x = data(2, 25, D, seed=3)
    dead = torch.zeros(M, dtype=torch.bool)
    dead[torch.randperm(M, generator=torch.Generator().manual_seed(5))[:12]] = True
    out = sae(x, dead)
    aux = auxk_loss(out.x_tilde, out.x_hat_tilde, out.aux_recon)
    assert aux > 0
    aux.backward()
    for W in (sae.W_enc, sae.W_dec):
        assert W.grad[~dead].abs().max() == 0  # live latents: untouched
        assert W.grad[dead].abs().max() > 0  # dead ones: revived
    assert sae.b_pre.grad.abs().max() > 0  # through the encoder input, as in OpenAI's form
    # the aux reconstruction uses at most k_aux dead latents per vector and no bias
    _x_hat, _z, xt, xht, aux_ref = dense_reference(sae, x, dead)
    torch.testing.assert_close(out.aux_recon, aux_ref)
    r = (xt - xht).reshape(-1, D)
    want = ((r - aux_ref.reshape(-1, D)) ** 2).sum() / ((r - r.mean(0)) ** 2).sum()
    torch.testing.assert_close(aux, want)


def test_auxk_is_zero_without_dead_latents():
    sae = make_sae()
    x = data(2, 10, D)
    for dead in (None, torch.zeros(M, dtype=torch.bool)):
        out = sae(x, dead)
        assert out.aux_recon is None
        parts = training_loss(x, out, 1.0)
        assert parts.auxk.item() == 0.0
        torch.testing.assert_close(parts.loss, parts.fvu)


def test_dead_latents_count_tokens_not_vectors():
    tracker = DeadLatents(n_latents=6, dead_tokens=100)
    # one token, 3 layers (an MLSAE batch holds L vectors per token): latent 1 fires at one layer,
    # latent 2 only below the 1e-3 threshold
    values = torch.tensor([[[0.0, 0.5]], [[0.0, 0.0005]], [[0.0, 0.0]]]).reshape(3, 2)
    indices = torch.tensor([[0, 1], [0, 2], [0, 3]])
    fired = DeadLatents.fired(values, indices, 6)
    assert fired.tolist() == [False, True, False, False, False, False]
    tracker.update(fired, n_tokens=60)
    assert tracker.tokens_since_fired.tolist() == [60, 0, 60, 60, 60, 60]
    assert not tracker.mask.any()
    tracker.update(torch.zeros(6, dtype=torch.bool), n_tokens=40)
    assert tracker.mask.tolist() == [True, False, True, True, True, True]
    assert tracker.fraction == pytest.approx(5 / 6)
    tracker.update(fired, n_tokens=1)
    assert not tracker.mask[1]


# ---------------------------------------------------------------------------------------------
# persistence, config, end to end


def test_save_load_roundtrip(tmp_path):
    sae = make_sae(dtype=torch.float32, dead_tokens=1234)
    sae.save(tmp_path / "run")
    assert {p.name for p in (tmp_path / "run").iterdir()} == {"sae.safetensors", "sae_config.json"}
    back = load_sae(tmp_path / "run")
    assert back.cfg == sae.cfg
    for name, p in sae.named_parameters():
        q = getattr(back, name)
        assert isinstance(q, torch.nn.Parameter) and q.requires_grad and torch.equal(p, q)
    x = data(7, D, dtype=torch.float32)
    torch.testing.assert_close(back(x).x_hat, sae(x).x_hat)


def test_config_checks_and_expansion():
    cfg = SaeConfig.from_expansion(d_model=640, expansion_factor=8, k=32)
    assert (cfg.n_latents, cfg.k_aux, cfg.aux_coef, cfg.dead_tokens) == (5120, 256, 1 / 32, 10_000_000)
    with pytest.raises(ValueError, match="k must be"):
        SaeConfig(d_model=8, n_latents=16, k=16)


def test_end_to_end_fit_on_sparse_data():
    """Synthetic data made of 3 atoms of a 40-atom dictionary per vector: FVU falls far below its start."""
    g = torch.Generator().manual_seed(0)
    atoms = torch.randn(40, D, generator=g)
    idx = torch.stack([torch.randperm(40, generator=g)[:3] for _ in range(2048)])
    x = torch.nn.functional.embedding_bag(
        idx, atoms, per_sample_weights=torch.rand(2048, 3, generator=g) + 0.5, mode="sum"
    )
    x = x.view(2, 1024, D) + 0.01 * torch.randn(2, 1024, D, generator=g)
    cfg = SaeConfig(d_model=D, n_latents=64, k=4, k_aux=16, dead_tokens=2000)
    torch.manual_seed(0)
    sae = TopKSae(cfg, generator=torch.Generator().manual_seed(0))
    sae.init_b_pre(x[:, :256])
    opt = torch.optim.Adam(sae.parameters(), lr=1e-2, eps=6.25e-10)
    tracker = DeadLatents(cfg.n_latents, cfg.dead_tokens)
    with torch.no_grad():
        start = FvuAccumulator.of(x, sae(x).x_hat).compute().fvu_mean
    for step in range(300):
        batch = x[:, (step % 8) * 128 : (step % 8 + 1) * 128]
        parts, out = train_step(sae, opt, batch, tracker.mask)
        tracker.update(DeadLatents.fired(out.values, out.indices, cfg.n_latents), batch.shape[1])
        assert math.isfinite(parts.loss.item())
    with torch.no_grad():
        end = FvuAccumulator.of(x, sae(x).x_hat).compute().fvu_mean
    assert start > 0.3 and end < 0.25 * start, (start, end)
