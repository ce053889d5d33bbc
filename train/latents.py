"""Streaming latents: the SAE's TopK codes of a cache's tokens, chunk by chunk, never the whole set at once.

`iter_latents` reads whole chunks (all requested layers of `chunk_tokens` cache positions) with the
fast `ChunkReader`, keeps the tokens that count (the `keep` mask, unless special tokens are included;
optionally only those a `select(seq)` filter accepts, e.g. the held-out windows), encodes them in
sub-batches of `rows` tokens x L layers and yields one `LatentBatch` per sub-batch with where each
token came from. No model forward is needed: token ids and windows are in the cache.

Consumers: `analyze examples` (max-activating examples), `train export --format delphi` (the delphi
latent cache). Every chunk ends with a batch flagged `last_of_chunk` (possibly with no tokens), so a
consumer can checkpoint between chunks and resume with `skip`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import torch
from torch import Tensor

from harvest import Cache, ChunkReader
from train.special import SpecialTokens


@dataclass
class LatentBatch:
    values: Tensor  # [L, n, k] float32 post-ReLU TopK activations, on the encoding device
    indices: Tensor  # [L, n, k] int64 latent ids
    token_ids: Tensor  # [n] int64 (same device)
    seq: Tensor  # [n] int64: context window (row of the cache's `windows`)
    pos: Tensor  # [n] int64: position inside that window
    chunk: int  # the cache chunk these tokens come from
    last_of_chunk: bool  # no more batches of this chunk follow (a safe point to checkpoint)

    @property
    def n(self) -> int:
        return self.values.shape[1]


def chunk_order(cache: Cache, chunks: Sequence[int] | None, seed: int, rank: int, world_size: int) -> list[int]:
    """This rank's chunks in reading order: one seeded permutation of `chunks` (default: every complete
    chunk), split round-robin over ranks (the ChunkReader's order)."""
    reader = ChunkReader(cache, chunks=chunks, seed=seed, rank=rank, world_size=world_size, prefetch=1, layers=[])
    return [int(c) for c in reader.order(0)]


@torch.no_grad()
def iter_latents(
    sae: torch.nn.Module,
    cache: Cache,
    layers: Sequence[int],
    chunks: Sequence[int] | None = None,
    *,
    tokens: int | None = None,
    rows: int = 4096,
    device: str = "cpu",
    special: SpecialTokens | None = None,
    select: Callable[[Tensor], Tensor] | None = None,
    seed: int = 0,
    rank: int = 0,
    world_size: int = 1,
    skip: int = 0,
    prefetch: int | None = None,
) -> Iterator[LatentBatch]:
    """TopK codes of up to `tokens` tokens (default: all) of this rank's chunks, chunk by chunk.

    Tokens are taken in the reader's seeded chunk order (`chunk_order`), within a chunk in cache order;
    `skip` leaves out the first `skip` chunks of that order (a resumed pass; `tokens` is then what is
    left of the budget). `special` (the run's `SpecialTokens`) decides which tokens count and what their
    vectors are (zeros in `reference` mode); without it, the cache's `keep` mask. `select(seq) -> bool
    mask` restricts to some windows (e.g. `HeldOut.mask`)."""
    order = chunk_order(cache, chunks, seed, rank, world_size)[skip:]
    if not order or (tokens is not None and tokens <= 0):
        return
    reader = ChunkReader(cache, layers=layers, chunks=order, prefetch=prefetch, pin_memory=device.startswith("cuda"))
    done = 0
    for chunk in reader.iter_chunks(order):
        mask = chunk.keep.clone() if special is None else special.usable(chunk.keep, chunk.token_ids)
        if select is not None:
            mask &= select(chunk.seq.long())
        idx = mask.nonzero().squeeze(1)
        if tokens is not None:
            idx = idx[: tokens - done]
        # a copy out of the reader's reusable buffer (on a GPU: the whole chunk moves, is indexed and decoded there)
        x_all = chunk.vectors(idx, device, non_blocking=True)
        if special is not None:
            x_all = special.vectors(x_all, chunk.token_ids[idx])  # zeros at special tokens in `reference` mode
        meta = [t[idx].long().to(device) for t in (chunk.token_ids, chunk.seq, chunk.pos)]
        n = len(idx)
        starts = list(range(0, n, rows)) or [0]
        for s in starts:
            values, indices = sae.encode(x_all[:, s : s + rows].float())
            yield LatentBatch(
                values,
                indices,
                *(t[s : s + rows] for t in meta),
                chunk=chunk.index,
                last_of_chunk=s == starts[-1],
            )
        done += n
        if tokens is not None and done >= tokens:
            return
