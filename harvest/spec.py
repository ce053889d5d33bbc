"""The harvest spec: one dataclass that `cache_spec.yaml` and the `harvest run` flags map onto 1:1.

Every field here is either part of the cache's identity (it changes the bytes on disk, so it is in
the fingerprint) or a runtime knob (`RUNTIME_FIELDS`: how fast, where, not what).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass, fields
from typing import Any, Literal

from .errors import SpecError
from .flags import FlagConfig, flag_field

StorageDtype = Literal["bfloat16", "float32", "float16", "float8"]
ModelDtype = Literal["float32", "bfloat16", "float16"]
Compression = Literal["none", "blosc-zstd"]
Hook = Literal["resid_post", "resid_pre", "resid_mid"]
# "include" is the old name of "include-real" (still accepted; caches made before the rename say "include").
SpecialTokens = Literal["exclude", "reference", "include-real", "include"]
BosPolicy = Literal["auto", "always", "never"]

# Fields that do not change the cached data: a resume may change them freely. (strict_text, allow_nonfinite
# and allow_out_of_range only decide whether a run stops; the bytes of a run that finishes are the same.)
RUNTIME_FIELDS = frozenset({"out", "batch_size", "device", "strict_text", "allow_nonfinite", "allow_out_of_range"})


_f = flag_field


@dataclass
class ModelText(FlagConfig):
    """The model and the text it reads: the first fields of `harvest run` (CacheSpec) and of `harvest lens
    train` (harvest.lens_train.LensSpec)."""

    model: str = _f("gemma-3-270m", "Hub id, local Hugging Face folder, .gguf file, or embedded name (gemma-3-270m).")
    dataset: str = _f("sotu", "Hub dataset id, local .txt/.jsonl/.parquet file or folder, or embedded name (sotu).")
    dataset_config: str | None = _f(None, "Hub dataset configuration name, if the dataset has several.")
    split: str = _f("train", "Dataset split.")
    text_column: str = _f("text", "Column holding the document text.")
    strict_text: bool = _f(
        False, "Stop at the first row whose text is not a string (default: skip such rows with one warning)."
    )


@dataclass
class CacheSpec(ModelText):
    _what = "spec"
    _yaml_flag = "--config"

    context: int = _f(1024, "Tokens per context window (the reference uses 2048).")
    tokens: int = _f(40_960, "Token budget: rounded UP to whole context windows.")
    layers: str = _f("all", "Blocks to cache: 'all' or a comma list such as '0,3,5'.")
    hook: Hook = _f("resid_post", "Hook point per block: resid_post (paper), resid_pre or resid_mid.")
    dtype: StorageDtype = _f(
        "bfloat16",
        "Storage dtype: bfloat16 (default), float32, float16 (errors on overflow), or float8 (one byte per value: "
        "e4m3 codes with per-channel scales fixed before the first block; docs/float8.md).",
    )
    model_dtype: ModelDtype = _f("float32", "dtype the model runs in: float32, bfloat16 or float16.")
    lens: str = _f(
        "none",
        "Tuned lens applied before storing: none, a lens folder (config.json + params.pt, e.g. "
        "from `harvest lens train`), hub (the FAR.AI lens of this Hub model) or hub:<model id>.",
    )
    special_tokens: SpecialTokens = _f(
        "exclude",
        "BOS/EOS/PAD positions: exclude (keep=False, the default), reference (vectors stored as zeros and kept, "
        "as the reference code), include-real (the real vectors, kept); include = include-real.",
    )
    prepend_bos: BosPolicy = _f(
        "auto", "Start each window with BOS: auto (where the tokenizer adds one), always, never."
    )
    batch_size: int = _f(4, "Context windows per forward pass.")
    chunk_tokens: int = _f(4096, "Tokens per inner chunk (the unit of random reads); aim for 4-8 MB per layer.")
    shard_tokens: int = _f(65_536, "Tokens per shard file (one file per layer and shard); a multiple of chunk_tokens.")
    shuffle_tokens: int = _f(131_072, "Write-shuffle window: tokens buffered, permuted and flushed together.")
    compression: Compression = _f(
        "none", "none (fastest reads) or blosc-zstd (level 1, byte shuffle; for slow storage)."
    )
    seed: int = _f(0, "Seed of the write-shuffle permutations.")
    allow_nonfinite: bool = _f(
        False, "Store NaN/inf activations (counted per layer in the stats and `harvest info`) instead of stopping."
    )
    allow_out_of_range: bool = _f(
        False,
        "float8: store values beyond the scales' range saturated (counted per layer in the stats and `harvest "
        "info`) instead of stopping.",
    )
    device: str = _f("auto", "auto (cuda if present), cpu, cuda or cuda:N.")
    out: str = _f("caches/gemma-3-270m-sotu", "Output folder of the cache.")

    # ---- validation ---------------------------------------------------------------------------
    def validate(self) -> "CacheSpec":
        """Checks that need no model or data; raises SpecError naming the field and the fix. Returns the spec
        with aliases replaced by their names (special_tokens include -> include-real)."""
        self.check_types()
        for name in ["context", "tokens", "batch_size", "chunk_tokens", "shard_tokens", "shuffle_tokens"]:
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise SpecError(f"{name} = {v!r} must be a positive integer")
        if self.seed < 0:
            raise SpecError(f"seed = {self.seed} must be a non-negative integer")
        if self.context < 2:
            raise SpecError(f"context = {self.context} is too short: use at least 2 tokens")
        if self.shard_tokens % self.chunk_tokens:
            raise SpecError(
                f"shard_tokens = {self.shard_tokens} must be a multiple of chunk_tokens = {self.chunk_tokens}"
            )
        unit = math.lcm(self.shard_tokens, self.context)
        if self.shuffle_tokens % unit:
            lo = max(unit, self.shuffle_tokens // unit * unit)
            raise SpecError(
                f"shuffle_tokens = {self.shuffle_tokens} must be a multiple of both shard_tokens and context "
                f"(lcm {unit}): use e.g. {lo}"
            )
        if self.lens != "none" and self.hook != "resid_post":
            raise SpecError(
                f"lens = {self.lens!r} with hook = {self.hook!r}: lens translators are mapped to block "
                f"outputs; use --hook resid_post, or --lens none"
            )
        self.layer_list(None)  # syntax check
        if self.special_tokens == "include":
            return dataclasses.replace(self, special_tokens="include-real")
        return self

    def layer_list(self, n_layers: int | None) -> list[int] | None:
        """Parsed `layers`; with n_layers, resolved and range-checked. None means all (unknown count)."""
        text = str(self.layers).strip().lower()
        if text == "all":
            return None if n_layers is None else list(range(n_layers))
        try:
            layers = [int(x) for x in text.replace(" ", "").split(",") if x != ""]
        except ValueError:
            raise SpecError(f"layers = {self.layers!r} is not 'all' or a comma list of block indices such as '0,3,5'")
        if not layers:
            raise SpecError("layers is empty: use 'all' or a comma list such as '0,3,5'")
        if len(set(layers)) != len(layers) or layers != sorted(layers):
            raise SpecError(f"layers = {self.layers!r} must be increasing without repeats, e.g. '0,3,5'")
        if n_layers is not None:
            bad = [l for l in layers if not 0 <= l < n_layers]
            if bad:
                raise SpecError(f"layer(s) {bad} out of range: the model has {n_layers} blocks (0..{n_layers - 1})")
        return layers

    def n_sequences(self) -> int:
        return -(-self.tokens // self.context)

    # ---- identity -----------------------------------------------------------------------------
    def identity(self) -> dict[str, Any]:
        """The fields that determine the cached bytes. include-real is fingerprinted under its old name
        "include" (same bytes), so caches harvested before the rename keep their fingerprint and resume."""
        ident = {k: v for k, v in self.to_dict().items() if k not in RUNTIME_FIELDS}
        if ident["special_tokens"] == "include-real":
            ident["special_tokens"] = "include"
        return ident


def fingerprint(identity: dict[str, Any]) -> str:
    """A stable hash of everything that determines a cache's data."""
    blob = json.dumps(identity, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def spec_fields() -> list[dataclasses.Field]:
    return list(fields(CacheSpec))
