"""The held-out set of a run: which tokens of the cache are never trained on (docs/method.md Sec. 3).

A held-out set is a set of whole context windows (the values of the cache's `seq` array). The cache
shuffles tokens within each write block, so a window's tokens are spread over every chunk of its block:
a token is held out when its `seq` is one of the held-out windows, wherever it lies, and training drops
those positions from the chunks it reads anyway (nothing is read twice).

How the windows are chosen (`choose_heldout`), seeded:
  1. Blocks: the fewest write blocks that hold the requested number of windows, in a seeded order. A
     window's tokens never leave its block, so an evaluation reads those blocks only (about eval_tokens
     rounded up to one block), never the whole cache: periodic evaluation stays cheap at any cache size.
  2. Span: where the windows show document boundaries (the EOS that precedes every document), the
     held-out windows of a block are one run of consecutive windows, placed (seeded among the cheapest)
     where the fewest other windows share a document with it: usually the two windows at its ends,
     which hold the end of the previous document and the start of the next. Without documents (no EOS
     id, or one document), seeded single windows ("windows").
  3. Guards: every other window that holds a token of a document with a token in a held-out window is
     excluded from training (`excluded_windows`), so held-out text and training text never share a
     document: the held-out set is document-disjoint. Documents are rebuilt from the cache's `windows`
     array as the harvest joined them: the windows' text tokens in order, a new document at each EOS (a
     prepended BOS column is not text). Guard windows are neither trained on nor evaluated; their cost is
     `guard_tokens`, logged by `train` and written to summary.json.

Runs trained before spans held out runs of one document's windows ("documents"), or single windows;
runs trained before held-out windows held out the cache's last chunks ("legacy-chunks"): every token of those
chunks, whatever its window. Such records still load; their held-out set is described by its chunks.
Runs trained before guards have no `excluded_windows` (loaded as []): their held-out windows share
documents with training windows at the runs' ends, and `describe` says so.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

from harvest import Cache
from harvest.errors import CacheError

HeldOutMethod = Literal["span", "windows", "documents", "legacy-chunks"]
METHODS: tuple[str, ...] = ("span", "windows", "documents", "legacy-chunks")


@dataclass
class HeldOut:
    # "span": consecutive windows, cheapest to guard; "documents" (runs before guards): runs of one
    # document's windows; "windows": seeded single windows
    method: HeldOutMethod
    seed: int
    windows: list[int]  # held-out context windows (values of the cache's `seq`), sorted; [] for legacy-chunks
    n_tokens: int  # cache positions held out (special tokens included)
    chunks: list[int] = field(default_factory=list)  # the cache chunks holding held-out tokens: all an evaluation reads
    # guards: windows sharing a document with a held-out window, never trained on nor evaluated (sorted)
    excluded_windows: list[int] = field(default_factory=list)
    # "documents": guards computed; "" for runs trained before guards; "skipped: <why>" where they could not be
    guards: str = ""

    def __post_init__(self) -> None:
        self.windows = sorted(int(w) for w in self.windows)
        self.chunks = sorted(int(c) for c in self.chunks)
        self.excluded_windows = sorted(int(w) for w in self.excluded_windows)
        # the windows as tensors, for `mask` and `training_mask` (not fields: not saved)
        self._tables: dict[str, Tensor] = {}

    @classmethod
    def legacy(cls, chunks: list[int], n_tokens: int) -> HeldOut:
        """The split of runs trained before held-out windows: every token of the cache's last chunks."""
        return cls("legacy-chunks", 0, [], n_tokens, list(chunks))

    @property
    def is_legacy(self) -> bool:
        return self.method == "legacy-chunks"

    def _in(self, name: str, windows: list[int], seq: Tensor) -> Tensor:
        table = self._tables.get(name)
        if table is None or table.device != seq.device:
            table = self._tables[name] = torch.tensor(windows, dtype=torch.int64, device=seq.device)
        return torch.isin(seq.to(torch.int64), table)

    def mask(self, seq: Tensor) -> Tensor:
        """[n] bool: True where a token (by its window, `seq`) is held out, i.e. evaluated. Legacy-chunks
        sets are chunks, not windows: every token of `self.chunks` is held out, so read only those chunks
        and mask nothing."""
        if self.is_legacy:
            return torch.ones(seq.shape, dtype=torch.bool, device=seq.device)
        return self._in("held", self.windows, seq)

    def training_mask(self, seq: Tensor) -> Tensor:
        """[n] bool: True where a token (by its window) must not be trained on: held out or a guard."""
        return self._in("not_trained", self.windows + self.excluded_windows, seq)

    def describe(self) -> str:
        if self.is_legacy:
            return f"the cache's last {len(self.chunks)} chunks (legacy split: their windows were partly trained on)"
        what = {
            "span": "consecutive whole windows (a span of documents)",
            "documents": "whole windows grouped by document",
        }.get(self.method, "whole windows")
        text = f"{len(self.windows)} {what} ({self.n_tokens:,} tokens, seed {self.seed})"
        if not self.windows:
            return text
        if self.guards != "documents":
            why = self.guards or "trained before guards"
            return text + f"; NOT document-disjoint: held-out documents may also have training text ({why})"
        return (
            text
            + f"; document-disjoint: {len(self.excluded_windows)} guard windows sharing their documents not trained on"
        )

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
            list(d.get("excluded_windows", [])),  # absent in runs trained before guards
            str(d.get("guards", "")),
        )

    def positions(self, cache: Cache) -> np.ndarray:
        """The held-out cache positions, sorted (reads `seq` of the held-out chunks only)."""
        if self.is_legacy:
            ranges = [np.arange(*cache.layout.chunk_range(c)) for c in self.chunks]
            return np.concatenate(ranges) if ranges else np.zeros(0, np.int64)
        found = [np.zeros(0, np.int64)]
        wanted = np.asarray(self.windows, dtype=np.int64)
        for c in self.chunks:
            start, stop = cache.layout.chunk_range(c)
            seq = cache.read_tokens("seq", start, stop).numpy()
            found.append(start + np.flatnonzero(np.isin(seq, wanted)))
        return np.concatenate(found)

    def limited(self, tokens: int | None, cache: Cache) -> HeldOut:
        """The leading part of the set holding at least `tokens` cache positions (all of it for None):
        leading windows (their chunks recomputed), or for the legacy split leading whole chunks."""
        if tokens is None or tokens >= self.n_tokens > 0:
            return self
        if self.is_legacy:
            out, n = [], 0
            for c in self.chunks:
                if n >= tokens:
                    break
                start, stop = cache.layout.chunk_range(c)
                out.append(c)
                n += stop - start
            return HeldOut.legacy(out, n)
        windows = self.windows[: max(1, -(-tokens // cache.layout.context))]
        part = HeldOut(self.method, self.seed, windows, len(windows) * cache.layout.context)
        part.excluded_windows, part.guards = self.excluded_windows, self.guards  # training saw neither
        return _with_chunks(part, cache)


# ---------------------------------------------------------------------------------------------
# choosing the held-out windows


def document_ids(windows: np.ndarray, eos: int, first: int) -> np.ndarray:
    """[n_windows, context - first] the document of every text token of the windows (`first`: the first
    text column, 1 where a BOS is prepended to every window): the windows' text in order, a new document
    at each EOS (the harvest joins documents with an EOS before each one)."""
    text = windows[:, first:]
    return np.cumsum(text.reshape(-1) == eos).reshape(text.shape)


def guard_windows(windows: np.ndarray, held: np.ndarray, eos: int, first: int) -> np.ndarray:
    """The windows, other than `held`, holding a token of a document that has a token in a held-out
    window (sorted): what training must skip for held-out and training text to share no document."""
    docs = document_ids(windows, eos, first)
    touching = np.isin(docs, np.unique(docs[held])).any(1)
    touching[held] = False
    return np.flatnonzero(touching)


def cheapest_span(
    lo: np.ndarray, hi: np.ndarray, start: int, stop: int, n: int, rng: np.random.Generator
) -> np.ndarray:
    """n consecutive windows in [start, stop) whose guards cost few windows: a seeded choice among the
    spans costing at most two (its two end windows) or, where none does, the fewest. `lo`, `hi` [n_windows]:
    the first and last document of each window's text (both nondecreasing). A span's guards are the windows
    before it that reach its first document and the windows after it that reach back into its last one."""
    s = np.arange(start, stop - n + 1)
    e = s + n - 1
    left = s - np.searchsorted(hi, lo[s], side="left")  # windows before s whose text reaches document lo[s]
    right = np.searchsorted(lo, hi[e], side="right") - 1 - e  # windows after e starting in document <= hi[e]
    cost = left + right
    best = s[cost <= max(2, cost.min())]
    begin = int(rng.choice(best))
    return np.arange(begin, begin + n)


def choose_heldout(cache: Cache, eval_tokens: int, seed: int) -> HeldOut:
    """A seeded set of whole context windows holding about `eval_tokens` tokens (at most half the cache):
    where the windows show documents, a contiguous span per block placed where its guards cost least;
    see the module docstring."""
    layout, ctx = cache.layout, cache.layout.context
    n_windows = layout.n_sequences
    target = min(-(-min(eval_tokens, layout.n_tokens // 2) // ctx), n_windows - 1) if eval_tokens > 0 else 0
    if target <= 0:
        return HeldOut("windows", seed, [], 0, [], guards="documents")
    rng = np.random.default_rng([seed, 0x4E1D])
    blocks, candidates = [], np.zeros(0, np.int64)
    for b in rng.permutation(layout.n_blocks):
        start, stop = layout.block_range(int(b))
        blocks.append(int(b))
        candidates = np.concatenate([candidates, np.arange(start // ctx, stop // ctx)])
        if len(candidates) >= target:
            break
    candidates.sort()

    tok = cache.meta.get("tokenizer", {})
    all_windows = cache.windows().numpy()
    eos, first = int(tok.get("eos_token_id", -1)), int(bool(tok.get("prepend_bos")))
    docs = document_ids(all_windows, eos, first)
    if eos >= 0 and docs[-1, -1] > docs[0, 0]:  # documents show: one cheap span per block
        method, windows, left = "span", [], target
        for b in blocks:
            start, stop = layout.block_range(b)
            n = min(left, stop // ctx - start // ctx)
            windows.append(cheapest_span(docs[:, 0], docs[:, -1], start // ctx, stop // ctx, n, rng))
            left -= n
        windows = np.concatenate(windows)
    else:
        method, windows = "windows", rng.choice(candidates, target, replace=False)
    guards, how = guard_windows(all_windows, windows, eos, first), "documents"
    if eos < 0:
        guards, how = guards[:0], "skipped: the cache records no EOS id, so no document boundaries"
    elif 2 * len(guards) > n_windows - len(windows):
        # a few long documents (or text without EOS): guarding would leave less than half the training split
        guards, how = (
            guards[:0],
            f"skipped: guards would take {len(guards)} of {n_windows - len(windows)} training windows",
        )
    held = HeldOut(method, seed, windows.tolist(), len(windows) * ctx, [], guards.tolist(), how)
    return _with_chunks(held, cache)


def _with_chunks(held: HeldOut, cache: Cache) -> HeldOut:
    """`held` with `chunks` = the chunks that hold its windows' tokens. A window's tokens stay in its
    write block (the format's promise), so only those blocks' `seq` is read; the count of tokens found
    checks the promise."""
    layout, ctx = cache.layout, cache.layout.context
    blocks = sorted({w * ctx // layout.block_tokens for w in held.windows})
    chunks = [c for b in blocks for c in layout.chunks_of_block(b)]
    held.chunks = chunks
    found = held.positions(cache)
    if len(found) != held.n_tokens:
        raise CacheError(
            f"{cache.path}: the tokens of {len(held.windows)} windows are not all in their write blocks "
            f"({len(found)} of {held.n_tokens}): the cache is corrupt; run `harvest verify`"
        )
    held.chunks = np.unique(found // layout.chunk_tokens).tolist()
    return held
