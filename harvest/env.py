"""The process environment: torchrun ranks (one Dist object per process) and library versions."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable, TypeVar

import torch

from .errors import UserError

T = TypeVar("T")


@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1

    @classmethod
    def init(cls) -> "Dist":
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world == 1:
            return cls()
        import torch.distributed as dist

        if not dist.is_initialized():
            backend = "nccl" if torch.cuda.is_available() else "gloo"
            if backend == "nccl":  # object collectives and barriers use the current device: one GPU per rank
                torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
            dist.init_process_group(backend, timeout=timedelta(hours=4))  # rank 0 may tokenize for a long time
        return cls(dist.get_rank(), dist.get_world_size())

    def run_on_rank0(self, fn: Callable[[], T]) -> T | None:
        """fn() on rank 0 only, its result returned there (None on the other ranks, which wait and re-raise
        its user error, if any)."""
        err: list[Any] = [None]
        result = None
        if self.rank == 0:
            try:
                result = fn()
            except UserError as e:
                err[0] = str(e)
                if self.world_size == 1:
                    raise
            except BaseException:
                err[0] = "rank 0 failed (see its traceback)"
                if self.world_size == 1:
                    raise
                self._broadcast(err)
                raise
        if self.world_size > 1:
            self._broadcast(err)
            if err[0] is not None:
                raise UserError(err[0])
        return result

    def _broadcast(self, obj: list[Any]) -> None:
        import torch.distributed as dist

        dist.broadcast_object_list(obj, src=0)

    def barrier(self) -> None:
        if self.world_size > 1:
            import torch.distributed as dist

            dist.barrier()

    def close(self) -> None:
        if self.world_size > 1:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()


def library_versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"python": sys.version.split()[0]}
    for pkg in ["torch", "transformers", "transformer-lens", "zarr", "numcodecs", "datasets", "mlsae-cache"]:
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out
