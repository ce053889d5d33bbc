"""A run's SAE in the formats other tools read, and its upload to the Hugging Face Hub.

saelens   one folder per layer, `blocks.<l>.hook_<hook>/` with cfg.json + sae_weights.safetensors, which
          SAELens (>= 6) loads with `SAE.load_from_disk(folder)` or, from the Hub,
          `SAE.from_pretrained(repo, "blocks.<l>.hook_<hook>")`. An MLSAE becomes one folder per layer with
          the same weights (SAELens has one hook per SAE). Our standardization divides by the POPULATION
          std, SAELens's `layer_norm` by the Bessel-corrected one (larger by 1/c, c = sqrt((d-1)/d)); folding
          c into the weights makes the two forwards equal:
              W_enc' = W_enc^T / c    b_enc = 0    W_dec' = W_dec * c    b_dec = c * b_pre
          (SAELens: x' = c x~, pre-activations (x' - b_dec) W_enc' = (x~ - b_pre) W_enc^T: the same TopK;
          output (z W_dec' + b_dec) std_bessel + mean = (z W_dec + b_pre) std + mean.) Without the fold ~1%
          of vectors get another top-k set and every reconstruction is off by a factor 1/c. Lens-space SAEs
          are refused: SAELens cannot apply a tuned lens before the SAE. The config is in SAELens 6's layout;
          `metadata.sae_lens_version` is the sae-lens installed where the export ran (null when none is), and
          because SAELens reads a config without a version >= 6 as a pre-6 one (whose hook, model and dataset
          keys are top-level), those keys are written at the top level too: either way it loads the same.
delphi    EleutherAI delphi's latent cache under `latents/` (delphi lists that folder for its modules when
          given none, so nothing else is in it), streamed from our cache (no model forward) over whole
          context windows (with --tokens: the first ceil(tokens / context) windows): per module (one per
          layer, shared latent ids) `<start>_<end>.safetensors` files over `splits` latent ranges with
          `locations` [N, 3] (window, position, latent - start; uint16 when both fit, else uint32, sorted by
          window, position, latent), `activations` [N] fp16 (values > 1e-5, delphi's rule) and `tokens`
          [windows, context] (the cache's windows), and a `config.json` per module.

Every export writes into a temporary folder next to `out` that replaces it when complete (an earlier export
there is replaced; any other existing folder is refused), with a README.md model card. `--push-to-hub`
checks the Hub (offline mode, network, token) before any work, then `upload_folder`s the export.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Literal

import numpy as np
import torch

from harvest.atomic import atomic_write, atomic_write_json, atomic_write_text, fresh_folder, fsync_dir
from harvest.errors import UserError
from train.record import RunRecord, load_run

Format = Literal["saelens", "delphi"]
FORMATS: tuple[str, ...] = ("saelens", "delphi")
MARKER = "mlsae_export.json"  # identifies a folder as an export of ours (so a new export may replace it)
SAELENS_LAYOUT = "6"  # the config layout written (metadata dict); SAELens reads configs below 6 as pre-6 ones
DELPHI_MIN_ACTIVATION = 1e-5  # delphi keeps |activation| > 1e-5
DELPHI_LATENTS = "latents"  # the folder to pass to delphi (its modules, nothing else)
EMBEDDED_BASE = {"gemma-3-270m": "google/gemma-3-270m"}  # the Hub model an embedded GGUF quantizes


class ExportError(UserError):
    """A run cannot be exported as asked."""


def fold_constant(d_model: int) -> float:
    """c = sqrt((d-1)/d): population std / Bessel-corrected std of any d-vector."""
    return math.sqrt((d_model - 1) / d_model)


def hook_name(layer: int, hook: str | None) -> str:
    return f"blocks.{layer}.hook_{hook or 'resid_post'}"


def installed_version(dist: str) -> str | None:
    """The installed version of a distribution, None when it is not installed."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return None


# ---------------------------------------------------------------------------------------------
# checks that run before any work


def check_hub(repo: str) -> str:
    """The token to upload `repo` with; ExportError (one line) when offline, unreachable or unauthenticated."""
    from huggingface_hub import constants, get_token
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo)
    except HFValidationError:
        raise ExportError(f"--push-to-hub {repo!r} is not a Hub repository id: use NAME/REPO, e.g. me/gemma-mlsae")
    env = os.environ.get("HF_HUB_OFFLINE")  # read now: huggingface_hub read it once, at import
    if env.strip().lower() in ("1", "true", "yes", "on") if env is not None else constants.HF_HUB_OFFLINE:
        raise ExportError(
            "--push-to-hub needs the Hugging Face Hub but HF_HUB_OFFLINE is set: unset it where there is a "
            "network, or export without --push-to-hub and upload the folder later"
        )
    token = get_token()
    if not token:
        raise ExportError("--push-to-hub needs a Hugging Face token: run `hf auth login` or set HF_TOKEN")
    import urllib.error
    import urllib.request

    endpoint = os.environ.get("HF_ENDPOINT", constants.ENDPOINT).rstrip("/")
    request = urllib.request.Request(f"{endpoint}/api/whoami-v2", headers={"Authorization": f"Bearer {token}"})
    try:
        urllib.request.urlopen(request, timeout=10).close()
    except urllib.error.HTTPError as e:
        if e.code in (401, 403):
            raise ExportError(f"the Hub at {endpoint} refused the token (HTTP {e.code}): run `hf auth login` again")
        raise ExportError(f"the Hub at {endpoint} answered HTTP {e.code}: retry later, or export without --push-to-hub")
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise ExportError(
            f"cannot reach the Hugging Face Hub at {endpoint} ({reason}): export without --push-to-hub where "
            f"there is no network, and upload the folder later"
        )
    return token


def _check_out(out: Path) -> None:
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / MARKER).is_file())):
        raise ExportError(f"{out} exists and is not an export of ours: choose another --out or remove it")


# ---------------------------------------------------------------------------------------------
# SAELens


def saelens_tensors(sae: Any, fold: bool = True) -> dict[str, torch.Tensor]:
    """SAELens's TopK weights equal to our SAE (see the module doc); `fold=False` only to show the fold matters."""
    c = fold_constant(sae.cfg.d_model) if fold else 1.0
    W_enc, W_dec, b_pre = (p.detach().float().cpu() for p in (sae.W_enc, sae.W_dec, sae.b_pre))
    return {
        "W_enc": (W_enc.T / c).contiguous(),
        "b_enc": torch.zeros(sae.cfg.n_latents),
        "W_dec": (W_dec * c).contiguous(),
        "b_dec": (b_pre * c).contiguous(),
    }


def saelens_config(record: RunRecord, cache: Any, layer: int, held_out: dict | None) -> dict:
    from train.special import SpecialTokens

    cache_meta = cache.meta
    spec, tok = cache_meta["spec"], cache_meta.get("tokenizer", {})
    special = SpecialTokens.of(record.special_tokens, cache)
    metadata = {
        "sae_lens_version": installed_version("sae-lens"),
        "sae_lens_training_version": None,
        "model_name": _model_id(cache_meta),
        "hook_name": hook_name(layer, record.cache.hook),
        "hook_head_index": None,
        "context_size": spec["context"],
        "prepend_bos": tok.get("prepend_bos"),
        "dataset_path": spec["dataset"],
        # the ids the SAE never saw (mode exclude); in reference/include-real modes it saw them
        "exclude_special_tokens": list(special.ids) if special.mode == "exclude" else False,
        "neuronpedia_id": None,
    }
    return {
        "architecture": "topk",
        "d_in": record.sae.d_model,
        "d_sae": record.sae.n_latents,
        "k": record.sae.k,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": True,
        "normalize_activations": "layer_norm",
        "reshape_activations": "none",
        "rescale_acts_by_decoder_norm": False,
        "metadata": metadata,
        **{k: v for k, v in metadata.items() if k != "sae_lens_version"},  # what a pre-6 reading looks for
        "mlsae": {  # provenance; SAELens ignores keys it does not know
            "config_layout": f"sae_lens {SAELENS_LAYOUT}",
            "run": record.dir.name,
            "trained_layers": record.layers,
            "multi_layer": record.multi_layer,
            "cache_fingerprint": record.cache.fingerprint,
            "standardization_fold_c": fold_constant(record.sae.d_model),
            "special_tokens": special.mode,
            "held_out_fvu": held_out,
        },
    }


def _model_id(cache_meta: dict[str, Any]) -> str:
    """The model's Hub id where it has one, else its name as the cache records it (embedded or local)."""
    m = cache_meta["model"]
    return m.get("identity", {}).get("hub_id") or m["name"]


def base_model(cache_meta: dict[str, Any]) -> str | None:
    """The Hub model the SAE reads (an embedded GGUF: the model it quantizes); None for a local model."""
    ident = cache_meta["model"].get("identity", {})
    return ident.get("hub_id") or EMBEDDED_BASE.get(ident.get("embedded", ""))


def _model_note(cache_meta: dict[str, Any]) -> str:
    ident = cache_meta["model"].get("identity", {})
    if "embedded" in ident:
        return f" (the embedded GGUF, sha256 {ident.get('gguf_sha256', '')[:12]}, dequantized: not the Hub checkpoint)"
    return f" (revision {ident['revision']})" if ident.get("revision") else ""


def _held_out_at(summary: dict[str, Any] | None, layer: int) -> dict[str, float] | None:
    h = (summary or {}).get("held_out") or {}
    if layer not in h.get("layers", []):
        return None
    i = h["layers"].index(layer)
    return {"fvu": h["fvu"][i], "fvu_feature": h["fvu_feature"][i], "tokens": h.get("tokens")}


def write_saelens(record: RunRecord, sae: Any, cache: Any, folder: Path) -> list[str]:
    """One SAELens folder per trained layer; the weights file is written once and hard-linked (same bytes)."""
    from safetensors.torch import save_file

    summary = record.summary()
    first: Path | None = None
    names = []
    for layer in record.layers:
        name = hook_name(layer, record.cache.hook)
        sub = folder / name
        sub.mkdir()
        cfg = saelens_config(record, cache, layer, _held_out_at(summary, layer))
        atomic_write_json(sub / "cfg.json", cfg)
        weights = sub / "sae_weights.safetensors"
        if first is None:
            tensors = saelens_tensors(sae)
            atomic_write(weights, lambda tmp, t=tensors: save_file(t, str(tmp)))
            first = weights
        else:
            try:
                os.link(first, weights)
            except OSError:
                shutil.copyfile(first, weights)
        names.append(name)
    return names


# ---------------------------------------------------------------------------------------------
# delphi


def delphi_splits(n_latents: int, n_splits: int) -> list[tuple[int, int]]:
    """delphi's latent ranges: [start, end] inclusive, boundaries linspace(0, n_latents, n_splits + 1)."""
    b = torch.linspace(0, n_latents, n_splits + 1).long().tolist()
    return [(b[i], b[i + 1] - 1) for i in range(n_splits) if b[i + 1] > b[i]]


def write_delphi(
    record: RunRecord,
    sae: Any,
    cache: Any,
    folder: Path,
    splits: int,
    tokens: int | None,
    device: str,
    progress: bool,
) -> dict[str, Any]:
    """Stream whole windows of the cache through the SAE once (all of them, or with `tokens` the first
    ceil(tokens / context)), spilling each (layer, split)'s nonzero entries to raw files, then sort each
    split by (window, position, latent) and write it as safetensors under folder/latents. Memory: one split
    at a time (about tokens * k / splits entries of 14 bytes, plus the sort's index)."""
    from safetensors.numpy import save_file

    from harvest.progress import progress_bar
    from train.latents import iter_latents
    from train.special import SpecialTokens

    F, C = record.sae.n_latents, cache.layout.context
    n_windows = cache.layout.n_sequences if tokens is None else min(cache.layout.n_sequences, -(-tokens // C))
    chunks, select = None, None
    if n_windows < cache.layout.n_sequences:  # the chunks holding the first n_windows windows (write blocks
        # shuffle a window's positions over their chunks), and only those windows' tokens
        at = (cache.read_tokens("seq").long() < n_windows).nonzero().squeeze(1)
        chunks = torch.unique(at // cache.layout.chunk_tokens).tolist()
        select = lambda seq: seq < n_windows
    ranges = delphi_splits(F, splits)
    starts = torch.tensor([s for s, _ in ranges])
    spill = folder / ".spill"
    spill.mkdir()
    files = {
        (li, si): (open(spill / f"{li}_{si}.loc", "wb"), open(spill / f"{li}_{si}.act", "wb"))  # noqa: SIM115
        for li in range(len(record.layers))
        for si in range(len(ranges))
    }
    streamed = 0
    try:
        special = SpecialTokens.of(record.special_tokens, cache)
        total = n_windows * C  # an upper bound: special tokens are not encoded
        with progress_bar("delphi", total, "tokens", enabled=progress, rate_unit="tok/s") as bar:
            stream = iter_latents(
                sae, cache, record.layers, chunks=chunks, select=select, device=device, special=special
            )
            for b in stream:
                streamed += b.n
                bar.advance(b.n)
                for li in range(len(record.layers)):
                    v, i = b.values[li].cpu(), b.indices[li].cpu()
                    tok, slot = (v > DELPHI_MIN_ACTIVATION).nonzero(as_tuple=True)
                    lat = i[tok, slot]
                    split = torch.bucketize(lat, starts, right=True) - 1
                    loc = torch.stack([b.seq.cpu()[tok], b.pos.cpu()[tok], lat - starts[split]], 1).to(torch.int32)
                    act = v[tok, slot].to(torch.float16)
                    for si in torch.unique(split).tolist():
                        m = split == si
                        floc, fact = files[(li, si)]
                        floc.write(loc[m].numpy().tobytes())
                        fact.write(act[m].numpy().tobytes())
            bar.update(completed=streamed, total=streamed)
    finally:
        for floc, fact in files.values():
            floc.close()
            fact.close()
    windows = np.ascontiguousarray(cache.windows().numpy()[:n_windows])
    spec = cache.meta["spec"]
    modules = []
    (folder / DELPHI_LATENTS).mkdir()
    for li, layer in enumerate(record.layers):
        module = hook_name(layer, record.cache.hook)
        (folder / DELPHI_LATENTS / module).mkdir()
        for si, (start, end) in enumerate(ranges):
            loc = np.fromfile(spill / f"{li}_{si}.loc", dtype=np.int32).reshape(-1, 3)
            act = np.fromfile(spill / f"{li}_{si}.act", dtype=np.float16)
            key = (loc[:, 0].astype(np.int64) * C + loc[:, 1]) * (end - start + 1) + loc[:, 2]
            order = np.argsort(key, kind="stable")
            small = len(loc) == 0 or (loc[:, 2].max() < 2**16 and loc[:, 0].max() < 2**16)
            data = {
                "locations": np.ascontiguousarray(loc[order].astype(np.uint16 if small else np.uint32)),
                "activations": np.ascontiguousarray(act[order]),
                "tokens": windows,
            }
            atomic_write(
                folder / DELPHI_LATENTS / module / f"{start}_{end}.safetensors",
                lambda tmp, data=data: save_file(data, str(tmp)),
            )
            (spill / f"{li}_{si}.loc").unlink()
            (spill / f"{li}_{si}.act").unlink()
        config = {
            # what delphi loads the tokenizer from: the Hub id, else the local model folder
            "model_name": cache.meta["model"].get("identity", {}).get("hub_id") or cache.meta["model"]["path"],
            "dataset_repo": spec["dataset"],
            "dataset_split": spec.get("split", "train"),
            "dataset_name": spec.get("dataset_config") or "",
            "dataset_column": spec.get("text_column", "text"),
            "dataset_row": spec.get("text_column", "text"),  # the key's name in older delphi releases
            "batch_size": spec.get("batch_size", 1),
            "cache_ctx_len": C,
            "ctx_len": C,  # older delphi releases
            "n_tokens": streamed,
            "n_windows": n_windows,
            "n_splits": len(ranges),
            "width": F,
            "mlsae_cache_fingerprint": cache.fingerprint,
            "note": "streamed from an mlsae-cache activation cache: `tokens` are its context windows; tokens "
            "excluded from the cache's keep mask (special tokens) have no activations",
        }
        atomic_write_json(folder / DELPHI_LATENTS / module / "config.json", config)
        modules.append(module)
    shutil.rmtree(spill)
    return {
        "modules": modules,
        "latents_dir": DELPHI_LATENTS,
        "splits": [list(r) for r in ranges],
        "tokens": streamed,
        "windows": n_windows,
    }


# ---------------------------------------------------------------------------------------------
# model card, the export, the upload


def model_card(record: RunRecord, fmt: str, cache_meta: dict[str, Any], repo: str | None, parts: list[str]) -> str:
    summary = record.summary() or {}
    h = summary.get("held_out") or {}
    spec = cache_meta["spec"]
    from huggingface_hub import ModelCardData

    card = ModelCardData(
        library_name="saelens" if fmt == "saelens" else "delphi",
        base_model=base_model(cache_meta),
        tags=["sparse-autoencoder", "mlsae" if record.multi_layer else "sae", fmt],
    )
    lines = ["---", card.to_yaml(), "---"]
    lines += [
        "",
        f"# {record.label()} of {_model_id(cache_meta)}: TopK sparse autoencoder"
        + (" shared by every layer" if record.multi_layer else f" on layer {record.layers[0]}"),
        "",
        "Trained with mlsae-cache (a reproduction of Lawson et al., *Residual Stream Analysis with Multi-Layer "
        "SAEs*, arXiv 2409.04185) from a cache of residual-stream activations.",
        "",
        "| | |",
        "|---|---|",
        f"| model | `{_model_id(cache_meta)}`{_model_note(cache_meta)} |",
        f"| hook | `{hook_name(record.layers[0], record.cache.hook)}`"
        + (f" ... layer {record.layers[-1]} ({len(record.layers)} layers, one SAE)" if record.multi_layer else "")
        + " |",
        f"| latents, k | {record.sae.n_latents:,} (d_model {record.sae.d_model}), k = {record.sae.k} |",
        f"| cache | dataset `{spec['dataset']}`, {cache_meta['layout']['n_tokens']:,} tokens in windows of "
        f"{spec['context']}, {spec['dtype']}, special tokens `{spec.get('special_tokens')}`, fingerprint "
        f"`{record.cache.fingerprint}` |",
        f"| tuned lens | {'yes: ' + json.dumps(record.cache.lens.get('source')) if record.cache.lens else 'none'} |",
        f"| training | {record.steps:,} steps x {record.train.batch_tokens:,} tokens, lr {record.lr_effective:g}, "
        f"special tokens `{record.special_tokens}`, held out: {record.heldout.describe()} |",
    ]
    if h:
        lines.append(
            f"| held-out FVU, mean over layers | {h['fvu_mean']:.4f} (per-feature {h['fvu_feature_mean']:.4f}) "
            f"on {h.get('tokens', 0):,} tokens |"
        )
        lines += ["", "Held-out FVU per layer (reference definition / per-feature):", ""]
        lines += ["| layer | FVU | FVU per-feature |", "|---|---|---|"]
        lines += [f"| {l} | {a:.4f} | {b:.4f} |" for l, a, b in zip(h["layers"], h["fvu"], h["fvu_feature"])]
    lines += ["", "Hyperparameters:", "", "```json", json.dumps(record.train.hyperparameters(), indent=1), "```", ""]
    if fmt == "saelens":
        where = f'"{repo}", ' if repo else ""
        lines += [
            "## Loading with SAELens (>= 6)",
            "",
            "One folder per hook (an MLSAE's layers share the weights):",
            "",
            "```python",
            "from sae_lens import SAE",
            f'sae = SAE.from_pretrained({where or "REPO, "}"{parts[0]}")'
            if repo
            else f'sae = SAE.load_from_disk("{parts[0]}")',
            "```",
            "",
            "`normalize_activations: layer_norm` standardizes each vector with the Bessel-corrected std; the "
            "SAE was trained with the population std, and c = sqrt((d-1)/d) is folded into the weights "
            "(W_enc / c, W_dec * c, b_dec = c b_pre), so both forwards agree.",
        ]
    else:
        lines += [
            "## Loading with delphi",
            "",
            f"A latent cache in delphi's layout under `{DELPHI_LATENTS}/`: one module per layer "
            f"({', '.join(parts[:3])}{', ...' if len(parts) > 3 else ''}), `<start>_<end>.safetensors` files "
            "with `locations`, `activations` and `tokens` (whole context windows), and a `config.json` per "
            f"module. Pass `{DELPHI_LATENTS}/` to delphi's Python API (its command line needs a sparsify-format "
            "coder and a model on CUDA):",
            "",
            "```python",
            "from delphi.config import ConstructorConfig, SamplerConfig",
            "from delphi.latents import LatentDataset",
            "",
            f'dataset = LatentDataset("{DELPHI_LATENTS}", SamplerConfig(), ConstructorConfig())  # every module',
            "for record in dataset:  # a LatentRecord per latent and module, with its examples",
            "    ...",
            "```",
        ]
    return "\n".join(lines) + "\n"


def export_run(
    run_dir: str | Path,
    fmt: str,
    out: str | Path,
    push_to_hub: str | None = None,
    cache_path: str | Path | None = None,
    tokens: int | None = None,
    splits: int = 5,
    device: str = "auto",
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Export a finished run as `fmt` into `out` (see the module doc); optionally upload it to `push_to_hub`.
    `cache_path` (default: the run's) supplies the model's metadata, and delphi's windows: any harvest of the
    run's model (train/inputs.py)."""
    from harvest.models import resolve_device
    from train.inputs import open_inputs

    if fmt not in FORMATS:
        raise ExportError(f"--format {fmt!r} is not supported: use one of {', '.join(FORMATS)}")
    record = load_run(run_dir)
    if fmt == "saelens" and record.cache.lens is not None:
        raise ExportError(
            f"{record.dir} was trained in tuned-lens space, which SAELens cannot express (it would feed the SAE "
            f"raw residuals): export --format delphi, or train on a cache harvested without --lens"
        )
    if splits < 1 or (tokens is not None and tokens < 1):
        raise ExportError(f"need --splits >= 1 and --tokens >= 1, got {splits} and {tokens}")
    out = Path(out)
    _check_out(out)
    token = check_hub(push_to_hub) if push_to_hub else None
    t0 = time.time()
    dev = resolve_device(device)
    sae = record.load_sae(dev)
    inputs = open_inputs(record, cache_path, purpose="train export")
    cache = inputs.cache
    if not inputs.trained_on:
        log(f"reading {inputs.describe()}")
    if fmt == "delphi":
        cache.require_complete()
    cache_meta = cache.meta
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = fresh_folder(out.parent, f".{out.name}.")
    except OSError as e:
        raise ExportError(f"cannot write next to {out} ({e.strerror or e}): choose a writable --out")
    try:
        if fmt == "saelens":
            parts, extra = write_saelens(record, sae, cache, tmp), {}
        else:
            extra = write_delphi(record, sae, cache, tmp, splits, tokens, dev, progress)
            parts = extra["modules"]
        atomic_write_text(tmp / "README.md", model_card(record, fmt, cache_meta, push_to_hub, parts))
        result = {
            "format": fmt,
            "run": record.dir.resolve().name,  # a name, not a path of this machine: the folder is shared
            "parts": parts,
            "layers": record.layers,
            "cache_fingerprint": record.cache.fingerprint,
            "read_cache_fingerprint": cache.fingerprint,  # the training cache's, or another harvest's of its model
            "seconds": time.time() - t0,
            **extra,
        }
        atomic_write_json(tmp / MARKER, result)
        result["out"] = str(out)
        fsync_dir(tmp)
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.rename(out, old)
            os.rename(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, out)
        fsync_dir(out.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if push_to_hub:
        from huggingface_hub import HfApi

        api = HfApi(token=token)
        url = api.create_repo(push_to_hub, exist_ok=True).url
        api.upload_folder(
            repo_id=push_to_hub, folder_path=str(out), commit_message=f"{fmt} export of {record.dir.name}"
        )
        result["hub"] = str(url)
        log(f"uploaded to {url}")
    return result
