"""The held-out set of a run: which tokens of the cache are never trained on (method.md Sec. 3).

A held-out set is a set of whole context windows (the values of the cache's `seq` array). The cache
shuffles tokens within each write block, so a window's tokens are spread over every chunk of its block:
a token is held out when its `seq` is one of the held-out windows, wherever it lies, and training drops
those positions from the chunks it reads anyway (nothing is read twice).

Runs trained before this existed held out the cache's last chunks ("legacy-chunks"): every token of those
chunks, whatever its window. Such records still load; their held-out set is described by its chunks.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor

HeldOutMethod = Literal["windows", "documents", "legacy-chunks"]
METHODS: tuple[str, ...] = ("windows", "documents", "legacy-chunks")


@dataclass
class HeldOut:
    method: HeldOutMethod  # "documents": whole windows chosen as runs of one document's windows
    seed: int
    windows: list[int]  # held-out context windows (values of the cache's `seq`), sorted; [] for legacy-chunks
    n_tokens: int  # cache positions held out (special tokens included)
    chunks: list[int] = field(default_factory=list)  # the cache chunks holding held-out tokens: all an evaluation reads

    def __post_init__(self) -> None:
        self.windows = sorted(int(w) for w in self.windows)
        self.chunks = sorted(int(c) for c in self.chunks)
        self._table: Tensor | None = None  # the windows as a tensor, for `mask` (not a field: not saved)

    @classmethod
    def legacy(cls, chunks: list[int], n_tokens: int) -> HeldOut:
        """The split of runs trained before held-out windows: every token of the cache's last chunks."""
        return cls("legacy-chunks", 0, [], n_tokens, list(chunks))

    @property
    def is_legacy(self) -> bool:
        return self.method == "legacy-chunks"

    def mask(self, seq: Tensor) -> Tensor:
        """[n] bool: True where a token (by its window, `seq`) is held out. Legacy-chunks sets are chunks,
        not windows: every token of `self.chunks` is held out, so read only those chunks and mask nothing."""
        if self.is_legacy:
            return torch.ones(seq.shape, dtype=torch.bool, device=seq.device)
        if self._table is None or self._table.device != seq.device:
            self._table = torch.tensor(self.windows, dtype=torch.int64, device=seq.device)
        return torch.isin(seq.to(torch.int64), self._table)

    def describe(self) -> str:
        if self.is_legacy:
            return f"the cache's last {len(self.chunks)} chunks (legacy split: their windows were partly trained on)"
        what = "whole windows grouped by document" if self.method == "documents" else "whole windows"
        return f"{len(self.windows)} {what} ({self.n_tokens:,} tokens, seed {self.seed})"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> HeldOut:
        if d.get("method") not in METHODS:
            raise ValueError(f"held-out method {d.get('method')!r} is not one of {', '.join(METHODS)}")
        return cls(
            d["method"],
            int(d["seed"]),
            list(d["windows"]),
            int(d["n_tokens"]),
            list(d.get("chunks", [])),
        )
