"""The TopK (multi-layer) sparse autoencoder: config, encode, sparse decode, forward, save, load.

One SAE, shared weights, applied to every (token, layer) vector independently: the layer is just
another batch axis, so nothing here knows about layers (docs/method.md Sec. 2). This is the only module
that knows the SAE's parameters:

    W_enc [n_latents, d]   encoder rows
    W_dec [n_latents, d]   decoder directions, one unit-norm ROW per latent (the method's "columns";
                           stored as rows so that gathering k of them per vector reads contiguous memory)
    b_pre [d]              pre-encoder bias, also the decoder's output bias (standardized space)

Speed (bench/sae_step.py): the encoder matmul W_enc x is the only dense operation. Everything after it
touches k entries per vector, forward AND backward, through two autograd Functions:
  _TopKEncode    dense pre-activations in row chunks, TopK + ReLU; its backward builds the encoder
                 gradient from the k selected entries only (a sparse [n_latents, N] @ [N, d] product);
  _SparseDecode  sum of k gathered decoder rows (embedding_bag); its backward gets the gradient wrt the
                 values from k dot products per vector (sampled dense-dense product, SDDMM) and the
                 decoder gradient as a sparse [n_latents, N] @ [N, d] product.
AuxK uses only the dead latents; it is computed densely over that column subset (see _TopKEncode).
"""

from __future__ import annotations

import json
import warnings
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from harvest.atomic import atomic_write, atomic_write_text

STD_EPS = 1e-5  # x~ = (x - mean) / (std + STD_EPS), as the reference
WEIGHTS_FILE = "sae.safetensors"
CONFIG_FILE = "sae_config.json"
WEIGHTS_FORMAT = "mlsae-sae"  # safetensors metadata: "format", and the two keys below
SAE_CONFIG_KEY = "sae_config"  # the SaeConfig the weights were trained with (JSON)
RUN_KEY = "mlsae_run"  # what of the run record they were trained under (RunRecord.binding(), JSON)

# torch warns once per process that CSR support is "beta"; we use two long-stable CSR ops only.
warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")


@dataclass
class SaeConfig:
    d_model: int
    n_latents: int
    k: int
    k_aux: int = 256  # dead latents used by AuxK (OpenAI: d_model // 2 or so; the reference 256)
    aux_coef: float = 1 / 32
    dead_tokens: int = 10_000_000  # a latent is dead after this many TOKENS without firing

    def __post_init__(self) -> None:
        if self.d_model < 1 or self.n_latents < 1:
            raise ValueError(f"d_model and n_latents must be positive, got {self.d_model}, {self.n_latents}")
        if not 0 < self.k < self.n_latents:
            raise ValueError(f"k must be in 1..n_latents-1 (n_latents={self.n_latents}), got k={self.k}")
        if self.k_aux < 0 or self.aux_coef < 0 or self.dead_tokens < 1:
            raise ValueError(
                f"need k_aux >= 0, aux_coef >= 0, dead_tokens >= 1; got {self.k_aux}, "
                f"{self.aux_coef}, {self.dead_tokens}"
            )

    @classmethod
    def from_expansion(cls, d_model: int, expansion_factor: int, k: int, **kw) -> "SaeConfig":
        """n_latents = expansion_factor * d_model (the paper's R; default 64)."""
        return cls(d_model=d_model, n_latents=expansion_factor * d_model, k=k, **kw)

    @classmethod
    def from_dict(cls, d: dict) -> "SaeConfig":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


class TopK(NamedTuple):
    values: Tensor  # [..., k] post-ReLU activations (>= 0)
    indices: Tensor  # [..., k] int64 latent ids


class SaeOutput(NamedTuple):
    x_hat: Tensor  # [..., d] reconstruction in MODEL space
    values: Tensor  # [..., k]
    indices: Tensor  # [..., k]
    x_tilde: Tensor  # [..., d] standardized input (no grad)
    x_hat_tilde: Tensor  # [..., d] reconstruction in standardized space (incl. b_pre)
    mean: Tensor  # [..., 1] per-vector mean over features
    std: Tensor  # [..., 1] per-vector population std over features
    aux_recon: Tensor | None  # [..., d] W_dec z_aux without bias (standardized space); None: no dead latent


def standardize(x: Tensor, eps: float = STD_EPS) -> tuple[Tensor, Tensor, Tensor]:
    """Per-vector standardization over the last (feature) axis: (x~, mean, std), std the population std
    (the reference uses torch.std, Bessel-corrected: a relative 1/(2d) difference, 0.08% at d = 640).

    Undo with `x~ * std + mean` (not `* (std + eps)`: the reference multiplies back by std alone, which
    differs by a relative 1e-5 / std, negligible for residual streams)."""
    mean = x.mean(-1, keepdim=True)
    xc = x - mean
    std = xc.pow(2).mean(-1, keepdim=True).sqrt()
    return xc / (std + eps), mean, std


# ---------------------------------------------------------------------------------------------
# sparse primitives: k (latent, weight) pairs per vector; never a dense [N, n_latents] matrix


def gather_rows(W: Tensor, idx: Tensor, w: Tensor) -> Tensor:
    """out[n] = sum_i w[n, i] * W[idx[n, i]]  ([N, k] x [M, d] -> [N, d]); a fused gather-sum."""
    return F.embedding_bag(idx, W, per_sample_weights=w.to(W.dtype), mode="sum")


def row_dots(A: Tensor, W: Tensor, idx: Tensor) -> Tensor:
    """out[n, i] = A[n] . W[idx[n, i]]  ([N, d], [M, d], [N, k] -> [N, k]).

    The entries of A @ W.T at k positions per row: a sampled dense-dense product (SDDMM) over a CSR
    pattern whose row pointers are just 0, k, 2k, ... Measured here 5-8x faster than gathering W[idx]
    ([N, k, d]) and reducing. CSR requires sorted column indices within a row: sort them, then put
    the results back in idx's order (cheap: [N, k])."""
    n, k = idx.shape
    idx_sorted, perm = idx.sort(dim=1)
    crow = torch.arange(0, n * k + 1, k, device=idx.device, dtype=idx.dtype)
    pattern = torch.sparse_csr_tensor(
        crow,
        idx_sorted.reshape(-1),
        torch.zeros(n * k, device=A.device, dtype=A.dtype),
        size=(n, W.shape[0]),
        check_invariants=False,
    )  # valid by construction
    dots = torch.sparse.sampled_addmm(pattern, A, W.to(A.dtype).t()).values().view(n, k)
    return torch.empty_like(dots).scatter_(1, perm, dots)


def scatter_rows(idx: Tensor, w: Tensor, X: Tensor, n_rows: int) -> Tensor:
    """G[j] = sum over (n, i) with idx[n, i] == j of w[n, i] * X[n]  ([N, k], [N, k], [N, d] -> [n_rows, d]).

    The transpose of gather_rows, i.e. a sparse [n_rows, N] @ dense [N, d] product with N*k nonzeros:
    the gradient of W in both the encoder (w = grad of the kept pre-activations, X = input) and the
    decoder (w = values, X = grad of the output); it costs N*k*d, not N*n_rows*d. Done as a gather-sum
    again: sort the N*k entries by row j, then one embedding_bag with a bag per j (measured here: 2.5x
    faster than torch.sparse.mm on the COO matrix, 2x faster than a CSR matmul)."""
    k = idx.shape[1]
    flat = idx.reshape(-1)
    order = flat.argsort()
    offsets = torch.zeros(n_rows, dtype=torch.long, device=idx.device)
    torch.cumsum(torch.bincount(flat, minlength=n_rows)[:-1], 0, out=offsets[1:])
    return F.embedding_bag(order // k, X, offsets, per_sample_weights=w.reshape(-1)[order].to(X.dtype), mode="sum")


# ---------------------------------------------------------------------------------------------
# autograd Functions


class _TopKEncode(torch.autograd.Function):
    """(x~, b_pre, W_enc) -> ReLU(TopK(W_enc (x~ - b_pre))) as (values [N, k], indices [N, k]), and
    optionally the AuxK activations of the dead latents, dense over that column subset only
    ([N, n_dead], zero outside each row's top k_aux).

    Forward computes the pre-activations in row chunks of at most `chunk` rows (memory: the full
    [N, n_latents] matrix of a large batch need never exist). Backward uses only the selected entries:
    grad W_enc = S^T (x~ - b_pre) with S the sparse gradient of the pre-activations; grad b_pre =
    -(column sums of S) W_enc, a vector-matrix product.

    AuxK densely over the dead columns: 4 products of N x n_dead x d in all (the dead rows of W_enc's
    gradient here, the aux decode and its two gradients in TopKSae) cost less than sparse ops with
    k_aux (256) entries per row until n_dead approaches ~1/3 of n_latents (sparse gathers run far below
    the matmul's FLOP rate), and few latents are dead in a healthy run."""

    @staticmethod
    def forward(
        ctx,
        x_tilde: Tensor,
        b_pre: Tensor,
        W_enc: Tensor,
        k: int,
        dead: Tensor | None,
        k_aux: int,
        chunk: int,
        workspace: Tensor | None,
    ):
        ctx.set_materialize_grads(False)  # an unused aux output then costs nothing in backward
        xc = x_tilde - b_pre
        n, n_dead = xc.shape[0], 0 if dead is None else len(dead)
        W, order = W_enc, None
        if n_dead:
            # dead latents first: their pre-activations are then the leading columns of the same
            # matmul (a view), instead of a strided gather from it (measured: 10 ms at 10% dead)
            live = torch.ones(W_enc.shape[0], dtype=torch.bool, device=W_enc.device).index_fill_(0, dead, False)
            order = torch.cat([dead, live.nonzero().squeeze(1)])
            W = W_enc.index_select(0, order)
        values = xc.new_empty(n, k)
        indices = torch.empty(n, k, dtype=torch.long, device=xc.device)
        aux = xc.new_zeros(n, n_dead) if n_dead else None
        # inside an autocast region (CUDA bf16) only this matmul runs in low precision: it is the one
        # dense op; selection on bf16 values is fine, the kept values are returned in full precision.
        for s in range(0, n, chunk):
            rows = xc[s : s + chunk]
            if workspace is not None:  # CPU: a fresh 100 MB result would be page-faulted in every step (~20 ms)
                pre = torch.matmul(rows, W.t(), out=workspace[: len(rows)])
            else:
                pre = rows @ W.t()
            v, i = pre.topk(k, dim=1, sorted=False)
            values[s : s + chunk] = v
            indices[s : s + chunk] = i if order is None else order[i]
            if aux is not None:
                pd = pre[:, :n_dead]
                # exact shortcut: with at most k_aux positive entries per row, ReLU(TopK) keeps them all
                if k_aux < n_dead and int((pd > 0).sum(1).max()) > k_aux:
                    v, i = pd.topk(k_aux, dim=1, sorted=False)
                    aux[s : s + chunk].scatter_(1, i, v.to(aux.dtype))
                else:
                    aux[s : s + chunk] = pd
        values.relu_()
        if aux is not None:
            aux.relu_()  # ReLU also zeroes the unselected entries' gradient (they are exactly 0)
        ctx.save_for_backward(xc, W_enc, values, indices, dead, aux)
        ctx.mark_non_differentiable(indices)
        return values, indices, aux

    @staticmethod
    def backward(ctx, g_values: Tensor, _g_indices, g_aux: Tensor | None):
        with torch.autocast("cuda", enabled=False):  # fp32 even if backward() is called under autocast
            return _TopKEncode._backward(ctx, g_values, g_aux)

    @staticmethod
    def _backward(ctx, g_values: Tensor, g_aux: Tensor | None):
        xc, W_enc, values, indices, dead, aux = ctx.saved_tensors
        n_latents = W_enc.shape[0]
        if g_values is None:
            g_values = torch.zeros_like(values)
        g = g_values * (values > 0)  # ReLU; sparse [N, k] gradient of the pre-activations
        g_x = g_b = g_W = None
        if g_aux is not None and aux is not None:
            g_aux = g_aux * (aux > 0)
            W_dead = W_enc.index_select(0, dead)
        else:
            g_aux = None
        if ctx.needs_input_grad[2]:
            g_W = scatter_rows(indices, g, xc, n_latents)
            if g_aux is not None:
                g_W.index_add_(0, dead, g_aux.t() @ xc)
        if ctx.needs_input_grad[1]:
            col = torch.zeros(n_latents, device=g.device, dtype=g.dtype).index_add_(
                0, indices.reshape(-1), g.reshape(-1)
            )
            g_b = -(col @ W_enc)
            if g_aux is not None:
                g_b -= g_aux.sum(0) @ W_dead
        if ctx.needs_input_grad[0]:
            g_x = gather_rows(W_enc, indices, g)
            if g_aux is not None:
                g_x += g_aux @ W_dead
        return g_x, g_b, g_W, None, None, None, None, None


class _SparseDecode(torch.autograd.Function):
    """(values [N, k], indices [N, k], W_dec [M, d]) -> sum_i values[n, i] W_dec[indices[n, i]]  [N, d]."""

    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda", cast_inputs=torch.float32)  # the decode stays fp32 under autocast
    def forward(ctx, values: Tensor, indices: Tensor, W_dec: Tensor) -> Tensor:
        ctx.save_for_backward(values, indices, W_dec)
        return gather_rows(W_dec, indices, values)

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, g: Tensor):
        values, indices, W_dec = ctx.saved_tensors
        g_values = row_dots(g, W_dec, indices).to(values.dtype) if ctx.needs_input_grad[0] else None
        g_W = scatter_rows(indices, values, g, W_dec.shape[0]).to(W_dec.dtype) if ctx.needs_input_grad[2] else None
        return g_values, None, g_W


def sparse_decode(values: Tensor, indices: Tensor, W_dec: Tensor) -> Tensor:
    return _SparseDecode.apply(values, indices, W_dec)


# ---------------------------------------------------------------------------------------------
# the module


class TopKSae(nn.Module):
    def __init__(
        self,
        cfg: SaeConfig,
        device: str | torch.device | None = None,
        dtype: torch.dtype = torch.float32,
        generator: torch.Generator | None = None,
        chunk_rows: int | None = None,
    ):
        super().__init__()
        self.cfg = cfg
        # rows of pre-activations computed at once: bounds memory to ~2^25 floats (128 MB in fp32);
        # smaller chunks did not run faster here (TopK and the matmul both prefer long runs)
        self.chunk_rows = chunk_rows or max(1, 2**25 // cfg.n_latents)
        self._workspace: Tensor | None = None  # reused pre-activation buffer (CPU only; not state)
        # Random unit directions; the encoder starts as the decoder's transpose (both unit norm: on
        # standardized inputs |x~| = sqrt(d), so pre-activations start O(1)). Drawn on the CPU (or the
        # generator's device) so that a seed gives the same SAE on any device; nothing is drawn on the
        # meta device (load() assigns the parameters).
        src = "meta" if torch.device(device or "cpu").type == "meta" else (generator.device if generator else "cpu")
        W = torch.randn(cfg.n_latents, cfg.d_model, generator=generator, dtype=torch.float32, device=src)
        W /= W.norm(dim=1, keepdim=True)
        self.W_enc = nn.Parameter(W.to(device=device, dtype=dtype))
        self.W_dec = nn.Parameter(W.to(device=device, dtype=dtype).clone())
        self.b_pre = nn.Parameter(torch.zeros(cfg.d_model, device=device, dtype=dtype))

    @property
    def device(self) -> torch.device:
        return self.W_enc.device

    # -- encode / decode ---------------------------------------------------------------------

    def _encode_flat(self, x_tilde: Tensor, dead: Tensor | None = None):
        k_aux = min(self.cfg.k_aux, len(dead)) if dead is not None else 0
        if k_aux == 0:
            dead = None
        return _TopKEncode.apply(
            x_tilde, self.b_pre, self.W_enc, self.cfg.k, dead, k_aux, self.chunk_rows, self._pre_workspace(x_tilde)
        )

    def _pre_workspace(self, x_tilde: Tensor) -> Tensor | None:
        """On the CPU, one [chunk_rows, n_latents] buffer reused by every forward. (CUDA's caching
        allocator already reuses memory, and autocast does not apply to out= matmuls.)"""
        if x_tilde.device.type != "cpu" or torch.is_autocast_enabled("cpu"):
            return None
        rows = min(self.chunk_rows, len(x_tilde))
        ws = self._workspace
        if ws is None or ws.dtype != x_tilde.dtype or ws.shape[0] < rows:
            ws = self._workspace = x_tilde.new_empty(rows, self.cfg.n_latents)
        return ws

    def encode(self, x: Tensor) -> TopK:
        """x [..., d] (model space) -> TopK(values [..., k], indices [..., k])."""
        lead = x.shape[:-1]
        x_tilde, _, _ = standardize(x.reshape(-1, x.shape[-1]).to(self.W_enc.dtype))
        values, indices, _ = self._encode_flat(x_tilde)
        return TopK(values.view(*lead, self.cfg.k), indices.view(*lead, self.cfg.k))

    def decode(self, values: Tensor, indices: Tensor, mean: Tensor | None = None, std: Tensor | None = None) -> Tensor:
        """Latents [..., k] -> reconstruction [..., d]: in standardized space (b_pre included), or in
        model space when the input's `mean` and `std` ([..., 1], from `standardize`) are given."""
        lead, k = values.shape[:-1], values.shape[-1]
        x_hat = sparse_decode(values.reshape(-1, k), indices.reshape(-1, k), self.W_dec) + self.b_pre
        x_hat = x_hat.view(*lead, self.cfg.d_model)
        if mean is not None and std is not None:
            x_hat = x_hat * std + mean
        return x_hat

    def forward(self, x: Tensor, dead_mask: Tensor | None = None) -> SaeOutput:
        """x [..., d] -> SaeOutput. `dead_mask` [n_latents] bool (from DeadLatents): when any latent is
        dead, also the AuxK reconstruction from the top k_aux dead latents."""
        lead, d = x.shape[:-1], x.shape[-1]
        x_tilde, mean, std = standardize(x.reshape(-1, d).to(self.W_enc.dtype))
        dead = dead_mask.nonzero().squeeze(1) if dead_mask is not None else None
        values, indices, aux = self._encode_flat(x_tilde, dead if dead is not None and len(dead) else None)
        x_hat_tilde = sparse_decode(values, indices, self.W_dec) + self.b_pre
        x_hat = x_hat_tilde * std + mean
        aux_recon = None
        if aux is not None:
            aux_recon = (aux @ self.W_dec.index_select(0, dead)).view(*lead, d)  # no bias (OpenAI)
        k = self.cfg.k
        return SaeOutput(
            x_hat.view(*lead, d),
            values.view(*lead, k),
            indices.view(*lead, k),
            x_tilde.view(*lead, d),
            x_hat_tilde.view(*lead, d),
            mean.view(*lead, 1),
            std.view(*lead, 1),
            aux_recon,
        )

    # -- training-time maintenance ------------------------------------------------------------

    @torch.no_grad()
    def init_b_pre(self, x: Tensor, iters: int = 100, chunk_rows: int = 65536) -> None:
        """b_pre = geometric median of the STANDARDIZED vectors of x [..., d] (the first batch).
        Cost: ~2 passes over the batch per Weiszfeld iteration (most batches converge well before 100)."""
        x = x.reshape(-1, x.shape[-1])
        x_tilde = torch.empty(x.shape, device=self.device, dtype=torch.float32)  # the one full-size copy
        for s in range(0, len(x), chunk_rows):
            x_tilde[s : s + chunk_rows] = standardize(
                x[s : s + chunk_rows].to(device=self.device, dtype=torch.float32)
            )[0]
        self.b_pre.copy_(geometric_median(x_tilde, iters=iters, chunk_rows=chunk_rows).to(self.b_pre.dtype))

    @torch.no_grad()
    def renormalize_decoder_(self) -> None:
        """Decoder rows back to unit norm: call after every optimizer step."""
        self.W_dec.div_(self.W_dec.norm(dim=1, keepdim=True).clamp_min(torch.finfo(self.W_dec.dtype).tiny))

    @torch.no_grad()
    def remove_parallel_grads_(self) -> None:
        """Remove from each decoder row's gradient its component along the row: call before the
        optimizer step (Adam rescales gradients, so the step itself would otherwise keep changing norms)."""
        g, W = self.W_dec.grad, self.W_dec
        if g is None:
            return
        coef = (g * W).sum(1, keepdim=True) / (W * W).sum(1, keepdim=True).clamp_min(torch.finfo(W.dtype).tiny)
        g.sub_(coef * W)

    # -- persistence ---------------------------------------------------------------------------

    def save(self, folder: str | Path, run: dict | None = None) -> None:
        """Writes folder/sae.safetensors (W_enc, W_dec, b_pre) and folder/sae_config.json, atomically. The
        weights carry their config in the safetensors metadata, and `run` (what the run record binds them
        to: train/record.py) when given, so an edit of the JSON files beside them is noticed on load."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        tensors = {n: p.detach().contiguous().cpu() for n, p in self.named_parameters()}
        metadata = {"format": WEIGHTS_FORMAT, SAE_CONFIG_KEY: json.dumps(asdict(self.cfg), sort_keys=True)}
        if run is not None:
            metadata[RUN_KEY] = json.dumps(run, sort_keys=True)
        atomic_write(folder / WEIGHTS_FILE, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))
        atomic_write_text(folder / CONFIG_FILE, json.dumps(asdict(self.cfg), indent=2) + "\n")

    @classmethod
    def load(cls, folder: str | Path, device: str | torch.device = "cpu") -> "TopKSae":
        folder = Path(folder)
        cfg = SaeConfig.from_dict(json.loads((folder / CONFIG_FILE).read_text()))
        tensors = load_file(str(folder / WEIGHTS_FILE), device=str(device))
        trained = weights_metadata(folder).get(SAE_CONFIG_KEY)
        if trained is not None and SaeConfig.from_dict(json.loads(trained)) != cfg:
            raise ValueError(f"{CONFIG_FILE} says {cfg}, the weights were trained as {json.loads(trained)}")
        sae = cls(cfg, device="meta")
        sae.load_state_dict(tensors, assign=True)
        return sae


def weights_metadata(folder: str | Path) -> dict[str, str]:
    """The safetensors metadata of folder/sae.safetensors (empty for weights written before it was kept)."""
    from safetensors import safe_open

    with safe_open(str(Path(folder) / WEIGHTS_FILE), "pt") as f:
        return dict(f.metadata() or {})


def load_sae(path: str | Path, device: str | torch.device = "cpu") -> TopKSae:
    """The public loader: a run folder, checked against its record (train/record.py), or any other folder
    holding sae.safetensors + sae_config.json."""
    from train.record import CONFIG, load_run

    if (Path(path) / CONFIG).is_file():
        return load_run(path).load_sae(str(device))
    return TopKSae.load(path, device)


@torch.no_grad()
def geometric_median(points: Tensor, iters: int = 100, tol: float = 1e-7, chunk_rows: int = 65536) -> Tensor:
    """Weiszfeld's algorithm: argmin_y sum_i |points_i - y|  for points [N, d].

    Distances come from |p|^2 - 2 p.y + |y|^2 (two matrix-vector products per iteration, no [N, d]
    temporary), accumulated in float64; a point that coincides with y gets weight 1/eps instead of inf.
    Stops early when y moves less than tol (relative to the points' spread)."""
    p = points
    sq = torch.cat([c.pow(2).sum(1, dtype=torch.float64) for c in p.split(chunk_rows)])
    y = sum(c.sum(0, dtype=torch.float64) for c in p.split(chunk_rows)) / len(p)
    scale = (sq.mean() - y.pow(2).sum()).clamp_min(0).sqrt().item() or 1.0
    eps = 1e-12 * scale
    for _ in range(iters):
        y32 = y.to(p.dtype)
        d2 = torch.cat([(c @ y32).double() for c in p.split(chunk_rows)]).mul_(-2).add_(sq).add_(y.pow(2).sum())
        w = d2.clamp_min_(0).sqrt_().clamp_min_(eps).reciprocal_()
        num = sum((wc.to(p.dtype) @ c).double() for wc, c in zip(w.split(chunk_rows), p.split(chunk_rows)))
        y_new = num / w.sum()
        moved = (y_new - y).norm().item()
        y = y_new
        if moved < tol * scale:
            break
    return y.to(points.dtype)
