"""The run folder's contract: `RunRecord` (config.json), written by `train`, read by every analysis.

A run folder holds
    config.json        THIS record: hyperparameters, the SAE's shape, the cache it was trained on, the
                       held-out set, the special-token mode, the step count, library versions
    sae.safetensors    the weights, sae_config.json their shape (train/sae.py)
    metrics.jsonl      one line per logged step; summary.json at the end (held-out metrics)
    checkpoint.pt      resumable training state

`load_run` is THE loader: every reader goes through it, and every problem with a folder is one
`RunError` line. Folders written before this record had a version (format 1: `eval_chunks`, no
`heldout`, `include_special`) still load; their held-out set is the legacy chunk split.

From format 3 on, a run folder is bound to its weights both ways: config.json holds the sha256 of
sae.safetensors (a changed or swapped file is refused), and the weights carry in their safetensors metadata
what the record said when they were written (`binding`: the SAE config, layers, held-out set, special-token
mode, cache fingerprint, steps, hyperparameters), so an edit of the JSON files, however consistent, is
refused too. Folders of formats 1 and 2 predate this: they load with a warning line.
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from harvest.atomic import atomic_write_json
from harvest.errors import UserError
from train.config import TrainConfig, upgrade
from train.sae import CONFIG_FILE, RUN_KEY, WEIGHTS_FILE, SaeConfig, TopKSae, weights_metadata
from train.split import HeldOut

RUN_FORMAT = "mlsae-run"
RUN_FORMAT_VERSION = 3  # 1: the unversioned config.json of the first releases; 2: before weights were bound
CONFIG = "config.json"
SUMMARY = "summary.json"
METRICS = "metrics.jsonl"
CHECKPOINT = "checkpoint.pt"


_WARNED: set[Path] = set()  # run folders of an older format this process already warned about (once each)


class RunError(UserError):
    """A run folder is missing, unfinished, corrupt, or does not match the other runs or the cache."""


@dataclass
class CacheRef:
    """The cache a run was trained on, as recorded at training time."""

    path: str  # where it was opened from: an absolute path or a URL (s3://, gs://, az://)
    fingerprint: str
    model: str | None = None
    dataset: str | None = None
    hook: str | None = None
    lens: dict[str, Any] | None = None  # the tuned lens the vectors went through (harvest's record), or None
    dtype: str | None = None
    n_tokens: int | None = None
    model_identity: dict[str, Any] | None = None  # the harvest's model identity (train/inputs.py compares it)

    @classmethod
    def of(cls, cache: Any) -> CacheRef:
        meta = cache.meta
        return cls(
            path=str(cache.location),  # an absolute path or a URL
            fingerprint=cache.fingerprint,
            model=meta["model"]["name"],
            dataset=meta["spec"]["dataset"],
            hook=meta["spec"]["hook"],
            lens=cache.lens_record,
            dtype=cache.layout.dtype,
            n_tokens=cache.layout.n_tokens,
            model_identity=json.loads(json.dumps(meta["model"].get("identity") or None)),
        )


@dataclass
class RunRecord:
    dir: Path  # the run folder (where the record was read from or is written to; not stored)
    train: TrainConfig  # every flag of the run (train/config.py)
    sae: SaeConfig
    layers: list[int]  # model layers the SAE was trained on, in the order of its metrics
    cache: CacheRef
    heldout: HeldOut  # the tokens never trained on: every held-out number uses exactly these
    special_tokens: str  # exclude | reference | include-real, or "cache" (old runs: follow the cache's keep mask)
    steps: int
    lr_effective: float
    world_size: int
    versions: dict[str, str]
    weights_sha256: str | None = None  # of sae.safetensors, once training wrote it (format 3 on)
    format_version: int = RUN_FORMAT_VERSION  # of the config.json it was read from

    # -- what a reader asks ----------------------------------------------------------------------
    @property
    def multi_layer(self) -> bool:
        return len(self.layers) > 1

    def label(self) -> str:
        """'MLSAE' for a multi-layer run, 'L<l>' for a single-layer SAE trained on layer l."""
        return "MLSAE" if self.multi_layer else f"L{self.layers[0]}"

    @property
    def has_sae(self) -> bool:
        return (self.dir / WEIGHTS_FILE).is_file() and (self.dir / CONFIG_FILE).is_file()

    @property
    def finished(self) -> bool:
        """Training completed: the weights and summary.json are written."""
        return self.has_sae and (self.dir / SUMMARY).is_file()

    def load_sae(self, device: str = "cpu") -> TopKSae:
        """The trained SAE; one RunError line when its files are missing, corrupt or not this run's."""
        if not self.has_sae:
            raise RunError(
                f"{self.dir} holds no trained SAE ({WEIGHTS_FILE} + {CONFIG_FILE}): let `train run` finish "
                f"(rerun it to resume), or pass a finished run folder"
            )
        bound = self._check_weights()
        try:
            sae = TopKSae.load(self.dir, device)
        except Exception as e:  # any parse failure of a file we did not just write is the user's to fix
            raise RunError(
                f"{self.dir}: {WEIGHTS_FILE} or {CONFIG_FILE} is unreadable ({short_error(e)}): restore them or retrain"
            )
        if bound is not None and bound != self.binding():
            mine = self.binding()
            diff = sorted(k for k in set(mine) | set(bound) if mine.get(k) != bound.get(k))
            raise RunError(
                f"{self.dir / CONFIG}'s {', '.join(diff)} differ from what {WEIGHTS_FILE} was trained with "
                f"(the record was edited or belongs to another run): restore config.json, or retrain"
            )
        if sae.cfg != self.sae:
            raise RunError(
                f"{self.dir / CONFIG_FILE} ({sae.cfg}) does not match the SAE in {CONFIG} ({self.sae}): "
                f"the folder mixes two runs; retrain into a fresh --out"
            )
        return sae

    def binding(self) -> dict[str, Any]:
        """What the weights are bound to (stored in their metadata, compared on every load): everything of
        the record that changes what the weights mean, but not where the cache lives now (it may move)."""
        train = {k: v for k, v in self.train.hyperparameters().items() if k != "cache"}
        return json.loads(
            json.dumps(
                {
                    "sae": asdict(self.sae),
                    "layers": list(self.layers),
                    "heldout": self.heldout.to_dict(),
                    "special_tokens": self.special_tokens,
                    "cache_fingerprint": self.cache.fingerprint,
                    "steps": self.steps,
                    "lr_effective": self.lr_effective,
                    "train": train,
                },
                sort_keys=True,
            )
        )

    def save_with_weights(self, sae: TopKSae) -> None:
        """Write the SAE (carrying `binding()`), then config.json with the weights' sha256: the two files
        bound to each other. (Killed in between, the record lacks the hash: the run resumes and rewrites both.)"""
        from harvest.models import file_sha256

        sae.save(self.dir, run=self.binding())
        self.weights_sha256 = file_sha256(self.dir / WEIGHTS_FILE)
        self.save()

    def _check_weights(self) -> dict[str, Any] | None:
        """The binding stored in the weights (None for folders of formats 1-2, with a warning line), after
        checking the weights' sha256 against the record's."""
        weights = self.dir / WEIGHTS_FILE
        if self.format_version < 3:
            if self.dir in _WARNED:
                return None
            _WARNED.add(self.dir)
            print(
                f"warning: {self.dir} is a run folder of format {self.format_version}, written before weights "
                f"were bound to their record: {WEIGHTS_FILE} is not checked against {CONFIG} (retrain to bind them)",
                file=sys.stderr,
            )
            return None
        if self.weights_sha256 is None:
            raise RunError(
                f"{self.dir / CONFIG} records no sha256 of {WEIGHTS_FILE} (training stopped while writing it): "
                f"rerun the same `train run` to finish it"
            )
        from harvest.models import file_sha256

        if file_sha256(weights) != self.weights_sha256:
            raise RunError(
                f"{weights} is not the file this run wrote (its sha256 differs from the one in {CONFIG}): restore "
                f"it, or retrain"
            )
        try:
            raw = weights_metadata(self.dir).get(RUN_KEY)
            bound = json.loads(raw) if raw is not None else None
        except Exception as e:
            raise RunError(f"{weights} is unreadable ({short_error(e)}): restore it, or retrain")
        if not isinstance(bound, dict):
            raise RunError(f"{weights} does not say which run wrote it (no {RUN_KEY} metadata): restore it, or retrain")
        return bound

    def summary(self) -> dict[str, Any] | None:
        """summary.json (written when training finished), or None before that."""
        path = self.dir / SUMMARY
        if not path.is_file():
            return None
        return _read_json(path)

    # -- writing -----------------------------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        return {
            "format": RUN_FORMAT,
            "format_version": RUN_FORMAT_VERSION,
            "train": self.train.to_dict(),
            "sae": asdict(self.sae),
            "layers": list(self.layers),
            "cache": asdict(self.cache),
            "heldout": self.heldout.to_dict(),
            "special_tokens": self.special_tokens,
            "steps": self.steps,
            "lr_effective": self.lr_effective,
            "world_size": self.world_size,
            "versions": dict(self.versions),
            "weights_sha256": self.weights_sha256,
        }

    def save(self, folder: str | Path | None = None) -> Path:
        """Write config.json atomically into `folder` (default: self.dir); returns its path."""
        folder = Path(folder) if folder is not None else self.dir
        atomic_write_json(folder / CONFIG, self.to_json())
        return folder / CONFIG

    @classmethod
    def from_json(cls, d: dict[str, Any], folder: str | Path) -> RunRecord:
        """A record from config.json's content (either format); ValueError/KeyError/TypeError if malformed."""
        version = d.get("format_version", 1)
        if not isinstance(version, int) or isinstance(version, bool) or version < 1:
            raise ValueError(f"format version {version!r} is not a positive integer")
        if version > RUN_FORMAT_VERSION:
            raise ValueError(f"format version {version} is newer than this code's {RUN_FORMAT_VERSION}")
        known = {f.name for f in fields(TrainConfig)}
        train = TrainConfig().replace(**{k: v for k, v in upgrade(d["train"]).items() if k in known})
        if version == 1:  # the unversioned first format
            heldout = HeldOut.legacy(list(d["eval_chunks"]), 0)
            special = train.special_tokens
        else:
            heldout = HeldOut.from_dict(d["heldout"])
            special = str(d["special_tokens"])
        cache_keys = {f.name for f in fields(CacheRef)}
        return cls(
            dir=Path(folder),
            train=train,
            sae=SaeConfig.from_dict(d["sae"]),
            layers=[int(l) for l in d["layers"]],
            cache=CacheRef(**{k: v for k, v in d["cache"].items() if k in cache_keys}),
            heldout=heldout,
            special_tokens=special,
            steps=int(d["steps"]),
            lr_effective=float(d["lr_effective"]),
            world_size=int(d.get("world_size", 1)),
            versions=dict(d.get("versions", {})),
            weights_sha256=_sha256_field(d.get("weights_sha256")) if version >= 3 else None,
            format_version=version,
        )


def _sha256_field(value: Any) -> str | None:
    if value is None or (isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value)):
        return value
    raise ValueError(f"weights_sha256 {str(value)[:80]!r} is not a sha256 hex digest")


def short_error(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:160]}" if text else type(e).__name__


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RunError(f"{path} is unreadable or not valid JSON ({short_error(e)}): restore it or retrain the run")


def read_record(path: str | Path) -> RunRecord | None:
    """The record of a run folder, or None when `path` holds no config.json; RunError when it is corrupt."""
    folder = Path(path)
    if folder.exists() and not folder.is_dir():
        raise RunError(f"{folder} is a file, not a run folder: pass the --out folder of `train run`")
    cfg = folder / CONFIG
    if not cfg.is_file():
        return None
    d = _read_json(cfg)
    if not isinstance(d, dict) or d.get("format", RUN_FORMAT) != RUN_FORMAT:
        raise RunError(f"{cfg} is not a training run's record: pass the --out folder of `train run`")
    try:
        return RunRecord.from_json(d, folder)
    except (KeyError, ValueError, TypeError, UserError) as e:
        what = f"lacks {e}" if isinstance(e, KeyError) else f"is invalid ({short_error(e)})"
        raise RunError(f"{cfg} {what}: restore it, or retrain into a fresh --out")


def load_run(path: str | Path, require_sae: bool = True) -> RunRecord:
    """THE loader of a run folder: its record, checked to hold a trained SAE (unless `require_sae` is False)."""
    record = read_record(path)
    if record is None:
        raise RunError(
            f"{path} is not a training run (no {CONFIG}): pass the --out folder of `train run` (or `train sweep`)"
        )
    if require_sae and not record.has_sae:
        raise RunError(
            f"{path} is not a finished training run (needs {WEIGHTS_FILE} and {CONFIG_FILE}): let `train run` "
            f"finish (rerun it to resume), or pass a finished run folder"
        )
    return record
