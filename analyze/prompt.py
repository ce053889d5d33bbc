"""One prompt through the model and a (multi-layer) SAE: which latents fire at which layers, per token.

The poster's contrast: over many tokens most latents fire at several layers, but at ONE token position
most latents fire at a single layer. For a prompt we report both sides of that comparison, with the
definitions and the accumulator of `analyze variance` (analyze.layers: DEFINITIONS, LayerDistribution),
in the same types as its VarianceResult (analyze.results: LayerVariances, MultiLayer):
- multi_layer.per_token_pooled: of the latents active at token t (at any layer), the fraction active at
  >= 2 layers at t, pooled over tokens (sum_t |M_t| / sum_t |A_t|; per_token_mean: mean over tokens);
- multi_layer.aggregated: of the latents active anywhere in the prompt, the fraction active at >= 2
  layers, counting layers over all the prompt's tokens together;
- variances.ratio_token = E[Var(L|J,T)] / E[Var(L|J)], variances.ratio_latent = E[Var(L|J)] / Var(L).
A latent is active when its post-ReLU value exceeds FIRE_THRESHOLD (1e-3; docs/method.md Sec. 4). Special
tokens (BOS/EOS) are shown in the table, marked, and left out of every statistic.

The prompt is tokenized as ONE document of the cache (harvest.text.make_windows): EOS, the
document separator of the harvest stream, before the text, and BOS before that where the cache's
windows start with BOS. The vectors are rounded to the cache's storage dtype, as the SAE saw them.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from analyze.layers import DEFINITIONS
from analyze.results import PromptLatents, PromptResult, PromptToken, TopLatent
from harvest import UserError
from harvest.atomic import atomic_savefig
from harvest.errors import ModelError

PROMPT_PNG = "prompt.png"


class PromptError(UserError):
    """The prompt or the run folder cannot be analysed as given."""


# ---------------------------------------------------------------------------------------------
# the statistics (pure tensors, no model)


@torch.no_grad()
def prompt_stats(
    values: torch.Tensor, indices: torch.Tensor, kept: torch.Tensor, n_latents: int, layers: list[int] | None = None
) -> dict[str, Any]:
    """values, indices [L, T, k] from `sae.encode` of every (layer, token) vector; kept [T] bool.

    The statistics of the kept tokens come from analyze.layers.LayerDistribution, the accumulator of
    `analyze variance`, so one prompt and 10M tokens are measured by the same definitions (layer
    index = position in the SAE's layer list). Per token (special ones too, for the table): the
    latents active there and their activation at each layer."""
    from analyze.layers import LayerDistribution, active_values

    L, T, _ = values.shape
    values, indices, kept = values.cpu(), indices.cpu().long(), kept.cpu().bool()
    acc = LayerDistribution.zeros(n_latents, layers if layers is not None else range(L))
    acc.update(values[:, kept], indices[:, kept])

    h = active_values(values)
    layer = torch.arange(L)[:, None, None].expand_as(indices)
    n_active = torch.zeros(T, dtype=torch.long)
    n_multi = torch.zeros(T, dtype=torch.long)
    per_token: list[dict[int, torch.Tensor]] = []  # latent -> [L] activations at that token
    for t in range(T):
        a = h[:, t] > 0
        uniq, inv, counts = torch.unique(indices[:, t][a], return_inverse=True, return_counts=True)
        n_active[t], n_multi[t] = len(uniq), int((counts >= 2).sum())
        dense = torch.zeros(len(uniq), L, dtype=torch.float64)
        dense[inv, layer[:, t][a]] = h[:, t][a]  # TopK picks a latent at most once per vector
        per_token.append({int(j): dense[i] for i, j in enumerate(uniq.tolist())})
    return {"acc": acc, "n_active": n_active, "n_multi": n_multi, "per_token": per_token}


# ---------------------------------------------------------------------------------------------
# the run


def tokenize_prompt(text: str, tokenizer: Any, prepend_bos: bool, max_tokens: int | None = None) -> list[int]:
    """The prompt as one document of the cache's token stream: [BOS] EOS text (see the module doc)."""
    from harvest.text import make_windows

    if not text.strip():
        raise PromptError("the prompt is empty: pass some text")
    n = len(tokenizer(text, add_special_tokens=False).input_ids) + 1 + int(prepend_bos)
    if max_tokens is not None and n > max_tokens:
        raise PromptError(
            f"the prompt is {n} tokens, more than the cache's context of {max_tokens} that the SAE "
            f"was trained on: shorten it"
        )
    return make_windows(iter([text]), tokenizer, n, 1, prepend_bos, dataset_name="the prompt")[0].tolist()


def run_prompt(
    sae_dir: str | Path,
    text: str,
    model: str | None = None,
    out_dir: str | Path | None = None,
    device: str = "auto",
    cache: str | Path | None = None,
    top: int = 5,
    show: bool = True,
    console: Any = None,
) -> PromptResult:
    """Encode every (token, layer) vector of `text`; write prompt.json and prompt.png to `out_dir`
    (default: the run folder, as the other analyses) and, when `show`, print the per-token table.

    `model` overrides the cache's model (same architecture and d_model); `cache` overrides the cache path
    recorded in the run's config.json: its new location, or another harvest of the same model (train/inputs.py)."""
    from harvest.models import load_bridge, load_tokenizer, resolve_device, resolve_model
    from harvest.run import TORCH_DTYPES, forward_layers
    from train.inputs import open_inputs

    sae_dir = Path(sae_dir)
    inputs = open_inputs(sae_dir, cache, purpose="analyze prompt")  # the cache's metadata holds the tokenization
    record, c, layers = inputs.record, inputs.cache, inputs.record.layers
    cache_path = cache or record.cache.path  # a path or a URL, as given
    spec, tok_meta = c.meta.get("spec", {}), c.meta.get("tokenizer", {})
    device = resolve_device(device)
    sae = record.load_sae(device)
    source = resolve_model(model or c.meta["model"]["name"])
    tokenizer = load_tokenizer(source)
    prepend_bos = bool(tok_meta.get("prepend_bos", False))
    ids = tokenize_prompt(text, tokenizer, prepend_bos, c.layout.context)

    bridge = load_bridge(source, tokenizer, device, TORCH_DTYPES[spec.get("model_dtype", "float32")])
    hook = spec.get("hook", "resid_post")
    missing = [l for l in layers if f"blocks.{l}.hook_{hook}" not in bridge.hook_dict]
    if missing:
        raise ModelError(f"model {source.name!r} has no block {missing[0]}: pass the model the SAE was trained on")
    x = forward_layers(bridge, torch.tensor([ids], device=device), layers, hook)[:, 0]  # [L, T, d]
    if x.shape[-1] != sae.cfg.d_model:
        raise ModelError(
            f"model {source.name!r} has d_model {x.shape[-1]}, the SAE {sae.cfg.d_model}: pass the "
            f"model the SAE was trained on"
        )
    lens = c.lens()
    if lens is not None:  # the SAE lives in the lens space its cache was harvested in
        lens = lens.to(x.device)
        with torch.no_grad():
            x = torch.stack([lens.transform(x[i], l) for i, l in enumerate(layers)])
    x = x.to(c.dtype).float()  # the SAE was trained on vectors stored in the cache's dtype
    with torch.no_grad():
        values, indices = sae.encode(x)

    special_ids = set(tokenizer.all_special_ids) | set(tok_meta.get("special_ids", []) if model is None else [])
    special = torch.tensor([i in special_ids for i in ids])
    st = prompt_stats(values, indices, ~special, sae.cfg.n_latents, layers)
    acc = st["acc"]
    result = PromptResult(
        text=text,
        sae=str(sae_dir),
        cache=str(cache_path),
        model=source.name,
        hook=hook,
        lens=c.lens_record,
        prepend_bos=prepend_bos,
        n_latents=sae.cfg.n_latents,
        k=sae.cfg.k,
        layers=layers,
        n_tokens=len(ids),
        n_tokens_used=int((~special).sum()),
        variances=acc.variances(),
        multi_layer=acc.multi_layer(),
        tokens=_tokens(st, ids, special, tokenizer, layers, top),
        latents=_latents(acc),
        definitions={
            **DEFINITIONS,
            "latents": "the latents active in the prompt, sorted by E[L|J=j] (mean_layer) of the "
            "prompt's activation mass",
            "special tokens": "shown in 'tokens' with special=true, excluded from every statistic",
        },
    )
    out = Path(out_dir) if out_dir is not None else sae_dir
    out.mkdir(parents=True, exist_ok=True)
    result.figures = [_figure(acc, result, out)]
    result.save(out)
    if show:
        print_table(result, console)
    return result


def _tokens(
    st: dict[str, Any], ids: list[int], special: torch.Tensor, tokenizer: Any, layers: list[int], top: int
) -> list[PromptToken]:
    tokens = []
    for t, acts in enumerate(st["per_token"]):
        ranked = sorted(acts.items(), key=lambda kv: -float(kv[1].sum()))[:top]
        tokens.append(
            PromptToken(
                pos=t,
                id=ids[t],
                text=tokenizer.decode([ids[t]]),
                special=bool(special[t]),
                n_active=int(st["n_active"][t]),
                n_multi=int(st["n_multi"][t]),
                top=[
                    TopLatent(
                        latent=j,
                        activation=float(v.sum()),
                        layers=[layers[l] for l in v.nonzero().squeeze(1).tolist()],
                        values=[round(float(v[l]), 4) for l in v.nonzero().squeeze(1).tolist()],
                    )
                    for j, v in ranked
                ],
            )
        )
    return tokens


def _latents(acc: Any) -> PromptLatents:
    on = (acc.latent_mass() > 0).nonzero().squeeze(1)
    mean_l, var_l = acc.mean_layer()[on], acc.var_layer()[on]
    order = torch.argsort(mean_l, stable=True)
    return PromptLatents(
        ids=on[order].tolist(),
        mean_layer=mean_l[order].tolist(),
        var_layer=var_l[order].tolist(),
        n_layers=(acc.mass[on[order]] > 0).sum(1).tolist(),
    )


# ---------------------------------------------------------------------------------------------
# output


def _fmt(v: float | None) -> str:
    return "n/a" if v is None or math.isnan(v) else f"{v:.3f}"


def print_table(result: PromptResult, console: Any = None, max_latents: int = 5) -> None:
    """The per-token table: which of the top latents fire at which layers."""
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    console = console or Console()
    table = Table(
        title=f"latents per token ({result.model}, layers {result.layers[0]}..{result.layers[-1]})",
        show_lines=False,
    )
    for col, kw in [
        ("#", {"justify": "right"}),
        ("token", {}),
        ("active", {"justify": "right"}),
        (">=2 layers", {"justify": "right"}),
        ("top latents: layers where active", {}),
    ]:
        table.add_column(col, **kw)
    for t in result.tokens:
        tok = escape(repr(t.text)[1:-1])
        lat = "  ".join(f"{d.latent}@{_ranges(d.layers)}" for d in t.top[:max_latents])
        style = "dim" if t.special else None
        table.add_row(
            str(t.pos),
            tok + (" (special)" if t.special else ""),
            str(t.n_active),
            str(t.n_multi),
            escape(lat),
            style=style,
        )
    console.print(table)
    ml = result.multi_layer
    console.print(
        f"latents active at >= 2 layers: per token {_fmt(ml.per_token_pooled)} (mean over tokens "
        f"{_fmt(ml.per_token_mean)}) vs aggregated over the prompt {_fmt(ml.aggregated)}; "
        f"E[Var(L|J,T)]/E[Var(L|J)] = {_fmt(result.variances.ratio_token)}"
    )


def _ranges(layers: list[int]) -> str:
    """[1, 2, 3, 7] -> '1-3,7'."""
    parts, i = [], 0
    while i < len(layers):
        j = i
        while j + 1 < len(layers) and layers[j + 1] == layers[j] + 1:
            j += 1
        parts.append(str(layers[i]) if i == j else f"{layers[i]}-{layers[j]}")
        i = j + 1
    return ",".join(parts) or "-"


def _figure(acc: Any, r: PromptResult, out: Path) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ids, layers = r.latents.ids, r.layers
    mass = acc.mass[ids] if ids else torch.zeros(0, len(layers), dtype=torch.float64)
    p = mass / mass.sum(1, keepdim=True).clamp_min(1e-300)
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(12, 4), gridspec_kw={"width_ratios": [3, 2]})
    if len(ids):
        im = ax.imshow(
            p.t().numpy(),
            aspect="auto",
            origin="lower",
            cmap="viridis",
            interpolation="nearest",
            extent=(-0.5, len(ids) - 0.5, -0.5, len(layers) - 0.5),
        )
        fig.colorbar(im, ax=ax, label="P(L = l | J = j), this prompt")
    ticks = range(0, len(layers), max(1, len(layers) // 9))
    ax.set_yticks(list(ticks), [str(layers[i]) for i in ticks])
    ax.set_xlabel(f"active latents ({len(ids)}), sorted by E[L | J]")
    ax.set_ylabel("layer")
    ax.set_title("Latent activation mass over layers (summed over the prompt's tokens)", fontsize=9)

    toks = [t for t in r.tokens if not t.special]
    single = [t.n_active - t.n_multi for t in toks]
    multi = [t.n_multi for t in toks]
    x = range(len(toks))
    bx.bar(x, single, label="active at 1 layer")
    bx.bar(x, multi, bottom=single, label="active at >= 2 layers")
    if len(toks) <= 40:
        bx.set_xticks(list(x), [repr(t.text)[1:-1][:10] for t in toks], rotation=90, fontsize=7)
    bx.set_ylabel("latents active at the token")
    bx.set_title(
        f">= 2 layers: per token {_fmt(r.multi_layer.per_token_pooled)}, aggregated {_fmt(r.multi_layer.aggregated)}",
        fontsize=9,
    )
    bx.legend(fontsize=8)
    fig.tight_layout()
    atomic_savefig(fig, out / PROMPT_PNG, dpi=120)
    plt.close(fig)
    return PROMPT_PNG
