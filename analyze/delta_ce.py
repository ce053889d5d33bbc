"""Delta CE and KL (method.md Sec. 3): splice an SAE's reconstruction into the forward pass at one layer
and measure how much worse the model predicts the next token than the CLEAN model does.

For each layer l of the SAE, the hook point the cache was harvested at (`blocks.{l}.hook_resid_post` by
default) is replaced by sae(x).x_hat (model space) and the rest of the model runs on it;
    delta CE_l = mean CE(spliced_l) - mean CE(clean),   KL_l = mean KL(p_clean || p_spliced_l),
both means over the same counted predictions.

Special tokens (BOS/EOS/PAD) follow the run's mode (train/special.py; `special_tokens` overrides it):
  - exclude: only non-special positions are spliced; special tokens keep their clean activation (the
    SAE never saw them; Gemma's BOS, ~1e5 in one dimension, would otherwise be the whole story), and a
    prediction t -> t+1 counts when BOTH tokens are non-special: a special target is a document
    boundary, not text, and a prediction made from a special position reads an unspliced vector;
  - include-real: every position is spliced with the reconstruction of its real vector, every
    prediction counts;
  - reference: as the reference code, the SAE sees ZEROS at special positions, so its (zero)
    reconstruction is spliced there, and every prediction counts.

Memory. Gemma's vocabulary is 262,144, so logits are never formed for a whole batch: every run stops at
the unembedding's input (`unembed.hook_in`, the final normed state, [batch, ctx, d]); the clean and the
L spliced states of a batch are kept (small), and logits are computed in blocks of at most ~2^24 floats
of rows x vocab, the clean block once for all layers. This also skips the unembedding inside each
forward, which for Gemma costs as much as all its blocks. `check_logits` verifies once per run that
this path reproduces the model's own logits.

Windows. By default the run's held-out context windows from the cache (same tokenizer, context and BOS
policy as the activations the SAE was trained on; no token of them was trained on: train/split.py),
spread evenly over the held-out set. With `dataset`, fresh windows are tokenized with harvest.text using
the cache's context and prepend_bos settings: the first windows of that dataset.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from analyze.results import DeltaCeResult, WindowSource
from harvest import open_cache
from harvest.atomic import atomic_savefig
from harvest.errors import ModelError, UserError
from harvest.models import ModelSource, load_bridge, load_tokenizer, resolve_device, resolve_model
from harvest.run import TORCH_DTYPES
from harvest.text import iter_documents, make_windows, resolve_dataset
from train.record import RunError, load_run
from train.special import SpecialTokens
from train.split import HeldOut

FINAL_HOOK = "unembed.hook_in"  # the final normed residual: the unembedding's input
DELTA_CE_PNG = "delta_ce.png"
LOGIT_FLOATS = 2**24  # rows x vocab floats per logits block (64 MB in float32)

ReconstructFn = Callable[[Tensor, int], Tensor]  # (vectors [n, d] of layer l, l) -> reconstructions [n, d]


class DeltaCeError(UserError):
    """Delta CE cannot be computed for this model, run or input."""


class _Stop(Exception):
    """Raised at the unembedding's input: the (vocab-sized) logits are computed later, in blocks."""


# ---------------------------------------------------------------------------------------------
# forward passes


def final_states(bridge: Any, ids: Tensor, fwd_hooks: Sequence[tuple[str, Callable]] = ()) -> Tensor:
    """The final normed residual [batch, ctx, d] of a forward pass with `fwd_hooks`; no logits."""
    out: list[Tensor] = []

    def grab(x: Tensor, hook: Any) -> Tensor:
        out.append(x.detach().clone())
        raise _Stop

    try:
        with torch.inference_mode():
            bridge.run_with_hooks(ids, fwd_hooks=[*fwd_hooks, (FINAL_HOOK, grab)], return_type=None)
    except _Stop:
        pass
    if not out:
        raise DeltaCeError(
            f"the model has no {FINAL_HOOK} hook that fires: delta CE needs a TransformerLens 4 "
            f"bridge with an unembedding component"
        )
    return out[0]


def logits_of(bridge: Any, h: Tensor) -> Tensor:
    """Logits of final normed states h [..., d]: the unembedding, then the final soft-cap where the
    Hugging Face model applies one after it (Gemma 2)."""
    with torch.inference_mode():
        logits = bridge.unembed(h)
        cap = getattr(getattr(bridge, "original_model", None), "config", None)
        cap = getattr(cap, "final_logit_softcapping", None)
        if cap:
            logits = torch.tanh(logits / cap) * cap
        return logits


def check_logits(bridge: Any, ids: Tensor, n: int = 16) -> None:
    """The chunked path (final state -> unembedding) reproduces the model's own logits on a short prefix."""
    ids = ids[:1, :n]
    with torch.inference_mode():
        want = bridge(ids, return_type="logits").float()
    got = logits_of(bridge, final_states(bridge, ids)).float()
    err = (want - got).abs().max().item()
    if got.shape != want.shape or not err <= 1e-3 * want.abs().max().item() + 1e-5:
        raise DeltaCeError(
            f"logits from the unembedding differ from the model's own (max |diff| {err:.3g}): this "
            f"architecture post-processes its logits in a way delta CE does not reproduce"
        )


def sae_reconstructor(sae: Callable, lens: Any = None) -> ReconstructFn:
    """Model-space vectors of layer l -> the SAE's reconstruction in model space. An SAE trained on a cache
    harvested through a tuned lens sees lens.transform(x, l), and its reconstruction goes back with the
    exact inverse (I + W)^-1 (y - b) (method.md Sec. 5; the reference kept only the inverse's diagonal)."""

    def reconstruct(x: Tensor, layer: int) -> Tensor:
        if lens is None:
            return sae(x.float()).x_hat
        return lens.inverse(sae(lens.transform(x.float(), layer)).x_hat, layer)

    return reconstruct


def _splice(layer: int, reconstruct_fn: ReconstructFn, keep: Tensor, zeroed: ZeroedSplice | None = None) -> Callable:
    def hook_fn(x: Tensor, hook: Any) -> Tensor:
        out = x.clone()  # a returned tensor replaces the activation (TransformerLens hooks)
        fed = keep if zeroed is None else keep & ~zeroed.mask
        out[fed] = reconstruct_fn(x[fed], layer).to(x.dtype)
        if zeroed is not None:
            out[zeroed.mask] = zeroed.value(layer).to(x.dtype)
        return out

    return hook_fn


@dataclass
class ZeroedSplice:
    """Special-token mode `reference` (train/special.py): the SAE sees ZEROS at `mask` [batch, ctx]; its
    output there, mapped to model space, is `value(layer)` [d] (no SAE call needed: a zero vector
    standardizes to zero and reconstructs to exactly zero)."""

    mask: Tensor
    value: Callable[[int], Tensor]


# ---------------------------------------------------------------------------------------------
# sums over predictions


@dataclass
class DeltaCeSums:
    """Sums over counted predictions, mergeable across batches (float64)."""

    layers: list[int]
    n: int  # predictions counted
    ce_clean: float  # sum of the clean model's CE
    ce: list[float]  # per layer: sum of the spliced model's CE
    kl: list[float]  # per layer: sum of KL(p_clean || p_spliced)

    @classmethod
    def zeros(cls, layers: Sequence[int]) -> "DeltaCeSums":
        return cls(list(layers), 0, 0.0, [0.0] * len(layers), [0.0] * len(layers))

    def __add__(self, o: "DeltaCeSums") -> "DeltaCeSums":
        assert self.layers == o.layers
        return DeltaCeSums(
            self.layers,
            self.n + o.n,
            self.ce_clean + o.ce_clean,
            [a + b for a, b in zip(self.ce, o.ce)],
            [a + b for a, b in zip(self.kl, o.kl)],
        )

    def means(self) -> dict[str, Any]:
        n = self.n or float("nan")
        clean = self.ce_clean / n
        return {
            "tokens": self.n,
            "clean_ce": clean,
            "ce": [c / n for c in self.ce],
            "delta_ce": [c / n - clean for c in self.ce],
            "kl": [k / n for k in self.kl],
        }


def spliced_metrics(
    bridge: Any,
    ids: Tensor,
    layers: int | Sequence[int],
    reconstruct_fn: ReconstructFn,
    keep_mask: Tensor,
    hook: str = "resid_post",
    rows: int | None = None,
    zeroed: ZeroedSplice | None = None,
) -> DeltaCeSums:
    """CE of the clean model and, per layer, of the model with blocks.{l}.hook_{hook} replaced by
    reconstruct_fn at the kept positions; KL(clean || spliced). ids, keep_mask: [batch, ctx]. A prediction
    t -> t+1 counts when keep_mask holds at both t and t+1 (module docstring)."""
    layers = [layers] if isinstance(layers, int) else list(layers)
    keep = keep_mask.to(device=ids.device, dtype=torch.bool)
    counted = keep[:, :-1] & keep[:, 1:]
    targets = ids[:, 1:][counted].unsqueeze(1)
    clean = final_states(bridge, ids)[:, :-1][counted]
    spliced = [
        final_states(bridge, ids, [(f"blocks.{l}.hook_{hook}", _splice(l, reconstruct_fn, keep, zeroed))])[:, :-1][
            counted
        ]
        for l in layers
    ]
    n = targets.shape[0]
    rows = rows or max(1, LOGIT_FLOATS // int(bridge.cfg.d_vocab))
    ce_clean = torch.zeros((), dtype=torch.float64, device=ids.device)
    ce = torch.zeros(len(layers), dtype=torch.float64, device=ids.device)
    kl = torch.zeros(len(layers), dtype=torch.float64, device=ids.device)
    with torch.inference_mode():
        for s in range(0, n, rows):
            t = targets[s : s + rows]
            lp_clean = logits_of(bridge, clean[s : s + rows]).float().log_softmax(-1)
            ce_clean -= lp_clean.gather(1, t).sum(dtype=torch.float64)
            for i, h in enumerate(spliced):
                lp = logits_of(bridge, h[s : s + rows]).float().log_softmax(-1)
                ce[i] -= lp.gather(1, t).sum(dtype=torch.float64)
                # sum_v p_clean (log p_clean - log p_spliced); exactly 0 where the two agree
                kl[i] += F.kl_div(lp, lp_clean, reduction="none", log_target=True).sum(dtype=torch.float64)
                del lp
    return DeltaCeSums(layers, n, ce_clean.item(), ce.tolist(), kl.tolist())


# ---------------------------------------------------------------------------------------------
# inputs


def cache_windows(cache: Any, heldout: HeldOut, n_windows: int) -> tuple[np.ndarray, WindowSource]:
    """Up to `n_windows` of the run's held-out context windows [n, ctx] (every token of each never trained
    on), spread evenly over the held-out set, in cache order. A legacy chunk split holds out whole windows
    only by chance: those count, and a run with none is refused."""
    if heldout.is_legacy:
        full = np.bincount(
            cache.read_tokens("seq").numpy()[heldout.positions(cache)], minlength=cache.layout.n_sequences
        )
        held = np.flatnonzero(full == cache.layout.context)
    else:
        held = np.asarray(heldout.windows, dtype=np.int64)
    if len(held) == 0:
        raise DeltaCeError(
            f"the run holds out no whole context window ({heldout.describe()}): retrain it with "
            f"--eval-tokens > 0 (held-out windows), or pass --dataset to score fresh text"
        )
    n = min(n_windows, len(held))
    chosen = held[(np.arange(n) * len(held)) // n]
    info = WindowSource(
        source="heldout",
        windows=chosen.tolist(),
        dataset=None,
        held_out_token_fraction=1.0,
        fully_held_out_windows=len(chosen),
    )
    return cache.windows().numpy()[chosen], info


def _resolve(model: str | None, cache: Any) -> ModelSource:
    """The given model, or the cache's; refused when it is not the model the cache was harvested with."""
    meta = cache.meta["model"]
    if model is not None:
        source = resolve_model(model)
    else:
        try:
            source = resolve_model(meta["name"])
        except ModelError:
            if not Path(meta["path"]).is_dir():
                raise DeltaCeError(f"the cache's model {meta['name']!r} is not found from here: pass --model with it")
            source = resolve_model(meta["path"])
    mine, theirs = json.loads(json.dumps(source.identity)), meta.get("identity", {})
    differ = sorted(k for k in set(mine) & set(theirs) if mine[k] != theirs[k])
    if differ:
        raise DeltaCeError(
            f"model {source.name!r} is not the cache's model {meta['name']!r} ({differ[0]} differs): "
            f"the SAE was trained on the cache's model; pass that one with --model"
        )
    return source


# ---------------------------------------------------------------------------------------------
# the analysis


def run_delta_ce(
    run_dir: str | Path,
    model: str | None = None,
    dataset: str | None = None,
    tokens: int = 8192,
    out_dir: str | Path | None = None,
    device: str = "auto",
    cache_path: str | Path | None = None,
    batch_size: int | None = None,
    special_tokens: str | None = None,
    split: str | None = None,
    text_column: str | None = None,
    dataset_config: str | None = None,
    show_progress: bool = False,
    write: bool = True,
) -> DeltaCeResult:
    """Per-layer delta CE and KL of the run's SAE against the clean model on about `tokens` tokens (whole
    context windows). Writes delta_ce.json and delta_ce.png into `out_dir` (default: the run folder).
    The cache (default: the one recorded by the run) supplies the model, hook, tokenization settings and,
    unless `dataset` is given, the windows; `split`/`text_column`/`dataset_config` default to the cache's."""
    t0 = time.time()
    record = load_run(run_dir)
    cache = open_cache(cache_path or record.cache.path)
    if cache.fingerprint != record.cache.fingerprint:
        raise RunError(
            f"{run_dir} was trained on cache {record.cache.path}, not on {cache.path}: pass its own cache with --cache"
        )
    spec = cache.meta["spec"]
    if tokens < 1:
        raise DeltaCeError(f"tokens = {tokens}: pass --tokens >= 1")
    mode = SpecialTokens.of(special_tokens or record.special_tokens, cache).mode
    device = resolve_device(device)
    source = _resolve(model, cache)
    tokenizer = load_tokenizer(source)
    ctx = cache.layout.context
    n_windows = -(-tokens // ctx)
    if dataset is None:
        windows, info = cache_windows(cache, record.heldout, n_windows)
        special = cache.meta["tokenizer"]["special_ids"]
    else:
        data = resolve_dataset(dataset)
        same = dataset == spec["dataset"]
        docs = iter_documents(
            data,
            split or (spec["split"] if same else "train"),
            text_column or (spec["text_column"] if same else "text"),
            dataset_config or (spec.get("dataset_config") if same else None),
        )
        windows = make_windows(
            docs,
            tokenizer,
            ctx,
            n_windows,
            bool(cache.meta["tokenizer"]["prepend_bos"]),
            dataset_name=f"dataset {dataset!r}",
        )
        info = WindowSource("dataset", [], dataset, None, None)
        special = sorted(set(tokenizer.all_special_ids))
    is_special = np.isin(windows, np.asarray(special, dtype=np.int64))
    keep_all = ~is_special if mode == "exclude" else np.ones(windows.shape, bool)

    sae = record.load_sae(device)
    layers = list(record.layers)
    bridge = load_bridge(source, tokenizer, device, TORCH_DTYPES[spec["model_dtype"]])
    if int(bridge.cfg.d_model) != sae.cfg.d_model or max(layers) >= int(bridge.cfg.n_layers):
        raise DeltaCeError(
            f"model {source.name!r} (d_model {bridge.cfg.d_model}, {bridge.cfg.n_layers} layers) does "
            f"not fit the SAE (d_model {sae.cfg.d_model}, layers {layers}): pass the cache's model"
        )
    ids_all = torch.from_numpy(windows.astype(np.int64))
    check_logits(bridge, ids_all[:1].to(device))

    lens = cache.lens()
    lens = None if lens is None else lens.to(device)
    reconstruct = sae_reconstructor(sae, lens)
    zero = torch.zeros(sae.cfg.d_model, device=device)
    zero_value = (lambda l: zero) if lens is None else (lambda l: lens.inverse(zero, l))
    batch = batch_size or int(spec.get("batch_size", 4))
    sums = DeltaCeSums.zeros(layers)
    from harvest.progress import progress_bar

    with progress_bar("delta CE", len(ids_all), "windows", enabled=show_progress) as bar:
        for s in range(0, len(ids_all), batch):
            ids = ids_all[s : s + batch].to(device)
            keep = torch.from_numpy(keep_all[s : s + batch]).to(device)
            zeroed = None
            if mode == "reference":
                zeroed = ZeroedSplice(torch.from_numpy(is_special[s : s + batch]).to(device), zero_value)
            sums = sums + spliced_metrics(bridge, ids, layers, reconstruct, keep, hook=spec["hook"], zeroed=zeroed)
            bar.advance(len(ids))

    means = sums.means()
    result = DeltaCeResult(
        run=str(record.dir),
        model=source.name,
        cache=str(cache.path),
        hook=f"blocks.{{l}}.hook_{spec['hook']}",
        lens=cache.lens_record,
        layers=layers,
        tokens=means["tokens"],
        clean_ce=means["clean_ce"],
        ce=means["ce"],
        delta_ce=means["delta_ce"],
        kl=means["kl"],
        delta_ce_mean=sum(means["delta_ce"]) / len(layers),
        kl_mean=sum(means["kl"]) / len(layers),
        windows=len(ids_all),
        context=ctx,
        positions=int(ids_all.numel()),
        special_tokens=mode,
        window_source=info,
        seconds=time.time() - t0,
        definitions={
            "delta_ce": "mean next-token CE with layer l's hook replaced by the SAE reconstruction, minus the "
            "clean model's mean CE, over the same predictions",
            "kl": "mean over predictions of KL(p_clean || p_spliced)",
            "tokens": "predictions counted: t -> t+1 with both tokens non-special (special_tokens exclude) or "
            "all; only kept positions are spliced",
        },
    )
    if write:
        out = Path(out_dir) if out_dir is not None else record.dir
        out.mkdir(parents=True, exist_ok=True)
        plot_delta_ce(result, out / DELTA_CE_PNG)
        result.figures, result.files = [DELTA_CE_PNG], [DeltaCeResult.FILE]
        result.save(out)
    return result


# ---------------------------------------------------------------------------------------------
# output


def format_delta_ce(result: DeltaCeResult) -> str:
    lines = [
        f"delta CE on {result.tokens:,} predictions ({result.windows} windows of {result.context}); "
        f"clean CE {result.clean_ce:.4f} nats",
        f"{'layer':>5}  {'delta CE':>9}  {'KL':>9}",
    ]
    for l, d, k in zip(result.layers, result.delta_ce, result.kl):
        lines.append(f"{l:>5}  {d:>9.4f}  {k:>9.4f}")
    lines.append(f"{'mean':>5}  {result.delta_ce_mean:>9.4f}  {result.kl_mean:>9.4f}")
    return "\n".join(lines)


def plot_delta_ce(result: DeltaCeResult, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = result.layers
    fig, axes = plt.subplots(1, 2, figsize=(4 + 0.5 * len(layers), 3.2))
    for ax, values, title, color in [
        (axes[0], result.delta_ce, "delta CE (nats)", "tab:blue"),
        (axes[1], result.kl, "KL(clean || spliced) (nats)", "tab:orange"),
    ]:
        ax.bar([str(l) for l in layers], [v if math.isfinite(v) else 0.0 for v in values], color=color)
        ax.set_xlabel("spliced layer")
        ax.set_title(title)
    fig.suptitle(
        f"SAE reconstruction spliced in, {result.tokens:,} predictions; clean CE {result.clean_ce:.3f}",
        fontsize=9,
    )
    fig.tight_layout()
    atomic_savefig(fig, path, dpi=120)
    plt.close(fig)
