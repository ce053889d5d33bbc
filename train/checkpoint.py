"""The resumable state of one SAE of a training pass, in one structure (checkpoint.pt).

Only tensors and plain containers (ints, floats, strings, lists, dicts), so that it loads with
`torch.load(weights_only=True)`: a checkpoint.pt planted in a shared runs/ folder cannot run code, it is
refused in one line. Written atomically (harvest/atomic.py): a kill or a full disk leaves the previous
checkpoint and no temporary file.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from harvest.atomic import atomic_write
from harvest.errors import StorageError
from train.record import CHECKPOINT, RunError, short_error


@dataclass
class Checkpoint:
    step: int  # optimizer steps done
    sae: dict[str, Tensor]  # TopKSae.state_dict()
    opt: dict[str, Any]  # Adam's state_dict (tensors, numbers, lists)
    dead: dict[str, Tensor]  # DeadLatents.state_dict()
    stream: list[dict[str, Any]]  # every rank's StreamState (train/data.py), in rank order
    fvu_initial: dict[str, Any] | None  # the held-out metrics before training (EvalResult.to_dict())
    run: dict[str, Any] | None = None  # RunRecord.binding() of the run that wrote it (None: older checkpoints)

    def save(self, folder: Path) -> None:
        state = {f.name: getattr(self, f.name) for f in fields(self)}
        try:
            atomic_write(folder / CHECKPOINT, lambda tmp: torch.save(state, tmp))
        except (OSError, RuntimeError) as e:  # torch reports a full disk as RuntimeError ("unexpected pos")
            raise StorageError(
                f"could not write {folder / CHECKPOINT} ({short_error(e)}): free disk space (or fix the folder's "
                f"permissions) and rerun the same command to resume from the previous checkpoint"
            )

    @classmethod
    def load(cls, folder: Path, device: str) -> Checkpoint | None:
        """The checkpoint in `folder`, or None when there is none; RunError when it is not a plain one."""
        path = folder / CHECKPOINT
        if path.is_symlink():
            raise RunError(f"{path} is a symbolic link, not a checkpoint written here: remove it and rerun")
        if not path.is_file():
            return None
        try:
            state = torch.load(path, map_location=device, weights_only=True)
            ck = cls(**{f.name: state[f.name] if f.name != "run" else state.get("run") for f in fields(cls)})
            if not isinstance(ck.step, int) or not isinstance(ck.stream, list):
                raise TypeError("step or stream of the wrong type")
            if ck.run is not None and not isinstance(ck.run, dict):
                raise TypeError("run of the wrong type")
        except Exception as e:  # a pickle with code in it, a truncated file, another program's file
            raise RunError(
                f"{path} is not a checkpoint of `train run` ({short_error(e)}): delete it to restart this run "
                f"from scratch (its config.json stays), or restore it"
            )
        return ck
