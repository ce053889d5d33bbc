"""Tuned lens (Belrose et al. 2023): per-layer affine translators, FAR.AI file format, exact inverse, training.

A translator is T_i(h) = h + W_i h + b_i, zero-initialized, so a fresh lens is the logit lens. Translator i
was trained on Hugging Face `hidden_states[i]`, the INPUT of block i; see `translator_for_block_output`.
Files follow the `tuned-lens` library (FAR.AI / AlignmentResearch): a folder with `config.json` and
`params.pt` holding a flat state dict `{i}.weight` [d, d], `{i}.bias` [d]. Torch only: the package itself
pins old dependencies and does not know Gemma 3.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from .atomic import atomic_torch_save, atomic_write_json
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
            raise LensError(
                f"lens config.json lacks {', '.join(missing)}: use a tuned-lens folder "
                f"(config.json + params.pt) or retrain with `harvest lens train`"
            )
        d = {k: v for k, v in d.items() if k in known}  # unknown keys are ignored, as the library does
        d.setdefault("base_model_name_or_path", "")
        return cls(**d)


# ---------------------------------------------------------------------------------------------
# the model's readout: final norm + unembedding (+ Gemma's logit softcap)


@dataclass
class Unembed:
    """Logits = softcap(x @ weight.T + bias); weight [vocab, d]; also by vocabulary slices. The matmuls run in
    `dtype` (float32 unless asked otherwise), everything after them in float32."""

    weight: torch.Tensor
    bias: torch.Tensor | None = None
    softcap: float | None = None
    dtype: torch.dtype = torch.float32

    def __post_init__(self) -> None:
        self.weight = self.weight.to(self.dtype)

    def in_dtype(self, dtype: torch.dtype) -> "Unembed":
        return self if dtype == self.dtype else Unembed(self.weight, self.bias, self.softcap, dtype)

    def chunk(self, x: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
        z = F.linear(x.to(self.dtype), self.weight[lo:hi]).float()
        if self.bias is not None:
            z = z + self.bias[lo:hi].float()
        return z if not self.softcap else self.softcap * torch.tanh(z / self.softcap)

    def chunk_grad(self, gz: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
        """d(loss)/dx from d(loss)/d(logits of rows lo:hi), for chunk()'s x (before the softcap's factor)."""
        return (gz.to(self.dtype) @ self.weight[lo:hi]).float()

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
    norm = next(
        (getattr(base, n) for n in ("norm", "final_layer_norm", "ln_f") if getattr(base, n, None) is not None), None
    )
    out = hf.get_output_embeddings()
    if norm is None or out is None:
        raise LensError(
            f"cannot find the final norm / unembedding of {type(hf).__name__}: "
            f"the tuned lens supports models with base_model.norm or .final_layer_norm"
        )
    out = _unwrap(out)
    cfg = hf.config.get_text_config() if hasattr(hf.config, "get_text_config") else hf.config
    cap = getattr(cfg, "final_logit_softcapping", None)  # Gemma 2/3: logits = cap * tanh(logits / cap)
    return FinalNorm(_unwrap(norm)), Unembed(
        out.weight.detach(),
        None if getattr(out, "bias", None) is None else out.bias.detach(),
        float(cap) if cap else None,
    )


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
        atomic_torch_save(folder / PARAMS_FILE, state)
        atomic_write_json(folder / CONFIG_FILE, asdict(self.config), indent=2)
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
            raise LensError(
                f"cannot read {params_path} ({type(e).__name__}): re-download the lens or retrain it "
                f"with `harvest lens train`"
            )
        if not isinstance(state, dict):
            raise LensError(
                f"{params_path} is not a state dict: re-download the lens or retrain it with `harvest lens train`"
            )
        if any(k.startswith(("layer_translators.", "unembed.", "layer_norm", "probes.")) for k in state):
            raise LensError(
                f"{params_path} has the old tuned-lens v0.0.x layout (keys like layer_translators.0.weight"
                f" or unembed.*): "
                f"convert it with tuned-lens>=0.1 (TunedLens.load then .save) or retrain with "
                f"`harvest lens train`"
            )
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
            raise LensError(
                f"lens {folder} is for d_model={found[0]}, {found[1]} layers but the model has "
                f"d_model={expected[0]}, {expected[1]} layers: use the lens trained for this model"
            )
        lens = cls(config)
        want = lens.layer_translators.state_dict()
        if set(state) != set(want):
            extra, miss = sorted(set(state) - set(want))[:3], sorted(set(want) - set(state))[:3]
            raise LensError(
                f"{params_path} keys do not match {found[1]} translators (missing {miss}, unexpected "
                f"{extra}): use the lens trained for this model"
            )
        for k, v in state.items():
            if tuple(v.shape) != tuple(want[k].shape):
                raise LensError(
                    f"{params_path}: {k} has shape {tuple(v.shape)}, expected {tuple(want[k].shape)} "
                    f"for d_model={expected[0]}: use the lens trained for this model"
                )
        lens.layer_translators.load_state_dict({k: v.float() for k, v in state.items()})
        return lens

    @classmethod
    def from_hub(
        cls, model_id: str, d_model: int | None = None, n_layers: int | None = None, revision: str = "main"
    ) -> "Lens":
        """A pretrained lens from the space AlignmentResearch/tuned-lens, folder lens/<model id>/."""
        return cls.load(_hub_folder(model_id, revision), d_model, n_layers)


def _hub_folder(model_id: str, revision: str = "main") -> Path:
    """The local folder of lens/<model id>/ from the Hub space, downloaded once into the Hugging Face cache."""
    try:
        from huggingface_hub import hf_hub_download

        paths = [
            hf_hub_download(HUB_REPO, f, repo_type="space", subfolder=f"lens/{model_id}", revision=revision)
            for f in (PARAMS_FILE, CONFIG_FILE)
        ]
    except Exception as e:  # offline, no such lens, network errors: all one message
        raise LensError(
            f"cannot fetch the tuned lens for {model_id!r} from the Hub space {HUB_REPO} "
            f"({type(e).__name__}): go online, pass a local lens folder, or train one with "
            f"`harvest lens train`"
        )
    return Path(paths[0]).parent


# ---------------------------------------------------------------------------------------------
# a lens named by the user (harvest run --lens) and its record in a cache

MAPPING = "output of block l -> translator l+1 (trained on hidden_states[l+1]); last block -> identity"


def params_sha256(folder: str | Path) -> str:
    h = hashlib.sha256()
    with open(Path(folder) / PARAMS_FILE, "rb") as f:
        while buf := f.read(1 << 22):
            h.update(buf)
    return h.hexdigest()


@dataclass
class LensSource:
    """Where a lens comes from: `value` as the user gave it, `folder` holding config.json + params.pt."""

    value: str
    folder: Path
    sha256: str

    def load(self, d_model: int, n_layers: int) -> Lens:
        return Lens.load(self.folder, d_model, n_layers)

    def record(self, layers: list[int], n_layers: int) -> dict:
        """What a cache (and every run trained on it) says about its lens."""
        return {
            "source": self.value,
            "path": str(self.folder),
            "params_sha256": self.sha256,
            "mapping": MAPPING,
            "translators": {str(l): translator_for_block_output(l, n_layers) for l in layers},
            "config": json.loads((self.folder / CONFIG_FILE).read_text()),
        }


def resolve_lens(value: str, model_hub_id: str | None) -> LensSource | None:
    """'none' -> None; a local lens folder; 'hub' (the model's own Hub id) or 'hub:<model id>' -> the
    FAR.AI lens from the Hub space, downloaded into the Hugging Face cache."""
    if value == "none":
        return None
    if value == "hub" or value.startswith("hub:"):
        model_id = value[4:] or model_hub_id
        if not model_id:
            raise LensError(
                "lens = 'hub' needs a Hub model id and this model is local: use --lens hub:<model id> "
                "(e.g. hub:EleutherAI/pythia-70m) or a local lens folder"
            )
        folder = _hub_folder(model_id)
    else:
        folder = Path(value).expanduser()
        if not (folder / PARAMS_FILE).is_file():
            raise LensError(
                f"no lens at {value}: pass a folder with {CONFIG_FILE} and {PARAMS_FILE} (train one with "
                f"`harvest lens train`), 'hub' or 'hub:<model id>', or 'none'"
            )
    folder = folder.resolve()
    return LensSource(value, folder, params_sha256(folder))
