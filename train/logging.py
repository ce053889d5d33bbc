"""Where training metrics go: metrics.jsonl always (the source of truth), wandb or trackio optionally.

A sink has three methods: `step(StepMetrics)`, `evaluation(step, tokens, held_out)` and `close()`.
Another logger is one more sink class here. The experiment trackers get the key names SAELens users
know (losses/overall_loss, metrics/explained_variance, metrics/l0, sparsity/dead_features,
details/current_learning_rate), plus our per-layer FVU and the held-out evaluations under heldout/.
They are imported only when asked for; a missing package, or a tracker that cannot start (offline
without its offline mode), is one line before any training.
"""

from __future__ import annotations

import hashlib
import importlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Protocol

from harvest.atomic import open_log
from harvest.errors import UserError
from train.record import METRICS, short_error

LOG_TO = ("none", "wandb", "trackio")


class LoggerError(UserError):
    """An experiment tracker is not installed or cannot start."""


@dataclass
class StepMetrics:
    """One logged training step of one SAE (minibatch numbers, averaged over ranks)."""

    step: int
    tokens: int  # training tokens seen after this step
    loss: float  # mean over layers of the minibatch FVU + aux_coef * AuxK
    fvu: float  # mean over layers of the minibatch FVU
    fvu_per_layer: list[float]
    auxk: float
    l0: float  # latents firing (> 1e-3) per vector
    dead_fraction: float  # latents dead for dead_tokens training tokens (AuxK's set)
    dead_latents: int
    lr: float
    tokens_per_s: float


def saelens_keys(m: StepMetrics, layers: list[int]) -> dict[str, float]:
    """A step under SAELens's names (explained variance = 1 - FVU), and ours."""
    keys = {
        "losses/overall_loss": m.loss,
        "losses/auxk": m.auxk,
        "metrics/explained_variance": 1.0 - m.fvu,
        "metrics/fvu": m.fvu,
        "metrics/l0": m.l0,
        "sparsity/dead_features": m.dead_latents,
        "sparsity/dead_fraction": m.dead_fraction,
        "details/current_learning_rate": m.lr,
        "details/n_training_tokens": m.tokens,
        "details/tokens_per_s": m.tokens_per_s,
    }
    keys.update({f"metrics/fvu_layer_{l}": v for l, v in zip(layers, m.fvu_per_layer)})
    return keys


def heldout_keys(held_out: dict[str, Any]) -> dict[str, float]:
    keys = {
        "heldout/fvu_mean": held_out["fvu_mean"],
        "heldout/fvu_feature_mean": held_out["fvu_feature_mean"],
        "heldout/explained_variance": 1.0 - held_out["fvu_mean"],
        "heldout/silent_fraction": held_out["silent_on_heldout_all_layers"],
    }
    keys.update({f"heldout/fvu_layer_{l}": v for l, v in zip(held_out["layers"], held_out["fvu"])})
    return keys


class Sink(Protocol):
    def step(self, m: StepMetrics) -> None: ...
    def evaluation(self, step: int, tokens: int, held_out: dict[str, Any]) -> None: ...
    def close(self) -> None: ...


class JsonlSink:
    """metrics.jsonl: one line per logged step, one per held-out evaluation (key "held_out")."""

    def __init__(self, folder: Path, fresh: bool):
        self.path = folder / METRICS
        self.file = open_log(self.path, fresh)

    def _write(self, obj: dict[str, Any]) -> None:
        self.file.write(json.dumps(obj) + "\n")
        self.file.flush()

    def step(self, m: StepMetrics) -> None:
        self._write(asdict(m))

    def evaluation(self, step: int, tokens: int, held_out: dict[str, Any]) -> None:
        self._write({"step": step, "tokens": tokens, "held_out": held_out})

    def close(self) -> None:
        self.file.close()


class TrackerSink:
    """An experiment tracker's run (`self.run` has wandb's and trackio's `log(dict, step=)` and `finish()`)."""

    run: Any
    layers: list[int]

    def step(self, m: StepMetrics) -> None:
        self.run.log(saelens_keys(m, self.layers), step=m.step)

    def evaluation(self, step: int, tokens: int, held_out: dict[str, Any]) -> None:
        self.run.log(heldout_keys(held_out), step=step)

    def close(self) -> None:
        self.run.finish()


def _start(package: str, init: Callable[[Any], Any], fix: str) -> Any:
    """Import the tracker lazily and start its run; one line (LoggerError) if either fails."""
    try:
        module = importlib.import_module(package)
    except ImportError:
        raise LoggerError(f"--log-to {package} needs the {package} package: pip install {package} (or drop --log-to)")
    try:
        return init(module)
    except Exception as e:
        raise LoggerError(f"{package} could not start ({short_error(e)}): {fix}")


class WandbSink(TrackerSink):
    def __init__(self, folder: Path, name: str, project: str, config: dict[str, Any], layers: list[int]):
        self.layers = layers
        self.run = _start(  # the same run folder resumes the same wandb run
            "wandb",
            lambda wandb: wandb.init(
                project=project, name=name, id=_run_id(folder), resume="allow", dir=str(folder), config=config
            ),
            "run `wandb login`, or set WANDB_MODE=offline to log into the run folder, or drop --log-to",
        )


class TrackioSink(TrackerSink):
    def __init__(self, folder: Path, name: str, project: str, config: dict[str, Any], layers: list[int]):
        self.layers = layers
        self.run = _start(
            "trackio",
            lambda trackio: trackio.init(
                project=project,
                name=name,
                config=config,
                resume="allow",
                embed=False,
                auto_log_cpu=False,
                auto_log_gpu=False,
            ),
            "drop --log-to, or fix its setup",
        )


def _run_id(folder: Path) -> str:
    return hashlib.sha256(str(folder.resolve()).encode()).hexdigest()[:16]


class RunLogger:
    """Every sink of one run; metrics.jsonl first."""

    def __init__(self, sinks: list[Sink]):
        self.sinks = sinks

    def step(self, m: StepMetrics) -> None:
        for s in self.sinks:
            s.step(m)

    def evaluation(self, step: int, tokens: int, held_out: dict[str, Any]) -> None:
        for s in self.sinks:
            s.evaluation(step, tokens, held_out)

    def close(self) -> None:
        for s in self.sinks:
            s.close()


def open_logger(
    folder: Path, fresh: bool, log_to: str, project: str, config: dict[str, Any], layers: list[int]
) -> RunLogger:
    """The run's logger: metrics.jsonl (emptied when `fresh`), plus the tracker `log_to` names."""
    sinks: list[Sink] = []
    if log_to == "wandb":
        sinks.append(WandbSink(folder, folder.name, project, config, layers))
    elif log_to == "trackio":
        sinks.append(TrackioSink(folder, folder.name, project, config, layers))
    return RunLogger([JsonlSink(folder, fresh), *sinks])
