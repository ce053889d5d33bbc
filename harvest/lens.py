"""Tuned lens (Belrose et al. 2023): per-layer affine translators, FAR.AI file format, exact inverse, training.

A translator is T_i(h) = h + W_i h + b_i, zero-initialized, so a fresh lens is the logit lens. Translator i
was trained on Hugging Face `hidden_states[i]`, the INPUT of block i; see `translator_for_block_output`.
Files follow the `tuned-lens` library (FAR.AI / AlignmentResearch): a folder with `config.json` and
`params.pt` holding a flat state dict `{i}.weight` [d, d], `{i}.bias` [d]. Torch only: the package itself
pins old dependencies and does not know Gemma 3.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from .errors import UserError

HUB_REPO = "AlignmentResearch/tuned-lens"  # a Hugging Face *space*; lenses live under lens/<model id>/
CONFIG_FILE, PARAMS_FILE = "config.json", "params.pt"


class LensError(UserError):
    """A lens file is missing, malformed, in an old layout, or does not fit the model."""


def translator_for_block_output(block: int, n_layers: int) -> int | None:
    """The translator that applies to the OUTPUT of block `block` (blocks.{block}.hook_resid_post).

    The library trains translator i on Hugging Face `hidden_states[i]`; hidden_states[0] is the embedding
    output and hidden_states[i] for i >= 1 is the output of block i - 1, i.e. the INPUT of block i. So the
    output of block l is hidden_states[l + 1] and takes translator l + 1. The last block's output feeds the
    final norm and unembedding directly: the model's own logits, hence the identity (None). The reference
    implementation used translator l for block l, an off-by-one that decodes every layer with the
    translator trained for the layer before it.
    """
    if not 0 <= block < n_layers:
        raise ValueError(f"block {block} out of range for a model with {n_layers} layers")
    return None if block == n_layers - 1 else block + 1


@dataclass
class LensConfig:
    """The library's `TunedLensConfig`, key for key, so its loader reads our files and vice versa."""

    base_model_name_or_path: str
    d_model: int
    num_hidden_layers: int
    bias: bool = True
    base_model_revision: str | None = None
    unembed_hash: str | None = None
    lens_type: str = "linear_tuned_lens"

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "LensConfig":
        known = {f for f in cls.__dataclass_fields__}
        missing = [k for k in ("d_model", "num_hidden_layers") if k not in d]
        if missing:
            raise LensError(f"lens config.json lacks {', '.join(missing)}: use a tuned-lens folder "
                            f"(config.json + params.pt) or retrain with `harvest lens train`")
        d = {k: v for k, v in d.items() if k in known}  # unknown keys are ignored, as the library does
        d.setdefault("base_model_name_or_path", "")
        return cls(**d)


# ---------------------------------------------------------------------------------------------
# the model's readout: final norm + unembedding (+ Gemma's logit softcap)


@dataclass
class Unembed:
    """Logits = softcap(x @ weight.T + bias); weight [vocab, d]. Computed in float32, also by vocab slices."""

    weight: torch.Tensor
    bias: torch.Tensor | None = None
    softcap: float | None = None

    def chunk(self, x: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
        w = self.weight[lo:hi].float()
        b = None if self.bias is None else self.bias[lo:hi].float()
        z = F.linear(x.float(), w, b)
        return z if not self.softcap else self.softcap * torch.tanh(z / self.softcap)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.chunk(x, 0, self.weight.shape[0])

    @property
    def vocab(self) -> int:
        return self.weight.shape[0]


class FinalNorm(nn.Module):
    """The model's final norm, fed and returning float32 whatever the model's dtype (LayerNorm would
    refuse a float32 input with bf16 weights; RMSNorm upcasts anyway)."""

    def __init__(self, norm: nn.Module):
        super().__init__()
        self.norm = norm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = next(self.norm.parameters(), None)
        return self.norm(x if p is None else x.to(p.dtype)).float()


def _unwrap(m: Any) -> Any:
    """TransformerBridge wraps HF modules; the original module computes the same thing without hooks."""
    inner = getattr(m, "_original_component", None)
    return m if inner is None else inner


def final_norm_and_unembed(bridge: Any) -> tuple[FinalNorm, Unembed]:
    """The final norm and unembedding of the Hugging Face model under a TransformerBridge."""
    hf = bridge.original_model
    base = hf.base_model
    norm = next((getattr(base, n) for n in ("norm", "final_layer_norm", "ln_f") if getattr(base, n, None) is not None),
                None)
    out = hf.get_output_embeddings()
    if norm is None or out is None:
        raise LensError(f"cannot find the final norm / unembedding of {type(hf).__name__}: "
                        f"the tuned lens supports models with base_model.norm or .final_layer_norm")
    out = _unwrap(out)
    cfg = hf.config.get_text_config() if hasattr(hf.config, "get_text_config") else hf.config
    cap = getattr(cfg, "final_logit_softcapping", None)  # Gemma 2/3: logits = cap * tanh(logits / cap)
    return FinalNorm(_unwrap(norm)), Unembed(out.weight.detach(), None if getattr(out, "bias", None) is None
                                             else out.bias.detach(), float(cap) if cap else None)


# ---------------------------------------------------------------------------------------------
# the lens


class Lens(nn.Module):
    """Translators 0..n_layers-1 (nn.Linear, zero-initialized); `{i}.weight`/`{i}.bias` on disk."""

    def __init__(self, config: LensConfig):
        super().__init__()
        self.config = config
        d = config.d_model
        n = config.num_hidden_layers
        self.layer_translators = nn.ModuleList(nn.Linear(d, d, bias=config.bias) for _ in range(n))
        for t in self.layer_translators:
            nn.init.zeros_(t.weight)
            if t.bias is not None:
                nn.init.zeros_(t.bias)

    @classmethod
    def for_model(cls, d_model: int, n_layers: int, name: str = "", revision: str | None = None) -> "Lens":
        return cls(LensConfig(name, d_model, n_layers, base_model_revision=revision))

    @property
    def n_layers(self) -> int:
        return self.config.num_hidden_layers

    def translator(self, block: int) -> nn.Linear | None:
        i = translator_for_block_output(block, self.n_layers)
        return None if i is None else self.layer_translators[i]

    def transform(self, h: torch.Tensor, block: int) -> torch.Tensor:
        """Lens space for the output of block `block`: h + W h + b (computed in the lens's dtype)."""
        t = self.translator(block)
        if t is None:
            return h
        x = h.to(t.weight.dtype)
        # Residual form, as the library: weight decay pulls toward the identity, not toward zero.
        return (x + t(x)).to(h.dtype)

    def inverse(self, y: torch.Tensor, block: int) -> torch.Tensor:
        """Exact inverse of `transform`: h = (I + W)^-1 (y - b), solved in float64, any leading shape."""
        t = self.translator(block)
        if t is None:
            return y
        w = t.weight.detach().double()
        a = torch.eye(w.shape[0], dtype=torch.float64, device=w.device) + w
        rhs = y.double() - (0 if t.bias is None else t.bias.detach().double())
        # Row vectors: y = h (I + W)^T + b, so solve X (I + W)^T = y - b.
        h = torch.linalg.solve(a.T, rhs.reshape(-1, rhs.shape[-1]), left=False)
        return h.reshape(y.shape).to(y.dtype)

    def logits(self, h: torch.Tensor, block: int, final_norm: Callable, unembed: Callable) -> torch.Tensor:
        return unembed(final_norm(self.transform(h, block)))

    # --- files ---------------------------------------------------------------------------------

    def save(self, folder: str | Path, dtype: torch.dtype = torch.float32) -> Path:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().to("cpu", dtype).clone() for k, v in self.layer_translators.state_dict().items()}
        torch.save(state, folder / PARAMS_FILE)
        (folder / CONFIG_FILE).write_text(json.dumps(asdict(self.config), indent=2))
        return folder

    @classmethod
    def load(cls, folder: str | Path, d_model: int | None = None, n_layers: int | None = None) -> "Lens":
        """A FAR.AI / tuned-lens folder (config.json + params.pt), checked against the model's shape."""
        folder = Path(folder)
        cfg_path, params_path = folder / CONFIG_FILE, folder / PARAMS_FILE
        if not folder.is_dir() or not params_path.is_file():
            raise LensError(f"no lens at {folder}: expected a folder with {CONFIG_FILE} and {PARAMS_FILE}")
        try:
            state = torch.load(params_path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise LensError(f"cannot read {params_path} ({type(e).__name__}): re-download the lens or retrain it "
                            f"with `harvest lens train`")
        if not isinstance(state, dict):
            raise LensError(f"{params_path} is not a state dict: re-download the lens or retrain it with "
                            f"`harvest lens train`")
        if any(k.startswith(("layer_translators.", "unembed.", "layer_norm", "probes.")) for k in state):
            raise LensError(f"{params_path} has the old tuned-lens v0.0.x layout (keys like layer_translators.0.weight"
                            f" or unembed.*): "
                            f"convert it with tuned-lens>=0.1 (TunedLens.load then .save) or retrain with "
                            f"`harvest lens train`")
        if not cfg_path.is_file():
            raise LensError(f"no {CONFIG_FILE} next to {params_path}: lenses are a folder with both files")
        try:
            raw = json.loads(cfg_path.read_text())
        except json.JSONDecodeError as e:
            raise LensError(f"{cfg_path} is not valid JSON ({e.msg}): re-download the lens")
        config = LensConfig.from_dict(raw)
        found = (config.d_model, config.num_hidden_layers)
        expected = (d_model or found[0], n_layers or found[1])
        if found != expected:
            raise LensError(f"lens {folder} is for d_model={found[0]}, {found[1]} layers but the model has "
                            f"d_model={expected[0]}, {expected[1]} layers: use the lens trained for this model")
        lens = cls(config)
        want = lens.layer_translators.state_dict()
        if set(state) != set(want):
            extra, miss = sorted(set(state) - set(want))[:3], sorted(set(want) - set(state))[:3]
            raise LensError(f"{params_path} keys do not match {found[1]} translators (missing {miss}, unexpected "
                            f"{extra}): use the lens trained for this model")
        for k, v in state.items():
            if tuple(v.shape) != tuple(want[k].shape):
                raise LensError(f"{params_path}: {k} has shape {tuple(v.shape)}, expected {tuple(want[k].shape)} "
                                f"for d_model={expected[0]}: use the lens trained for this model")
        lens.layer_translators.load_state_dict({k: v.float() for k, v in state.items()})
        return lens

    @classmethod
    def from_hub(cls, model_id: str, d_model: int | None = None, n_layers: int | None = None,
                 revision: str = "main") -> "Lens":
        """A pretrained lens from the space AlignmentResearch/tuned-lens, folder lens/<model id>/."""
        try:
            from huggingface_hub import hf_hub_download

            paths = [hf_hub_download(HUB_REPO, f, repo_type="space", subfolder=f"lens/{model_id}", revision=revision)
                     for f in (PARAMS_FILE, CONFIG_FILE)]
        except Exception as e:  # offline, no such lens, network errors: all one message
            raise LensError(f"cannot fetch the tuned lens for {model_id!r} from the Hub space {HUB_REPO} "
                            f"({type(e).__name__}): go online, pass a local lens folder, or train one with "
                            f"`harvest lens train`")
        return cls.load(Path(paths[0]).parent, d_model, n_layers)


# ---------------------------------------------------------------------------------------------
# KL in vocabulary chunks


class _ChunkedKL(torch.autograd.Function):
    """KL(p || q_l) with p = softmax(unembed(target)), q_l = softmax(unembed(x_l)), never holding full logits.

    x [L, N, d] holds L candidates (layers) for the same N target rows [N, d], so the target's logits are
    computed once per chunk for all layers. KL = sum_v p_v (zp_v - zq_v) - lse(zp) + lse(zq): the forward pass
    keeps running (online) logsumexps and the p-weighted sum over vocabulary chunks; the backward pass
    recomputes each chunk's logits and pushes dKL/dzq = q - p (times the softcap's derivative) back through
    the chunk's unembedding rows.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, target: torch.Tensor, unembed: Unembed, chunk: int) -> torch.Tensor:
        L, n, d = x.shape
        dev = x.device
        mp, sp = torch.full((n,), -math.inf, device=dev), torch.zeros(n, device=dev)
        mq, sq = torch.full((L, n), -math.inf, device=dev), torch.zeros(L, n, device=dev)
        cross = torch.zeros(L, n, device=dev)
        for lo in range(0, unembed.vocab, chunk):
            hi = min(lo + chunk, unembed.vocab)
            zq, zp = unembed.chunk(x.reshape(L * n, d), lo, hi).view(L, n, -1), unembed.chunk(target, lo, hi)
            new_mp, new_mq = torch.maximum(mp, zp.amax(-1)), torch.maximum(mq, zq.amax(-1))
            scale_p = torch.exp(mp - new_mp)
            ep = torch.exp(zp - new_mp[:, None])
            sp = sp * scale_p + ep.sum(-1)
            cross = cross * scale_p + (ep * zp).sum(-1) - (ep * zq).sum(-1)
            sq = sq * torch.exp(mq - new_mq) + torch.exp(zq - new_mq[..., None]).sum(-1)
            mp, mq = new_mp, new_mq
        lse_p, lse_q = mp + sp.log(), mq + sq.log()
        ctx.save_for_backward(x, target, lse_p, lse_q)
        ctx.unembed, ctx.chunk = unembed, chunk
        return cross / sp - lse_p + lse_q

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        x, target, lse_p, lse_q = ctx.saved_tensors
        u: Unembed = ctx.unembed
        L, n, d = x.shape
        gx = torch.zeros(L * n, d, device=x.device)
        for lo in range(0, u.vocab, ctx.chunk):
            hi = min(lo + ctx.chunk, u.vocab)
            zq, zp = u.chunk(x.reshape(L * n, d), lo, hi).view(L, n, -1), u.chunk(target, lo, hi)
            gz = (torch.exp(zq - lse_q[..., None]) - torch.exp(zp - lse_p[:, None])) * g[..., None]
            if u.softcap:  # zq = c tanh(z / c): dzq/dz = 1 - (zq / c)^2
                gz = gz * (1 - (zq / u.softcap) ** 2)
            gx += gz.reshape(L * n, -1) @ u.weight[lo:hi].float()
        return gx.view(L, n, d).to(x.dtype), None, None, None


def chunked_kl(x: torch.Tensor, target: torch.Tensor, unembed: Unembed, chunk: int = 8192) -> torch.Tensor:
    """KL(softmax(unembed(target)) || softmax(unembed(x))) per position; x and target are final-normed hidden
    states, x [..., d] with target [..., d] of the same shape, or x [L, ..., d] (several layers against one
    target, which is then read out once). Gradients flow to x only (the target is the model's distribution)."""
    d = x.shape[-1]
    layered = x.dim() == target.dim() + 1
    xs = x if layered else x.unsqueeze(0)
    kl = _ChunkedKL.apply(xs.reshape(xs.shape[0], -1, d).float(), target.reshape(-1, d).float().detach(),
                          unembed, chunk)
    return kl.reshape(xs.shape[:-1]) if layered else kl.reshape(x.shape[:-1])


# ---------------------------------------------------------------------------------------------
# training


@dataclass
class LensTrainConfig:
    """The tuned-lens library's recipe (scripts/train_loop.py + ingredients.Optimizer), scaled down.

    The library's SGD learning rate is `lr_scale * (1 - momentum)` = 1.0 * 0.1 = 0.1: PyTorch's momentum
    effectively multiplies the step by 1 / (1 - momentum), which that factor undoes. Nesterov, weight decay
    1e-3, no warmup for SGD, linear decay to 0, gradient norm clipped to 1.0 over all translators, forward
    KL to the model's own final distribution at the same position (token shift 0), loss = sum over layers of
    the per-layer mean KL (the library backpropagates layer by layer; the gradients are the same). The library
    takes 250 steps of 2^18 tokens; `steps` and `batch` are ours to choose for the CPU.
    """

    steps: int = 250
    batch: int = 8  # windows per step
    lr_scale: float = 1.0
    momentum: float = 0.9
    weight_decay: float = 1e-3
    clip: float = 1.0
    heldout: int = 16  # windows kept out of training for the KL report (taken from the end)
    vocab_chunk: int = 8192
    train_embedding: bool = False  # translator 0 (embeddings) is never used on harvested block outputs
    seed: int = 0

    @property
    def lr(self) -> float:
        return self.lr_scale * (1 - self.momentum)


@dataclass
class LensReport:
    blocks: list[int]  # block outputs evaluated (their translators are block + 1; the last is identity)
    kl_logit_lens: list[float]  # held-out mean KL, nats/token, zero lens
    kl_tuned_lens: list[float]
    steps: int
    train_tokens: int
    heldout_tokens: int
    seconds: float
    config: dict = field(default_factory=dict)

    def table(self) -> str:
        rows = ["| block | logit lens KL | tuned lens KL |", "|---:|---:|---:|"]
        rows += [f"| {b} | {a:.4f} | {t:.4f} |" for b, a, t in zip(self.blocks, self.kl_logit_lens, self.kl_tuned_lens)]
        return "\n".join(rows)


def _residuals(bridge: Any, ids: torch.Tensor, n_layers: int,
               embedding: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Block outputs [n_layers, B, T, d] float32 and optionally the embeddings (block 0's input)."""
    from .run import forward_layers

    # forward_layers runs under inference_mode; clone so the tensors can be saved for the lens's backward.
    resid = forward_layers(bridge, ids, list(range(n_layers)), "resid_post").clone()
    emb = forward_layers(bridge, ids, [0], "resid_pre")[0].clone() if embedding else None
    return resid, emb


def _heldout_kl(lens: Lens, bridge: Any, windows: torch.Tensor, norm: FinalNorm, unembed: Unembed,
                cfg: LensTrainConfig, device: Any) -> tuple[list[float], list[float]]:
    n = lens.n_layers
    zero = Lens(lens.config).to(device)
    tot_t, tot_z = torch.zeros(n, dtype=torch.float64), torch.zeros(n, dtype=torch.float64)
    count = 0
    with torch.no_grad():
        for s in range(0, len(windows), cfg.batch):
            ids = windows[s : s + cfg.batch].to(device)
            resid, _ = _residuals(bridge, ids, n, False)
            target = norm(resid[-1])
            xs = torch.stack([norm(m.transform(resid[l], l)) for m in (lens, zero) for l in range(n)])
            kl = chunked_kl(xs, target, unembed, cfg.vocab_chunk).flatten(1).sum(1).double().view(2, n)
            tot_t += kl[0]
            tot_z += kl[1]
            count += ids.numel()
    return (tot_z / count).tolist(), (tot_t / count).tolist()


def train_lens(bridge: Any, windows: torch.Tensor, steps: int | None = None, cfg: LensTrainConfig | None = None,
               progress: bool = True, name: str = "") -> tuple[Lens, LensReport]:
    """Train translators 1..n_layers-1 (and 0 if cfg.train_embedding) on `windows` [n, ctx]; report held-out KL."""
    cfg = replace(cfg or LensTrainConfig(), **({} if steps is None else {"steps": steps}))
    windows = torch.as_tensor(windows).long()
    if len(windows) <= cfg.heldout:
        raise LensError(f"{len(windows)} windows leave none for training after {cfg.heldout} held out: "
                        f"use more tokens or hold out fewer windows")
    train, held = windows[: len(windows) - cfg.heldout], windows[len(windows) - cfg.heldout :]
    norm, unembed = final_norm_and_unembed(bridge)
    device = unembed.weight.device
    n, d = bridge.cfg.n_layers, bridge.cfg.d_model
    lens = Lens.for_model(d, n, name).to(device)
    trained = list(range(0 if cfg.train_embedding else 1, n))
    params = [p for i in trained for p in lens.layer_translators[i].parameters()]
    for i in set(range(n)) - set(trained):
        lens.layer_translators[i].requires_grad_(False)
    opt = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, nesterov=True, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: max(0.0, 1 - s / cfg.steps))
    gen = torch.Generator().manual_seed(cfg.seed)
    order, pos = torch.randperm(len(train), generator=gen), 0
    t0 = time.time()

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("lens"), BarColumn(), MofNCompleteColumn(), TextColumn("KL {task.fields[kl]:.3f}"),
                  TimeElapsedColumn(), disable=not progress, transient=False) as bar:
        task = bar.add_task("train", total=cfg.steps, kl=float("nan"))
        for step in range(cfg.steps):
            if pos + cfg.batch > len(order):  # new epoch, reshuffled
                order, pos = torch.randperm(len(train), generator=gen), 0
            ids = train[order[pos : pos + cfg.batch]].to(device)
            pos += cfg.batch
            resid, emb = _residuals(bridge, ids, n, cfg.train_embedding)
            with torch.no_grad():
                target = norm(resid[-1])
            opt.zero_grad(set_to_none=False)
            # Translator i reads hidden_states[i]: the embeddings or block i-1's output. All layers go through
            # one chunked KL so the target's logits are computed once per vocabulary chunk, not once per
            # layer; the sum of per-layer mean KLs gives each translator the gradient of its own layer's
            # loss, as the library's one-backward-per-layer loop does.
            xs = torch.stack([norm(lens.layer_translators[i](h) + h)
                              for i in trained for h in [emb if i == 0 else resid[i - 1]]])
            per_layer = chunked_kl(xs, target, unembed, cfg.vocab_chunk).flatten(1).mean(1)
            per_layer.sum().backward()
            total = per_layer.sum().item()
            torch.nn.utils.clip_grad_norm_(params, cfg.clip)
            opt.step()
            sched.step()
            bar.update(task, advance=1, kl=total / len(trained))
    seconds = time.time() - t0
    lens.eval()
    kl_z, kl_t = _heldout_kl(lens, bridge, held, norm, unembed, cfg, device)
    report = LensReport(list(range(n)), kl_z, kl_t, cfg.steps, cfg.steps * cfg.batch * windows.shape[1],
                        held.numel(), seconds, {**asdict(cfg), "lr": cfg.lr})
    return lens.cpu(), report
