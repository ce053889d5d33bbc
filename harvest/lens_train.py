"""Training a tuned lens: the tuned-lens library's recipe with a vocabulary-chunked KL (Gemma's 262k vocabulary).

`harvest lens train` = `run_lens_training(LensSpec)`: context windows from a dataset -> `train_lens` -> a lens
folder in the FAR.AI layout plus report.json (held-out KL per block, tuned vs logit lens) and kl.png.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import stat
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import torch

from .atomic import atomic_savefig, atomic_torch_save, atomic_write_json
from .errors import storage_error
from .flags import FlagConfig, flag_field
from .lens import FinalNorm, Lens, LensError, Unembed, final_norm_and_unembed
from .lock import exclusive
from .progress import progress_bar
from .spec import BosPolicy, ModelDtype, ModelText

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
            gx += u.chunk_grad(gz.reshape(L * n, -1), lo, hi)
        return gx.view(L, n, d).to(x.dtype), None, None, None


def chunked_kl(x: torch.Tensor, target: torch.Tensor, unembed: Unembed, chunk: int = 8192) -> torch.Tensor:
    """KL(softmax(unembed(target)) || softmax(unembed(x))) per position; x and target are final-normed hidden
    states, x [..., d] with target [..., d] of the same shape, or x [L, ..., d] (several layers against one
    target, which is then read out once). Gradients flow to x only (the target is the model's distribution)."""
    d = x.shape[-1]
    layered = x.dim() == target.dim() + 1
    xs = x if layered else x.unsqueeze(0)
    kl = _ChunkedKL.apply(
        xs.reshape(xs.shape[0], -1, d).float(), target.reshape(-1, d).float().detach(), unembed, chunk
    )
    return kl.reshape(xs.shape[:-1]) if layered else kl.reshape(x.shape[:-1])


# ---------------------------------------------------------------------------------------------
# training


KL_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


_f = flag_field


@dataclass
class LensTrainConfig(FlagConfig):
    """The tuned-lens library's recipe (scripts/train_loop.py + ingredients.Optimizer), scaled down.

    The library's SGD learning rate is `lr_scale * (1 - momentum)` = 1.0 * 0.1 = 0.1: PyTorch's momentum
    effectively multiplies the step by 1 / (1 - momentum), which that factor undoes. Nesterov, weight decay
    1e-3, no warmup for SGD, linear decay to 0, gradient norm clipped to 1.0 over all translators, forward
    KL to the model's own final distribution at the same position (token shift 0), loss = sum over layers of
    the per-layer mean KL (the library backpropagates layer by layer; the gradients are the same). The library
    takes 250 steps of 2^18 tokens; `steps` and `batch` are ours to choose for the CPU.
    """

    steps: int = _f(24, "Optimizer steps (the library: 250 steps of 262,144 tokens).")
    batch: int = _f(1, "Context windows per step.")
    heldout: int = _f(4, "Windows kept out of training (the last ones) for the KL report.")
    lr_scale: float = _f(1.0, "SGD learning rate = lr_scale x (1 - momentum), as the library.")
    momentum: float = _f(0.9, "Nesterov momentum.")
    weight_decay: float = _f(1e-3, "Weight decay (pulls translators toward the identity).")
    clip: float = _f(1.0, "Gradient-norm clip over all translators.")
    vocab_chunk: int = _f(8192, "Vocabulary rows per KL chunk (memory: rows x layers x tokens floats).")
    kl_dtype: Literal["float32", "bfloat16"] = _f(
        "float32",
        "Matmul dtype of the training KL: float32, or bfloat16 (1.5x faster per step on "
        "a 2-core AVX512-BF16 CPU; the held-out report is always float32).",
    )
    train_embedding: bool = _f(False, "Also train translator 0 (the embeddings; never applied to block outputs).")
    seed: int = _f(0, "Seed of the window order.")
    checkpoint_every: int = _f(4, "Steps between resumable checkpoints (an interrupted run resumes from the last).")

    def validate(self) -> "LensTrainConfig":
        self.check_types()
        for name in ("steps", "batch", "vocab_chunk", "checkpoint_every"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise LensError(f"{name} = {v!r} must be a positive integer")
        if not (self.lr_scale > 0 and 0 <= self.momentum < 1 and self.weight_decay >= 0 and self.clip > 0):
            raise LensError(
                f"lr_scale = {self.lr_scale}, momentum = {self.momentum}, weight_decay = {self.weight_decay}, "
                f"clip = {self.clip}: need lr_scale > 0, 0 <= momentum < 1, weight_decay >= 0 and clip > 0"
            )
        if not isinstance(self.heldout, int) or self.heldout < 1:
            raise LensError(f"heldout = {self.heldout!r}: hold out at least 1 window for the KL report")
        return self

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


def _residuals(
    bridge: Any, ids: torch.Tensor, n_layers: int, embedding: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Block outputs [n_layers, B, T, d] float32 and optionally the embeddings (block 0's input)."""
    from .run import forward_layers

    # forward_layers runs under inference_mode; clone so the tensors can be saved for the lens's backward.
    resid = forward_layers(bridge, ids, list(range(n_layers)), "resid_post").clone()
    emb = forward_layers(bridge, ids, [0], "resid_pre")[0].clone() if embedding else None
    return resid, emb


def _heldout_kl(
    lens: Lens, bridge: Any, windows: torch.Tensor, norm: FinalNorm, unembed: Unembed, cfg: LensTrainConfig, device: Any
) -> tuple[list[float], list[float]]:
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


def _training_identity(cfg: LensTrainConfig, windows: torch.Tensor, d: int, n: int) -> str:
    """What a checkpoint must match to be resumed: the recipe and the exact token windows."""
    h = hashlib.sha256(json.dumps({**asdict(cfg), "checkpoint_every": None, "d": d, "n": n}, sort_keys=True).encode())
    h.update(windows.numpy().tobytes())
    return h.hexdigest()


CHECKPOINT_KEYS = frozenset({"identity", "lens", "opt", "sched", "gen", "order", "pos", "step", "seconds"})


def load_checkpoint(path: Path) -> dict[str, Any]:
    """A lens-training checkpoint, read with weights_only=True (tensors and plain containers only: a planted
    pickle cannot run code) and never through a symlink; LensError with one line otherwise."""
    try:
        with os.fdopen(os.open(path, os.O_RDONLY | os.O_NOFOLLOW), "rb") as f:
            state = torch.load(f, map_location="cpu", weights_only=True)
    except Exception as e:  # UnpicklingError (a pickle with code), a symlink, a truncated file, ...
        raise LensError(
            f"cannot load the lens-training checkpoint {path} safely ({type(e).__name__}): it is not a "
            f"checkpoint of `harvest lens train` or it is damaged; remove it to start the training over"
        )
    if not isinstance(state, dict) or set(state) != CHECKPOINT_KEYS:
        raise LensError(f"{path} is not a checkpoint of `harvest lens train`: remove it to start the training over")
    return state


def train_lens(
    bridge: Any,
    windows: torch.Tensor,
    steps: int | None = None,
    cfg: LensTrainConfig | None = None,
    progress: bool = True,
    name: str = "",
    checkpoint: Path | None = None,
    log: Any = print,
) -> tuple[Lens, LensReport]:
    """Train translators 1..n_layers-1 (and 0 if cfg.train_embedding) on `windows` [n, ctx]; report held-out KL.
    With `checkpoint`, the state is saved there every cfg.checkpoint_every steps and a run of the same recipe
    on the same windows resumes from it, bit for bit."""
    cfg = replace(cfg or LensTrainConfig(), **({} if steps is None else {"steps": steps}))
    windows = torch.as_tensor(windows).long()
    if len(windows) <= cfg.heldout:
        raise LensError(
            f"{len(windows)} windows leave none for training after {cfg.heldout} held out: "
            f"use more tokens or hold out fewer windows"
        )
    train, held = windows[: len(windows) - cfg.heldout], windows[len(windows) - cfg.heldout :]
    cfg.validate()
    norm, unembed = final_norm_and_unembed(bridge)
    train_unembed = unembed.in_dtype(KL_DTYPES[cfg.kl_dtype])
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
    identity, start, before = _training_identity(cfg, windows, d, n), 0, 0.0
    if checkpoint is not None and os.path.lexists(checkpoint):
        state = load_checkpoint(checkpoint)
        if state["identity"] == identity:
            lens.load_state_dict(state["lens"])
            opt.load_state_dict(state["opt"])
            sched.load_state_dict(state["sched"])
            gen.set_state(state["gen"])
            order, pos, start, before = state["order"], state["pos"], state["step"], state["seconds"]
            log(f"resuming lens training at step {start}/{cfg.steps}")
        else:
            log(f"ignoring the checkpoint {checkpoint}: it is for other settings or data")
    t0 = time.time() - before

    with progress_bar("lens", cfg.steps, "steps", enabled=progress, completed=start, fields={"KL": ".3f"}) as bar:
        for step in range(start, cfg.steps):
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
            xs = torch.stack(
                [norm(lens.layer_translators[i](h) + h) for i in trained for h in [emb if i == 0 else resid[i - 1]]]
            )
            per_layer = chunked_kl(xs, target, train_unembed, cfg.vocab_chunk).flatten(1).mean(1)
            per_layer.sum().backward()
            total = per_layer.sum().item()
            torch.nn.utils.clip_grad_norm_(params, cfg.clip)
            opt.step()
            sched.step()
            bar.advance(1, KL=total / len(trained))
            if checkpoint is not None and (step + 1) % cfg.checkpoint_every == 0 and step + 1 < cfg.steps:
                state = {
                    "identity": identity,
                    "lens": lens.state_dict(),
                    "opt": opt.state_dict(),
                    "sched": sched.state_dict(),
                    "gen": gen.get_state(),
                    "order": order,
                    "pos": pos,
                    "step": step + 1,
                    "seconds": time.time() - t0,
                }
                try:
                    atomic_torch_save(checkpoint, state)
                except OSError as e:  # a full disk: one line, no temporary file left
                    raise storage_error(e, checkpoint)
    seconds = time.time() - t0
    lens.eval()
    kl_z, kl_t = _heldout_kl(lens, bridge, held, norm, unembed, cfg, device)
    report = LensReport(
        list(range(n)),
        kl_z,
        kl_t,
        cfg.steps,
        cfg.steps * cfg.batch * windows.shape[1],
        held.numel(),
        seconds,
        {**asdict(cfg), "lr": cfg.lr},
    )
    return lens.cpu(), report


# ---------------------------------------------------------------------------------------------
# `harvest lens train`


@dataclass
class LensSpec(ModelText):
    """What to train a lens on; with LensTrainConfig, the `harvest lens train` flags one to one."""

    context: int = _f(128, "Tokens per context window.")
    tokens: int = _f(
        3584,
        "Tokens read, rounded up to whole windows; the last `heldout` windows are held out "
        "(default: 28 windows, 24 to train on, 4 held out).",
    )
    prepend_bos: BosPolicy = _f(
        "auto", "Start each window with BOS: auto (where the tokenizer adds one), always, never."
    )
    model_dtype: ModelDtype = _f("float32", "dtype the model runs in: float32, bfloat16 or float16.")
    device: str = _f("auto", "auto (cuda if present), cpu, cuda or cuda:N.")
    out: str = _f("lenses/gemma-3-270m-sotu", "Output folder: config.json + params.pt (FAR.AI layout), report.json.")


REPORT_FILE, PLOT_FILE, CHECKPOINT_FILE = "report.json", "kl.png", "checkpoint.pt"
WORK_MARKER = ".mlsae-lens-work"  # in the hidden work folder: created by lens training, for lens training


def work_folder(out: Path, create: bool) -> Path | None:
    """The hidden sibling folder `.<out>.tmp` where lens training works (checkpoints included) until it is
    renamed to `out`; None if it does not exist and `create` is False.

    Its name is predictable (a rerun must find it to resume), so it is trusted only if this code made it: a
    private folder (0700) with a marker file, made under a random name and renamed into place whole. An
    existing one is reused only if it is a real folder (not a symlink) of this user, writable by nobody
    else, holding the marker; anything else, e.g. a folder planted in a shared directory with a checkpoint
    in it, is refused before any file in it is read."""
    tmp = out.with_name(f".{out.name}.tmp")
    if create and not os.path.lexists(tmp):
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            fresh = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".new", dir=out.parent))
            (fresh / WORK_MARKER).touch()
        except OSError as e:
            raise storage_error(e, out.parent)
        try:
            os.rename(fresh, tmp)  # whole, marker included
            return tmp
        except OSError:  # another run made it meanwhile: it is checked below like any existing one
            shutil.rmtree(fresh, ignore_errors=True)
    try:
        st = os.lstat(tmp)
    except FileNotFoundError:
        return None
    marker = tmp / WORK_MARKER
    ours = (
        stat.S_ISDIR(st.st_mode)
        and st.st_uid == os.geteuid()
        and not st.st_mode & 0o022
        and os.path.lexists(marker)
        and stat.S_ISREG(os.lstat(marker).st_mode)
    )
    if not ours:
        raise LensError(
            f"{tmp} exists but is not a work folder that `harvest lens train` of this user created: "
            f"remove it (nothing in it is read), or choose another --out"
        )
    return tmp


def run_lens_training(spec: LensSpec, cfg: LensTrainConfig, progress: bool = True, log: Any = print) -> LensReport:
    """Train a lens for spec.model on spec.dataset; write it atomically to spec.out with its report."""
    from .models import check_context, load_bridge, load_config, load_tokenizer, resolve_device, resolve_model
    from .run import TORCH_DTYPES
    from .text import Documents, adds_bos, read_windows, resolve_dataset

    out = Path(spec.out)
    if (out / "params.pt").exists():
        raise LensError(f"{out} already holds a lens: choose another --out, or remove it to retrain")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise LensError(f"{out} exists and is not empty: choose another --out")
    work_folder(out, create=False)  # a foreign work folder is refused before any work
    cfg.validate()
    spec.check_types()
    if spec.context < 2 or spec.tokens < 1:
        raise LensError(f"context = {spec.context!r}, tokens = {spec.tokens!r}: use a context >= 2 and tokens >= 1")
    n_windows = -(-spec.tokens // spec.context)
    if n_windows <= cfg.heldout:
        raise LensError(
            f"{n_windows} windows of {spec.context} tokens leave none for training after {cfg.heldout} "
            f"held out: raise --tokens or lower --heldout"
        )
    model = resolve_model(spec.model)
    model_cfg = load_config(model)
    check_context(model_cfg, spec.context, spec.model)
    device = resolve_device(spec.device)
    data = resolve_dataset(spec.dataset)
    tokenizer = load_tokenizer(model)
    bos = {"auto": adds_bos(tokenizer), "always": True, "never": False}[spec.prepend_bos]
    docs = Documents(data, spec.split, spec.text_column, spec.dataset_config, strict=spec.strict_text)
    windows = read_windows(docs, tokenizer, spec.context, n_windows, bos, log=log)
    bridge = load_bridge(model, tokenizer, device, TORCH_DTYPES[spec.model_dtype])
    # `out` never holds half a lens: the work happens in the hidden folder, renamed to `out` when complete;
    # rerunning the same command resumes from its last checkpoint.
    tmp = work_folder(out, create=True)
    with exclusive(tmp, "harvest lens train"):  # a second run for this --out stops here, naming this one
        lens, report = train_lens(
            bridge,
            torch.from_numpy(windows),
            cfg=cfg,
            progress=progress,
            name=model.path if not Path(model.path).exists() else model.name,
            checkpoint=tmp / CHECKPOINT_FILE,
            log=log,
        )
        report.config = {**report.config, **asdict(spec), "n_layers": model_cfg.num_hidden_layers, "prepend_bos": bos}
        lens.save(tmp)
        atomic_write_json(tmp / REPORT_FILE, asdict(report))
        plot_kl(report, tmp / PLOT_FILE)
        # no longer a work folder: a run arriving from now on is refused instead of resuming in it
        for f in (CHECKPOINT_FILE, WORK_MARKER):
            (tmp / f).unlink(missing_ok=True)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # a finished lens is an ordinary folder
    if out.exists():
        out.rmdir()
    tmp.rename(out)
    return report


def plot_kl(report: LensReport, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.2))
    ax.plot(report.blocks, report.kl_logit_lens, "o-", label="logit lens")
    ax.plot(report.blocks, report.kl_tuned_lens, "o-", label="tuned lens")
    ax.set_yscale("log")
    ax.set_xlabel("block (output)")
    ax.set_ylabel("KL to final layer (nats/token)")
    ax.set_title(f"held-out KL, {report.heldout_tokens:,} tokens; trained on {report.train_tokens:,}", fontsize=9)
    ax.legend()
    fig.tight_layout()
    atomic_savefig(fig, path, dpi=120)
    plt.close(fig)
