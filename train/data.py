"""Cache -> shuffled minibatches on the training device, exactly resumable.

The stream is cut into rounds: round r of an epoch reads the next `round_chunks` chunks of this rank's
seeded chunk order (whole-chunk reads, several in flight), drops tokens whose `keep` is False and the
tokens of held-out windows (train/split.py: they are spread over the chunks of their block), adds the
tokens carried over from the previous round, permutes them on the device with a permutation seeded
by (seed, rank, epoch, round) and yields full minibatches; the remainder (< one batch) is carried on.
A round's state is therefore a few integers plus the carried cache positions, which is what a
checkpoint stores: a resume re-reads the round's chunks (and the carry's chunks) and skips the batches
already consumed, giving the same minibatches bit for bit. The stream never ends: epochs repeat.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Iterator, Sequence

import numpy as np
import torch

from harvest import Cache, ChunkReader
from harvest.reader import Chunk
from train.special import SpecialTokens
from train.split import HeldOut

KEEP_MASK = SpecialTokens("exclude", ())  # the cache's keep mask alone (no id is special)


@dataclass
class StreamState:
    epoch: int = 0
    round: int = 0
    batches_done: int = 0  # batches of the current round already consumed
    carry: list[int] = field(default_factory=list)  # cache positions carried INTO the current round

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Batch:
    acts: torch.Tensor  # [n_layers, batch_tokens, d] on the training device, cache dtype
    positions: torch.Tensor  # [batch_tokens] cache positions (int64, CPU)


def training_rows(chunk: Chunk, special: SpecialTokens, heldout: HeldOut | None) -> torch.Tensor:
    """Rows of a chunk to train on: the tokens the special-token mode uses, minus the tokens of held-out
    windows and of their guards (windows sharing a document with them)."""
    use = special.usable(chunk.keep, chunk.token_ids)
    if heldout is not None and heldout.windows:
        use &= ~heldout.training_mask(chunk.seq)
    return use.nonzero().squeeze(1)


def count_training_tokens(cache: Cache, special: SpecialTokens, heldout: HeldOut | None) -> int:
    """The tokens one epoch trains on (training_rows over the whole cache), from the token arrays alone."""
    return int(_trainable(cache, special, heldout).sum())


def count_guard_tokens(cache: Cache, special: SpecialTokens, heldout: HeldOut) -> int:
    """The tokens the held-out set's guard windows take from training (ones training would otherwise use)."""
    if not heldout.excluded_windows:
        return 0
    unguarded = HeldOut(heldout.method, heldout.seed, heldout.windows, heldout.n_tokens)
    return int(_trainable(cache, special, unguarded).sum()) - count_training_tokens(cache, special, heldout)


def _trainable(cache: Cache, special: SpecialTokens, heldout: HeldOut | None) -> torch.Tensor:
    use = special.usable(cache.read_tokens("keep"), cache.read_tokens("token_ids"))
    if heldout is not None and heldout.windows:
        use &= ~heldout.training_mask(cache.read_tokens("seq"))
    return use


class MinibatchStream:
    def __init__(
        self,
        cache: Cache,
        chunks: Sequence[int],
        layers: Sequence[int],
        batch_tokens: int,
        round_chunks: int,
        device: str,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        special: SpecialTokens = KEEP_MASK,
        prefetch: int | None = None,
        heldout: HeldOut | None = None,
    ):
        self.cache, self.layout = cache, cache.layout
        self.batch_tokens, self.device, self.seed = batch_tokens, torch.device(device), seed
        self.special = special
        self.heldout = heldout  # its windows' tokens are dropped from every chunk read: never trained on
        self.rank = rank
        self.reader = ChunkReader(
            cache,
            layers=layers,
            seed=seed,
            prefetch=prefetch,
            rank=rank,
            world_size=world_size,
            chunks=chunks,
            pin_memory=self.device.type == "cuda",
        )
        order_len = len(self.reader.order(0))
        if order_len == 0:
            raise ValueError("no training chunks for this rank")
        self.round_chunks = max(1, min(round_chunks, order_len))
        self.rounds_per_epoch = -(-order_len // self.round_chunks)
        self.state = StreamState()
        self._closed = threading.Event()

    def _round_chunks(self, epoch: int, r: int) -> np.ndarray:
        return self.reader.order(epoch)[r * self.round_chunks : (r + 1) * self.round_chunks]

    def _kept_rows(self, ch: Chunk, rows: torch.Tensor) -> torch.Tensor:
        """Copy rows out of the reader's reusable buffer onto the device (indexing and decoding on the device),
        as the special-token mode has the SAE see them."""
        return self.special.vectors(ch.vectors(rows, self.device), ch.token_ids[rows])

    def _carry_from_disk(self, carry: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """On resume only: re-read the carried tokens (normally they are handed over in memory)."""
        L, d = len(self.reader.layers), self.layout.d_model
        parts = [torch.empty((L, 0, d), dtype=self.cache.dtype, device=self.device)]
        pos_t = torch.as_tensor(carry, dtype=torch.int64)
        positions = [pos_t[:0]]
        for c in torch.unique(pos_t // self.layout.chunk_tokens).tolist():
            pos = pos_t[pos_t // self.layout.chunk_tokens == c]
            ch = self.reader.read_chunk(c)
            parts.append(self._kept_rows(ch, pos - ch.start))
            positions.append(pos)
        acts, got = torch.cat(parts, dim=1), torch.cat(positions)
        # back to the carry's own order, which the next permutation depends on
        by_pos = torch.argsort(got)
        rows = by_pos[torch.searchsorted(got[by_pos], pos_t)]
        return acts[:, rows.to(acts.device)], got[rows]

    def _load(
        self, chunk_ids: Sequence[int], carry: tuple[torch.Tensor, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Vectors [L, n, d] on the device and their cache positions: the carry, then the round's kept tokens."""
        parts, positions = [carry[0]], [carry[1]]
        for ch in self.reader.iter_chunks(chunk_ids):
            if self._closed.is_set():  # the consumer stopped: do not read (and place) a round nobody uses
                break
            rows = training_rows(ch, self.special, self.heldout)
            parts.append(self._kept_rows(ch, rows))
            positions.append(rows.to(torch.int64) + ch.start)
        return torch.cat(parts, dim=1), torch.cat(positions)

    def _next(self, st: StreamState) -> tuple[int, int]:
        nxt = st.round + 1
        return st.epoch + (nxt == self.rounds_per_epoch), nxt % self.rounds_per_epoch

    def __iter__(self) -> Iterator[Batch]:
        self._closed.clear()
        st = self.state
        loaded = self._load(self._round_chunks(st.epoch, st.round), self._carry_from_disk(st.carry))
        pool = ThreadPoolExecutor(1, thread_name_prefix="round-loader")  # reads round r+1 during round r
        try:
            while True:
                acts, positions = loaded
                perm = torch.from_numpy(
                    np.random.default_rng([self.seed, self.rank, st.epoch, st.round]).permutation(len(positions))
                )
                n_batches = len(perm) // self.batch_tokens
                rest = perm[n_batches * self.batch_tokens :]
                nxt = StreamState(*self._next(st), 0, positions[rest].tolist())
                future = pool.submit(
                    self._load,
                    self._round_chunks(nxt.epoch, nxt.round),
                    (acts[:, rest.to(acts.device)], positions[rest]),
                )
                for i in range(st.batches_done, n_batches):
                    sel = perm[i * self.batch_tokens : (i + 1) * self.batch_tokens]
                    st.batches_done = i + 1  # a checkpoint taken after this batch's step resumes after it
                    yield Batch(acts[:, sel.to(acts.device)], positions[sel])
                del acts, loaded
                self.state = st = nxt
                loaded = future.result()
        finally:
            self._closed.set()
            pool.shutdown(wait=True, cancel_futures=True)
