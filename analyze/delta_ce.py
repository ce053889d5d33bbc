"""Delta CE and KL (docs/method.md Sec. 3): splice an SAE's reconstruction into the forward pass at one layer
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
    reconstruction is spliced there, and every prediction counts; the baseline is the model with the
    same positions zeroed (Baselines, below).

Speed. Gemma's vocabulary is 262,144, so the unembedding costs more than all the blocks together.
  - The forward passes: one clean pass from the embeddings keeps each spliced layer's input residual
    (blocks.{l}.hook_resid_pre), and the spliced pass of layer l resumes from it at block l, with
    blocks 0..l-1 skipped (TransformerLens's start_at_layer still runs them and discards the result);
    the clean pass runs on the same resumed path (from block 0), so a splice that changes nothing
    gives exactly the clean final state. Every pass stops at the unembedding's input
    (`unembed.hook_in`, the final normed state, [batch, ctx, d]): no logits inside a forward.
  - The logits: only for the counted predictions, never for a whole batch at once: blocks of rows x
    vocabulary slices of at most ~2^24 floats, each slice of the unembedding read once per block of
    rows for every state (clean and spliced), with a streaming log-sum-exp, the target's logit and
    the KL accumulated slice by slice.
`check_logits` verifies once per run that this path reproduces the model's own logits, and
`check_resume` that a resumed pass reproduces the full forward (else the full forward is used).

Baselines. `exclude` and `include-real` compare with the clean model. `reference` compares, as the
reference code does, with the model whose special positions are zeroed at layer l (the same vectors the
spliced pass puts there, so zeroing itself never counts against the SAE); the clean CE is reported too.

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
from torch import Tensor

from analyze.results import DELTA_CE_BASELINES, DeltaCeResult, WindowSource
from harvest.atomic import atomic_savefig
from harvest.errors import ModelError, UserError
from harvest.models import ModelSource, load_bridge, load_tokenizer, resolve_device, resolve_model
from harvest.run import TORCH_DTYPES
from harvest.text import iter_documents, make_windows, resolve_dataset, special_token_ids
from train.inputs import open_inputs
from train.special import SpecialTokens
from train.split import HeldOut

FINAL_HOOK = "unembed.hook_in"  # the final normed residual: the unembedding's input
DELTA_CE_PNG = "delta_ce.png"
LOGIT_FLOATS = 2**24  # rows x vocab floats per logits block (64 MB in float32)
ROW_BLOCK = 2048  # rows of final states per logits block (the vocabulary slice is LOGIT_FLOATS / rows)

ReconstructFn = Callable[[Tensor, int], Tensor]  # (vectors [n, d] of layer l, l) -> reconstructions [n, d]


class DeltaCeError(UserError):
    """Delta CE cannot be computed for this model, run or input."""


class _Stop(Exception):
    """Raised at the unembedding's input: the (vocab-sized) logits are computed later, in blocks."""


# ---------------------------------------------------------------------------------------------
# forward passes


def final_states(bridge: Any, ids: Tensor, fwd_hooks: Sequence[tuple[str, Callable]] = (), **run_kw: Any) -> Tensor:
    """The final normed residual [batch, ctx, d] of a forward pass with `fwd_hooks`; no logits. `run_kw`
    goes to run_with_hooks (start_at_layer: `ids` is then the residual entering that block)."""
    out = _capture(bridge, ids, FINAL_HOOK, fwd_hooks, **run_kw)
    if out is None:
        raise DeltaCeError(
            f"the model has no {FINAL_HOOK} hook that fires: delta CE needs a TransformerLens 4 "
            f"bridge with an unembedding component"
        )
    return out


def _capture(
    bridge: Any, ids: Tensor, hook_name: str, fwd_hooks: Sequence[tuple[str, Callable]] = (), **run_kw: Any
) -> Tensor | None:
    """The value at `hook_name` of a forward pass with `fwd_hooks` (None if it never fires); the pass stops
    there, so nothing after it runs."""
    out: list[Tensor] = []

    def grab(x: Tensor, hook: Any) -> Tensor:
        out.append(x.detach().clone())
        raise _Stop

    try:
        with torch.inference_mode():
            bridge.run_with_hooks(ids, fwd_hooks=[*fwd_hooks, (hook_name, grab)], return_type=None, **run_kw)
    except _Stop:
        pass
    return out[0] if out else None


def _block_input(layer: int) -> str:
    return f"blocks.{layer}.hook_resid_pre"


class Resumer:
    """Forward passes that start at block l from the residual entering it, with blocks 0..l-1 skipped (a
    block's forward is swapped for the identity while the pass runs; TransformerLens's start_at_layer
    alone still runs them). `clean` is the pass from block 0 that records each requested block input."""

    def __init__(self, bridge: Any):
        self.bridge = bridge
        self.tuple_out: bool | None = None  # whether a block returns (hidden, ...) in this transformers version

    def embeddings(self, ids: Tensor) -> Tensor:
        """The residual entering block 0 (token and position embeddings, scaled as the model does)."""
        out = _capture(self.bridge, ids, _block_input(0))
        if out is None:
            raise DeltaCeError(f"the model has no {_block_input(0)} hook that fires: use a TransformerLens 4 bridge")
        return out

    def clean(self, ids: Tensor, layers: Sequence[int]) -> tuple[Tensor, dict[int, Tensor]]:
        """(final state, {l: residual entering block l}) of the clean model, on the resumed path."""
        inputs: dict[int, Tensor] = {}

        def keep_input(layer: int) -> Callable:
            def hook_fn(x: Tensor, hook: Any) -> None:
                inputs[layer] = x.detach().clone()

            return hook_fn

        kinds: list[bool] = []
        handle = self.bridge.blocks[0].register_forward_hook(lambda m, i, o: kinds.append(isinstance(o, tuple)))
        try:
            final = self.run(self.embeddings(ids), 0, [(_block_input(l), keep_input(l)) for l in sorted(set(layers))])
        finally:
            handle.remove()
        self.tuple_out = bool(kinds and kinds[0])
        return final, inputs

    def run(self, resid: Tensor, start: int, fwd_hooks: Sequence[tuple[str, Callable]] = ()) -> Tensor:
        """The final state of the pass that enters block `start` with `resid` [batch, ctx, d]."""
        skipped = list(self.bridge.blocks)[:start]
        tuple_out = self.tuple_out

        def identity(*args: Any, **kwargs: Any) -> Any:
            h = args[0] if args else kwargs["hidden_states"]
            return (h,) if tuple_out else h

        for block in skipped:  # an instance attribute shadows the method for this pass (set in __dict__: the
            block.__dict__["forward"] = identity  # bridge components route setattr to the wrapped module)
        try:
            return final_states(self.bridge, resid, fwd_hooks, start_at_layer=start)
        finally:
            for block in skipped:
                block.__dict__.pop("forward", None)


def check_resume(bridge: Any, ids: Tensor, layer: int, hook: str = "resid_post", n: int = 16) -> bool:
    """Whether the resumed passes (clean, and one splice at `layer`) reproduce the full forward on a short
    prefix; the caller falls back to full passes where they do not (an architecture whose blocks are not
    plain residual-in, residual-out)."""
    ids = ids[:1, :n]
    bump = lambda x, hook: x * 1.5
    try:
        resumer = Resumer(bridge)
        clean, inputs = resumer.clean(ids, [layer])
        spliced = resumer.run(inputs[layer], layer, [(f"blocks.{layer}.hook_{hook}", bump)])
    except (NotImplementedError, ValueError, TypeError, KeyError, IndexError, RuntimeError):
        return False
    want_clean = final_states(bridge, ids)
    want_spliced = final_states(bridge, ids, [(f"blocks.{layer}.hook_{hook}", bump)])
    return all(
        got.shape == want.shape and bool(torch.allclose(got, want, rtol=1e-4, atol=1e-4 * want.abs().max().item()))
        for got, want in ((clean, want_clean), (spliced, want_spliced))
    )


class Unembedding:
    """The unembedding as a matrix [vocab, d] (+ bias), applied to a slice of the vocabulary at a time,
    then the final soft-cap where the Hugging Face model applies one after it (Gemma 2)."""

    def __init__(self, bridge: Any):
        module = getattr(getattr(bridge, "unembed", None), "original_component", None)
        weight = getattr(module, "weight", None)
        if not isinstance(weight, Tensor) or weight.ndim != 2:
            raise DeltaCeError("the model's unembedding is not a linear layer: delta CE does not support it")
        self.weight = weight.detach()
        bias = getattr(module, "bias", None)
        self.bias = None if bias is None else bias.detach()
        cfg = getattr(getattr(bridge, "original_model", None), "config", None)
        self.cap = getattr(cfg, "final_logit_softcapping", None)
        self.vocab = int(self.weight.shape[0])

    def __call__(self, h: Tensor, start: int = 0, stop: int | None = None) -> Tensor:
        """Logits of the vocabulary slice [start, stop) for final states h [n, d], in float32."""
        w = self.weight[start:stop]
        logits = (h.to(w.dtype) @ w.T).float()
        if self.bias is not None:
            logits += self.bias[start:stop].float()
        if self.cap:
            logits = torch.tanh(logits / self.cap) * self.cap
        return logits


def logits_of(bridge: Any, h: Tensor) -> Tensor:
    """Logits of final normed states h [..., d] through the model's own unembedding module (and soft-cap)."""
    with torch.inference_mode():
        logits = bridge.unembed(h)
        cap = getattr(getattr(bridge, "original_model", None), "config", None)
        cap = getattr(cap, "final_logit_softcapping", None)
        if cap:
            logits = torch.tanh(logits / cap) * cap
        return logits


def check_logits(bridge: Any, ids: Tensor, n: int = 16) -> None:
    """The sliced path (final state -> unembedding slices) reproduces the model's own logits on a short prefix."""
    ids = ids[:1, :n]
    with torch.inference_mode():
        want = bridge(ids, return_type="logits").float()
        h = final_states(bridge, ids)
        unembed = Unembedding(bridge)
        half = unembed.vocab // 2
        got = torch.cat([unembed(h[0], 0, half), unembed(h[0], half)], dim=-1)[None]
    err = (want - got).abs().max().item()
    if got.shape != want.shape or not err <= 1e-3 * want.abs().max().item() + 1e-5:
        raise DeltaCeError(
            f"logits from the unembedding differ from the model's own (max |diff| {err:.3g}): this "
            f"architecture post-processes its logits in a way delta CE does not reproduce"
        )


class _RowSums:
    """Streaming sums over vocabulary slices for one block of rows with targets t, per state: the running
    maximum m, sum exp(z - m) and the target's logit."""

    def __init__(self, n_states: int, t: Tensor):
        self.t = t
        zeros = lambda: torch.zeros(len(t), dtype=torch.float64, device=t.device)
        self.m = [torch.full((len(t),), -math.inf, dtype=torch.float64, device=t.device) for _ in range(n_states)]
        self.total = [zeros() for _ in range(n_states)]
        self.picked = [zeros() for _ in range(n_states)]

    def add(self, i: int, z: Tensor, start: int) -> tuple[Tensor, Tensor]:
        """Fold state i's logits z [rows, width] of the slice from `start` in; returns exp(z - new max) and
        the factor that rescales sums taken under the old maximum."""
        top = torch.maximum(self.m[i], z.max(-1).values.double())  # float32 values: exact in float64
        scale = torch.exp(self.m[i] - top)
        e = torch.exp(z - top.float()[:, None])
        self.total[i] = self.total[i] * scale + e.sum(-1, dtype=torch.float64)
        inside = (self.t >= start) & (self.t < start + z.shape[1])
        got = z.gather(1, (self.t - start).clamp(0, z.shape[1] - 1)[:, None])[:, 0].double()
        self.picked[i] += torch.where(inside, got, 0.0)
        self.m[i] = top
        return e, scale

    def lse(self, i: int) -> Tensor:
        return self.m[i] + torch.log(self.total[i])


def next_token_sums(
    unembed: Unembedding,
    states: Sequence[Tensor],
    targets: Tensor,
    kl_pairs: Sequence[tuple[int, int]],
    rows: int | None = None,
) -> tuple[Tensor, Tensor]:
    """(per state: sum over rows of the CE of `targets` [n]; per pair (p, q): sum of KL(p || q)), float64,
    for final states [n, d] each. The logits are formed in blocks of `rows` x a vocabulary slice (at most
    ~LOGIT_FLOATS floats; a few blocks alive at a time, however many states) with a streaming log-sum-exp:
        lse = m + log sum exp(z - m),   KL(p || q) = sum_v exp(z_p - lse_p) (z_p - z_q) - lse_p + lse_q.
    Each q appears in one pair and never as a p (a p may be shared: the clean model)."""
    qs = [q for _, q in kl_pairs]
    assert len(set(qs)) == len(qs) and not set(qs) & {p for p, _ in kl_pairs}, kl_pairs
    n, dev = targets.shape[0], targets.device
    rows = max(1, min(rows or ROW_BLOCK, n or 1))
    width = max(1, LOGIT_FLOATS // rows)
    last_as_p = {p: max(j for j, (pp, _) in enumerate(kl_pairs) if pp == p) for p, _ in kl_pairs}
    unpaired = [i for i in range(len(states)) if all(i not in pair for pair in kl_pairs)]
    ce = torch.zeros(len(states), dtype=torch.float64, device=dev)
    kl = torch.zeros(len(kl_pairs), dtype=torch.float64, device=dev)
    with torch.inference_mode():
        for r in range(0, n, rows):
            hs = [h[r : r + rows] for h in states]
            sums = _RowSums(len(hs), targets[r : r + rows])
            cross = [torch.zeros(len(sums.t), dtype=torch.float64, device=dev) for _ in kl_pairs]
            for v in range(0, unembed.vocab, width):
                held: dict[int, tuple[Tensor, Tensor, Tensor]] = {}  # p-states needed by a later pair
                for j, (p, q) in enumerate(kl_pairs):
                    if p not in held:
                        z = unembed(hs[p], v, v + width)
                        held[p] = (z, *sums.add(p, z, v))
                    zp, ep, scale = held[p] if last_as_p[p] > j else held.pop(p)
                    zq = unembed(hs[q], v, v + width)
                    sums.add(q, zq, v)
                    cross[j] = cross[j] * scale + (ep * (zp - zq)).sum(-1, dtype=torch.float64)
                for i in unpaired:
                    sums.add(i, unembed(hs[i], v, v + width), v)
            for i in range(len(hs)):
                ce[i] += (sums.lse(i) - sums.picked[i]).sum()
            for j, (p, q) in enumerate(kl_pairs):
                kl[j] += (cross[j] / sums.total[p] - sums.lse(p) + sums.lse(q)).sum()
    return ce, kl


def sae_reconstructor(sae: Callable, lens: Any = None) -> ReconstructFn:
    """Model-space vectors of layer l -> the SAE's reconstruction in model space. An SAE trained on a cache
    harvested through a tuned lens sees lens.transform(x, l), and its reconstruction goes back with the
    exact inverse (I + W)^-1 (y - b) (docs/method.md Sec. 5; the reference kept only the inverse's diagonal)."""

    def reconstruct(x: Tensor, layer: int) -> Tensor:
        if lens is None:
            return sae(x.float()).x_hat
        return lens.inverse(sae(lens.transform(x.float(), layer)).x_hat, layer)

    return reconstruct


def _splice(
    layer: int, reconstruct_fn: ReconstructFn | None, keep: Tensor, zeroed: ZeroedSplice | None = None
) -> Callable:
    """The hook that replaces the kept positions by their reconstruction (none when reconstruct_fn is None:
    the zeroed-only baseline of reference mode) and writes zeroed.value(l) at zeroed.mask."""

    def hook_fn(x: Tensor, hook: Any) -> Tensor:
        out = x.clone()  # a returned tensor replaces the activation (TransformerLens hooks)
        if reconstruct_fn is not None:
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
    standardizes to zero and reconstructs to exactly zero). The baseline of that mode writes the same
    value at `mask` and leaves every other position clean."""

    mask: Tensor
    value: Callable[[int], Tensor]


# ---------------------------------------------------------------------------------------------
# sums over predictions


@dataclass
class DeltaCeSums:
    """Sums over counted predictions, mergeable across batches (float64). `ce_base`: per layer, the CE sum
    of the baseline the layer is compared with, where that is not the clean model (reference mode)."""

    layers: list[int]
    n: int  # predictions counted
    ce_clean: float  # sum of the clean model's CE
    ce: list[float]  # per layer: sum of the spliced model's CE
    kl: list[float]  # per layer: sum of KL(p_baseline || p_spliced)
    ce_base: list[float] | None = None  # per layer: sum of the baseline's CE (None: the clean model)

    @classmethod
    def zeros(cls, layers: Sequence[int], zeroed_baseline: bool = False) -> "DeltaCeSums":
        base = [0.0] * len(layers) if zeroed_baseline else None
        return cls(list(layers), 0, 0.0, [0.0] * len(layers), [0.0] * len(layers), base)

    def __add__(self, o: "DeltaCeSums") -> "DeltaCeSums":
        assert self.layers == o.layers and (self.ce_base is None) == (o.ce_base is None)
        add = lambda a, b: [x + y for x, y in zip(a, b)]
        return DeltaCeSums(
            self.layers,
            self.n + o.n,
            self.ce_clean + o.ce_clean,
            add(self.ce, o.ce),
            add(self.kl, o.kl),
            None if self.ce_base is None else add(self.ce_base, o.ce_base or []),
        )

    def means(self) -> dict[str, Any]:
        n = self.n or float("nan")
        clean = self.ce_clean / n
        base = [clean] * len(self.layers) if self.ce_base is None else [c / n for c in self.ce_base]
        return {
            "tokens": self.n,
            "clean_ce": clean,
            "baseline_ce": base,
            "ce": [c / n for c in self.ce],
            "delta_ce": [c / n - b for c, b in zip(self.ce, base)],
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
    resume: bool = True,
) -> DeltaCeSums:
    """CE of the clean model and, per layer, of the model with blocks.{l}.hook_{hook} replaced by
    reconstruct_fn at the kept positions; KL(baseline || spliced). ids, keep_mask: [batch, ctx]. A
    prediction t -> t+1 counts when keep_mask holds at both t and t+1 (module docstring). With `zeroed`
    (reference mode) each layer's baseline is the model with zeroed.value(l) at zeroed.mask, else the clean
    model. `resume`: each spliced pass starts at its block from the clean pass's residual (the module
    docstring's Speed); False runs every pass from the token ids (the plain path the fast one must equal)."""
    layers = [layers] if isinstance(layers, int) else list(layers)
    keep = keep_mask.to(device=ids.device, dtype=torch.bool)
    counted = keep[:, :-1] & keep[:, 1:]
    targets = ids[:, 1:][counted]
    if resume:
        resumer = Resumer(bridge)
        clean, inputs = resumer.clean(ids, layers)
        run = lambda l, hooks: resumer.run(inputs[l], l, hooks)
    else:
        clean = final_states(bridge, ids)
        run = lambda l, hooks: final_states(bridge, ids, hooks)
    point = lambda l: f"blocks.{l}.hook_{hook}"
    pick = lambda h: h[:, :-1][counted]
    states = [pick(clean)] + [pick(run(l, [(point(l), _splice(l, reconstruct_fn, keep, zeroed))])) for l in layers]
    if zeroed is not None:
        states += [pick(run(l, [(point(l), _splice(l, None, keep, zeroed))])) for l in layers]
    base = (lambda i: 1 + len(layers) + i) if zeroed is not None else (lambda i: 0)
    kl_pairs = [(base(i), 1 + i) for i in range(len(layers))]
    ce, kl = next_token_sums(Unembedding(bridge), states, targets, kl_pairs, rows)
    ce_base = None if zeroed is None else ce[1 + len(layers) :].tolist()
    return DeltaCeSums(
        layers, int(targets.shape[0]), ce[0].item(), ce[1 : 1 + len(layers)].tolist(), kl.tolist(), ce_base
    )


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


def special_positions(windows: np.ndarray, tokenizer: Any, mode: str) -> np.ndarray:
    """[n, ctx] bool: the positions a special-token mode treats as special. `reference` zeroes BOS/EOS/PAD
    only, as the reference code (unk, mask, ... keep their real vectors); `exclude` leaves out every special
    id. `tokenizer`: a tokenizer or a cache's tokenizer record."""
    ids = special_token_ids(tokenizer, "reference" if mode == "reference" else "exclude")
    return np.isin(windows, np.asarray(ids, dtype=np.int64))


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
    inputs = open_inputs(run_dir, cache_path, purpose="analyze delta-ce", heldout=True)
    record, cache = inputs.record, inputs.cache
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
        tokenizer_ids = cache.meta["tokenizer"]
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
        tokenizer_ids = tokenizer
    is_special = special_positions(windows, tokenizer_ids, mode)
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
    resume = check_resume(bridge, ids_all[:1].to(device), layers[len(layers) // 2], spec["hook"])

    lens = cache.lens()
    lens = None if lens is None else lens.to(device)
    reconstruct = sae_reconstructor(sae, lens)
    zero = torch.zeros(sae.cfg.d_model, device=device)
    zero_value = (lambda l: zero) if lens is None else (lambda l: lens.inverse(zero, l))
    batch = batch_size or int(spec.get("batch_size", 4))
    sums = DeltaCeSums.zeros(layers, zeroed_baseline=mode == "reference")
    from harvest.progress import progress_bar

    with progress_bar("delta CE", len(ids_all), "windows", enabled=show_progress) as bar:
        for s in range(0, len(ids_all), batch):
            ids = ids_all[s : s + batch].to(device)
            keep = torch.from_numpy(keep_all[s : s + batch]).to(device)
            zeroed = None
            if mode == "reference":
                zeroed = ZeroedSplice(torch.from_numpy(is_special[s : s + batch]).to(device), zero_value)
            sums = sums + spliced_metrics(
                bridge, ids, layers, reconstruct, keep, hook=spec["hook"], zeroed=zeroed, resume=resume
            )
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
        baseline="zeroed-special" if mode == "reference" else "clean",
        baseline_ce=means["baseline_ce"] if mode == "reference" else None,
        window_source=info,
        seconds=time.time() - t0,
        definitions={
            "delta_ce": "mean next-token CE with layer l's hook replaced by the SAE reconstruction, minus the "
            "baseline's mean CE over the same predictions; baseline: the clean model, or in special-token mode "
            "reference the model with the special positions zeroed at layer l (as the reference code)",
            "kl": "mean over predictions of KL(p_baseline || p_spliced)",
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
        f"clean CE {result.clean_ce:.4f} nats; baseline: {DELTA_CE_BASELINES[result.baseline]}",
        f"{'layer':>5}  {'delta CE':>9}  {'KL':>9}" + ("  baseline CE" if result.baseline_ce else ""),
    ]
    for i, (l, d, k) in enumerate(zip(result.layers, result.delta_ce, result.kl)):
        lines.append(
            f"{l:>5}  {d:>9.4f}  {k:>9.4f}" + (f"  {result.baseline_ce[i]:>11.4f}" if result.baseline_ce else "")
        )
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
