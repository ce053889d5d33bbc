"""TrainConfig: the `train run` flags, the `--config` YAML and the run's config.json, one to one."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Literal

from harvest.errors import SpecError
from harvest.flags import FlagConfig, flag_field, read_yaml_mapping
from train.special import SpecialTokensMode

# Fields that may change when a run is resumed (they do not change the result).
RUNTIME_FIELDS = frozenset(
    {"out", "device", "checkpoint_every", "log_every", "eval_every", "prefetch", "local_cache", "snapshot_tokens"}
)


_f = flag_field


@dataclass
class TrainConfig(FlagConfig):
    cache: str = _f("caches/gemma-3-270m-sotu", "Harvested cache: a folder or a URL (s3://, gs://, az://).")
    layers: str = _f(
        "all", "'all' trains the multi-layer SAE on every cached layer; a layer number trains a single-layer SAE."
    )
    expansion_factor: int = _f(64, "n_latents = expansion_factor * d_model (paper: 64).")
    k: int = _f(32, "Latents kept per vector by TopK (paper: 32).")
    tokens: int = _f(
        0,
        "Training tokens (each gives one vector per layer); 0 = one pass over the training split. "
        "More than the cache means epochs.",
    )
    batch_tokens: int = _f(131_072, "Tokens per optimizer step (x layers vectors for the MLSAE; paper: 131,072).")
    lr: float = _f(1e-4, "Adam learning rate (paper: 1e-4).")
    lr_scaling: bool = _f(False, "Use Gao et al.'s lr = 2e-4 / sqrt(n_latents / 2^14) instead of --lr.")
    warmup_steps: int = _f(0, "Linear lr warm-up steps (paper: none).")
    dead_tokens: int = _f(10_000_000, "A latent is dead after this many training tokens without firing.")
    k_aux: int = _f(256, "AuxK: dead latents used to reconstruct the residual.")
    aux_coef: float = _f(1 / 32, "AuxK loss coefficient.")
    eval_tokens: int = _f(
        65_536,
        "Held-out tokens: whole context windows (grouped by document), never trained on (at most half the cache).",
    )
    heldout_seed: int = _f(0, "Seed of the held-out windows (keep it equal across runs that analyses compare).")
    round_chunks: int = _f(32, "Shuffle buffer: chunks read and permuted together on the device.")
    special_tokens: SpecialTokensMode = _f(
        "cache",
        "BOS/EOS/PAD: cache (follow the cache's keep mask), exclude, reference (zero vectors, kept in the loss and "
        "every metric: the reference code) or include-real (their real vectors).",
    )
    seed: int = _f(0, "Seed of initialization and data order.")
    device: str = _f("auto", "auto (cuda when present), cpu, cuda or cuda:N.")
    checkpoint_every: int = _f(200, "Steps between resumable checkpoints.")
    log_every: int = _f(10, "Steps between lines of metrics.jsonl.")
    eval_every: int = _f(
        0,
        "Steps between held-out evaluations (0 = before and after training only): lines of metrics.jsonl, and "
        "heldout.csv / heldout.png at the end. Each encodes the held-out tokens once.",
    )
    snapshot_tokens: str = _f(
        "",
        "Comma list of training-token counts (e.g. 262144,524288) at which each SAE is evaluated on the held-out "
        "set and saved as a loadable run folder <out>/snapshots/tokens-<n> (for analyses along training).",
    )
    log_to: Literal["none", "wandb", "trackio"] = _f(
        "none", "Also log to an experiment tracker (SAELens key names); metrics.jsonl is always written."
    )
    log_project: str = _f("mlsae-cache", "Project name for --log-to.")
    prefetch: int = _f(0, "Chunk reads in flight; 0 = chosen for the cache's store (8 from a disk, 16 from a bucket).")
    local_cache: str = _f(
        "", "Folder for a verified local copy of a remote cache (later epochs read from local disk); '' = none."
    )
    out: str = _f("", "Run folder; default runs/<cache name>-<layers>-x<expansion>-k<k>.")

    @classmethod
    def from_yaml(cls, path: str | Path) -> "TrainConfig":
        return cls().replace(**upgrade(read_yaml_mapping(path, cls._what, cls._yaml_flag)))

    def validate(self) -> "TrainConfig":
        self.check_types()
        for name in [
            "expansion_factor",
            "k",
            "batch_tokens",
            "k_aux",
            "round_chunks",
            "checkpoint_every",
            "log_every",
            "dead_tokens",
        ]:
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise SpecError(f"{name} = {v!r} must be a positive integer")
        if not isinstance(self.prefetch, int) or isinstance(self.prefetch, bool) or self.prefetch < 0:
            raise SpecError(f"prefetch = {self.prefetch!r} must be 0 (chosen for the store) or a positive integer")
        if self.tokens < 0 or self.eval_tokens < 0 or self.warmup_steps < 0 or self.eval_every < 0:
            raise SpecError("tokens, eval_tokens, eval_every and warmup_steps must be >= 0")
        if not self.lr > 0:
            raise SpecError(f"lr = {self.lr} must be a positive number (e.g. 1e-4)")
        if not self.aux_coef >= 0:
            raise SpecError(f"aux_coef = {self.aux_coef} must be >= 0 (0 turns AuxK off; default 1/32)")
        self.snapshot_list()
        if self.layers != "all":
            try:
                int(self.layers)
            except ValueError:
                raise SpecError(f"layers = {self.layers!r}: use 'all' (multi-layer SAE) or one layer number")
        return self

    def snapshot_list(self) -> list[int]:
        """The training-token counts of `snapshot_tokens`, sorted."""
        try:
            points = sorted({int(t) for t in str(self.snapshot_tokens).replace(" ", "").split(",") if t})
        except ValueError:
            points = [0]
        if any(t <= 0 for t in points):
            raise SpecError(
                f"snapshot_tokens = {self.snapshot_tokens!r}: give positive token counts, e.g. 262144,524288"
            )
        return points

    def layer_list(self, cached: tuple[int, ...]) -> list[int]:
        if self.layers == "all":
            return list(cached)
        layer = int(self.layers)
        if layer not in cached:
            raise SpecError(f"layer {layer} is not in the cache (it holds layers {list(cached)}): choose one of those")
        return [layer]

    def default_out(self) -> str:
        name = Path(self.cache).name
        tag = "mlsae" if self.layers == "all" else f"layer{self.layers}"
        return str(Path("runs") / f"{name}-{tag}-x{self.expansion_factor}-k{self.k}")

    def hyperparameters(self) -> dict[str, Any]:
        return {k: v for k, v in self.to_dict().items() if k not in RUNTIME_FIELDS}


def upgrade(fields_: dict[str, Any]) -> dict[str, Any]:
    """Fields of older configs and run records in today's names: `include_special: true` fed the real
    special-token vectors (include-real); false followed the cache's keep mask (cache)."""
    out = dict(fields_)
    if "include_special" in out:
        legacy = out.pop("include_special")
        if not isinstance(legacy, bool):
            raise SpecError(f"include_special = {legacy!r} must be true or false (or use special_tokens)")
        out.setdefault("special_tokens", "include-real" if legacy is True else "cache")
    return out


def config_fields() -> list[dataclasses.Field]:
    return list(fields(TrainConfig))
