"""Max-activating examples: for every latent, its top activations over all layers and at each layer, in ONE
streaming pass over the cache (token ids and windows are stored: no model forward), plus its firing
density per layer, its activation mass per layer (P(L|J), E[L|J], Var(L|J)) and an activation histogram.

Bounded memory, whatever --tokens is. The state is a few fixed-size tensors (F latents, L layers, T = top):

    overall    values [F, T] float32 + ids [F, T] int64     one entry per TOKEN: its maximum over layers
                                                           (id = (seq * context + pos) * L + layer of the max)
    per_layer  values [L*F, T] float32 + ids [L*F, T]      the paper's view (id = seq * context + pos)
    samples    keys [F*B, S] float32 + ids [F*B, S]        per (latent, histogram bin), S firing (token, layer)
                                                           vectors drawn at random: the S largest hash keys
    fires [L, F] int64, mass [F, L] float64, hist [F, B] int64, tokens

i.e. ((L + 1) T + B S) * F * 12 bytes + F * (16 L + 8 B) bytes: 49 MB for the quickstart MLSAE (F = 5,120, L =
18, T = 32, B = 49, S = 3), about 400 MB at R = 64. A batch is merged by keeping only entries at least as
large as the current T-th value of their row (one gather and compare over the batch), then sorting the few
survivors together with the rows they touch. Ties are broken by (value desc, id asc), i.e. (value desc, seq,
pos, layer): a total order, so the result is the same for any chunk order, any batch size, and any number of
ranks (ranks merge their states at the end with the same function: two ranks give exactly what one gives).

The quantile samples are a bottom-k sketch: each firing (token, layer) vector gets a key that is a fixed hash
of (latent, id), and each (latent, bin) keeps the S largest keys, so the sample is uniform within the bin and,
like the tops, the same for any chunk order, batch size and number of ranks. The k largest keys of a union of
bins are among the per-bin k largest: `quantile_samples` draws each activation-quantile group (a run of
bins holding ~1/Q of the firing vectors) from the union of its bins.

A latent "fires" on a (token, layer) vector when its TopK value exceeds FIRE_THRESHOLD (1e-3), as in
training and the layer analyses; only firing values enter the examples, the mass and the histogram.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from analyze.layers import LayerDistribution, _distributed
from analyze.results import ExamplesSummary, to_jsonable
from harvest.atomic import atomic_write, atomic_write_json
from harvest.errors import SpecError
from harvest.memory import require
from train.inputs import open_inputs
from train.objectives import FIRE_THRESHOLD
from train.record import RunError, RunRecord
from train.special import SpecialTokens

EXAMPLES_JSON = "examples.json"
EXAMPLES_FILE = "examples.safetensors"
WORK_DIR = ".examples-work"  # per-rank checkpoints of an unfinished pass; removed when it completes
HIST_DECADES = (-3, 3)  # histogram: log-spaced bins from 1e-3 to 1e3, 8 per decade, plus one overflow bin
HIST_PER_DECADE = 8
MERGE_ENTRIES = 1 << 21  # entries (queued + kept) merged at once: bounds the merge's temporary memory
SIGN_MASK = 0x7FFFFFFF  # float32 bits of non-negative values sort like the values; SIGN_MASK - bits reverses them
SAMPLES = 3  # random firing vectors kept per (latent, histogram bin)
QUANTILES = 5  # activation-quantile groups the samples are shown in


def hist_edges() -> Tensor:
    lo, hi = HIST_DECADES
    return torch.logspace(lo, hi, (hi - lo) * HIST_PER_DECADE + 1, dtype=torch.float32)


def sample_key(latent: Tensor, ident: Tensor) -> Tensor:
    """A fixed pseudo-random key in (0, 1] of each (latent, id) pair (a 64-bit multiply-xorshift mix; int64
    products wrap): the quantile samples keep the largest keys, so they do not depend on the reading order."""
    x = latent.long() * 0x9E3779B1 + ident.long() * 0x632BE5AB + 0x165667B1
    for mult, shift in ((0x3F58476D1CE4E5B9, 31), (0x14D049BB133111EB, 29), (0x2545F4914F6CDD1D, 32)):
        x = (x ^ (x >> shift)) * mult
    return (((x >> 20) & 0xFFFFFF) + 1).float() / 2**24  # 24 bits: exact in float32


# ---------------------------------------------------------------------------------------------
# bounded top-T lists


@dataclass
class TopExamples:
    """For each of G groups, its T largest (value, id) entries: rows sorted by value desc, then id asc;
    empty slots hold (-inf, -1) at the end of a row.

    `add_` queues the entries of a batch that can enter their row (value >= the row's T-th) and merges the
    queue when it holds min(G*T, MERGE_ENTRIES) entries (and on `flush_`): the rows a merge touches are
    re-sorted once per that many queued entries instead of once per batch (early in a pass nearly every
    row is touched by every batch). Memory: the state plus at most MERGE_ENTRIES + one batch of queued
    entries (20 bytes each), and a merge's temporaries (~50 bytes per entry, MERGE_ENTRIES at a time)."""

    values: Tensor  # [G, T] float32
    ids: Tensor  # [G, T] int64
    pending: list[tuple[Tensor, Tensor, Tensor]] = field(default_factory=list, repr=False)
    pending_n: int = 0

    @classmethod
    def empty(cls, groups: int, top: int, device: str | torch.device = "cpu") -> "TopExamples":
        return cls(
            torch.full((groups, top), -math.inf, dtype=torch.float32, device=device),
            torch.full((groups, top), -1, dtype=torch.int64, device=device),
        )

    @property
    def top(self) -> int:
        return self.values.shape[1]

    @torch.no_grad()
    def add_(self, group: Tensor, value: Tensor, ident: Tensor) -> None:
        """Queue entries (group [E], value [E] > 0, ident [E]; every (group, ident) pair new) for a merge."""
        keep = value >= self.values[group, -1]
        n = int(keep.sum())
        if n:
            self.pending.append((group[keep], value[keep].float(), ident[keep]))
            self.pending_n += n
            if self.pending_n >= min(self.values.numel(), MERGE_ENTRIES):
                self.flush_()

    def flush_(self) -> "TopExamples":
        """Merge the queued entries into the rows, a slab of rows at a time: a merge's temporaries (~50 bytes
        per entry) then stay near MERGE_ENTRIES entries whatever the state's size."""
        if self.pending:
            group, value, ident = (torch.cat(x) for x in zip(*self.pending))
            self.pending, self.pending_n = [], 0
            G = len(self.values)
            slabs = max(1, -(-(len(group) + self.values.numel()) // MERGE_ENTRIES))
            for s in range(slabs):
                m = (group >= s * G // slabs) & (group < (s + 1) * G // slabs)
                self.merge_(group[m], value[m], ident[m])
        return self

    @torch.no_grad()
    def merge_(self, group: Tensor, value: Tensor, ident: Tensor) -> None:
        """Merge entries (group [E], value [E] > 0, ident [E]) into the rows now; every (group, ident) pair
        must be new."""
        keep = value >= self.values[group, -1]  # can enter its row (ties with the T-th are sorted out below)
        if not bool(keep.any()):
            return
        group, value, ident = group[keep], value[keep].float(), ident[keep]
        dev = group.device
        hit = torch.zeros(len(self.values), dtype=torch.bool, device=dev)
        hit[group] = True
        touched = hit.nonzero().squeeze(1)  # the rows to rebuild (no sort: a mask over the rows)
        slot_of = torch.empty(len(self.values), dtype=torch.int64, device=dev)
        slot_of[touched] = torch.arange(len(touched), device=dev)
        cur_v, cur_i = self.values[touched], self.ids[touched]
        filled = cur_i >= 0
        rows = torch.arange(len(touched), device=dev).unsqueeze(1).expand_as(cur_i)
        # order by (slot, value desc, id asc): one sort of a packed (slot, value desc) key, which also carries
        # both (no gathers of them afterwards), then the runs of equal keys (exact float ties in one row: a
        # few per million entries) reordered by id
        bits = torch.cat([cur_v[filled], value]).view(torch.int32).to(torch.int64)
        key = torch.cat([rows[filled], slot_of[group]]) * (SIGN_MASK + 1) + (SIGN_MASK - bits)
        i = torch.cat([cur_i[filled], ident])
        del bits, rows
        ks, o = torch.sort(key)
        tie = ks[1:] == ks[:-1]
        if bool(tie.any()):
            member = torch.zeros(len(ks), dtype=torch.bool, device=dev)
            member[1:] |= tie
            member[:-1] |= tie
            at = member.nonzero().squeeze(1)  # positions of tied entries, increasing: runs stay in key order
            sub = o[at]
            sub = sub[torch.argsort(i[sub])]
            o[at] = sub[torch.argsort(key[sub], stable=True)]
        del key
        slot = ks >> 31
        counts = torch.bincount(slot, minlength=len(touched))
        rank = torch.arange(len(ks), device=dev) - (torch.cumsum(counts, 0) - counts)[slot]
        m = (rank < self.top).nonzero().squeeze(1)
        at = slot[m] * self.top + rank[m]  # flat position in the rebuilt rows
        new = TopExamples.empty(len(touched), self.top, dev)
        new.values.view(-1)[at] = (SIGN_MASK - (ks[m] & SIGN_MASK)).to(torch.int32).view(torch.float32)
        new.ids.view(-1)[at] = i[o[m]]
        self.values[touched] = new.values
        self.ids[touched] = new.ids

    def merge_from_(self, other: "TopExamples") -> None:
        """Add every entry of another state over the same groups (e.g. another rank's)."""
        filled = other.ids >= 0
        group = torch.arange(len(other.ids), device=other.ids.device).unsqueeze(1).expand_as(other.ids)
        self.merge_(group[filled].to(self.ids.device), other.values[filled].to(self.ids.device), other.ids[filled])


# ---------------------------------------------------------------------------------------------
# the accumulator


@dataclass
class ExampleAccumulator:
    """Everything `analyze examples` keeps while streaming; fixed size (see the module doc)."""

    overall: TopExamples  # [F, T]: tokens by their maximum over layers
    per_layer: TopExamples  # [L*F, T]: group = layer position * F + latent
    samples: TopExamples  # [F*B, S]: group = latent * B + histogram bin; values are sample_key()s
    fires: Tensor  # [L, F] int64: (token, layer) vectors on which the latent fires
    mass: Tensor  # [F, L] float64: sum of firing values
    hist: Tensor  # [F, B] int64: firing values per log-spaced bin (hist_edges; last bin: >= 1e3)
    tokens: Tensor  # [] int64: tokens seen
    context: int  # the cache's window length (ids are seq * context + pos)

    @classmethod
    def zeros(
        cls,
        n_latents: int,
        n_layers: int,
        top: int,
        context: int,
        device: str | torch.device = "cpu",
        samples: int = SAMPLES,
    ) -> "ExampleAccumulator":
        n_bins = len(hist_edges())  # len(edges) - 1 bins, plus the overflow bin
        return cls(
            TopExamples.empty(n_latents, top, device),
            TopExamples.empty(n_layers * n_latents, top, device),
            TopExamples.empty(n_latents * n_bins, samples, device),
            torch.zeros(n_layers, n_latents, dtype=torch.int64, device=device),
            torch.zeros(n_latents, n_layers, dtype=torch.float64, device=device),
            torch.zeros(n_latents, n_bins, dtype=torch.int64, device=device),
            torch.zeros((), dtype=torch.int64, device=device),
            context,
        )

    @property
    def shape(self) -> tuple[int, int]:
        """(latents, layers)."""
        return self.mass.shape[0], self.mass.shape[1]

    @torch.no_grad()
    def update(self, values: Tensor, indices: Tensor, seq: Tensor, pos: Tensor) -> None:
        """One batch: values, indices [L, n, k] of the same n tokens at the L layers; seq, pos [n]."""
        L, n, k = values.shape
        F, dev = self.shape[0], values.device
        self.tokens += n
        if n == 0:
            return
        v = values.reshape(-1)
        on = (v > FIRE_THRESHOLD).nonzero().squeeze(1)  # entries are layer-major: (layer, token, slot)
        v, lat = v[on].float(), indices.reshape(-1)[on]
        layer, tok = on // (n * k), (on // k) % n
        self.fires.view(-1).add_(torch.bincount(layer * F + lat, minlength=L * F))
        self.mass.view(-1).index_add_(0, lat * L + layer, v.double())
        n_bins = self.hist.shape[1]
        bins = torch.bucketize(v, hist_edges().to(dev), right=True).sub_(1).clamp_(0, n_bins - 1)
        self.hist.view(-1).add_(torch.bincount(lat * n_bins + bins, minlength=F * n_bins))
        where = seq.to(dev).long() * self.context + pos.to(dev).long()  # [n] position id of each token
        self.per_layer.add_(layer * F + lat, v, where[tok])
        vector = where[tok] * L + layer  # id of each firing (token, layer) vector
        self.samples.add_(lat * n_bins + bins, sample_key(lat, vector), vector)
        # overall: one entry per (latent, token), its maximum over layers (lowest layer on ties). Entries
        # below the row's threshold cannot become a maximum that enters it: filter first, then pick maxima
        # (stable sorts keep the layer-major order among equal values).
        cand = (v >= self.overall.values[lat, -1]).nonzero().squeeze(1)
        if len(cand):
            pair = lat[cand] * n + tok[cand]
            if F * n < 2**32:  # one stable sort of a packed (pair, value desc) key
                cand = cand[
                    torch.argsort(
                        pair * (SIGN_MASK + 1) + (SIGN_MASK - v[cand].view(torch.int32).to(torch.int64)), stable=True
                    )
                ]
            else:
                cand = cand[torch.argsort(-v[cand], stable=True)]
                cand = cand[torch.argsort(lat[cand] * n + tok[cand], stable=True)]
            pair = lat[cand] * n + tok[cand]
            first = torch.ones_like(pair, dtype=torch.bool)
            first[1:] = pair[1:] != pair[:-1]
            best = cand[first]
            self.overall.add_(lat[best], v[best], where[tok[best]] * L + layer[best])

    def flush_(self) -> "ExampleAccumulator":
        """Merge every queued entry (before reading the lists)."""
        self.overall.flush_()
        self.per_layer.flush_()
        self.samples.flush_()
        return self

    def merge_(self, other: "ExampleAccumulator") -> "ExampleAccumulator":
        self.overall.merge_from_(other.overall)
        self.per_layer.merge_from_(other.per_layer)
        self.samples.merge_from_(other.samples)
        for name in ("fires", "mass", "hist", "tokens"):
            getattr(self, name).add_(getattr(other, name).to(getattr(self, name).device))
        return self

    def all_reduce_(self) -> "ExampleAccumulator":
        """Merge every rank's state into each rank's (no-op without torch.distributed)."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return self
        mine = self.to_tensors()
        gathered = {name: [torch.empty_like(t) for _ in range(dist.get_world_size())] for name, t in mine.items()}
        for name, t in mine.items():
            dist.all_gather(gathered[name], t.to(self.mass.device).contiguous())
        me = dist.get_rank()
        for r in range(dist.get_world_size()):
            if r != me:
                self.merge_(ExampleAccumulator.from_tensors({n: g[r] for n, g in gathered.items()}, self.context))
        return self

    def to_tensors(self) -> dict[str, Tensor]:
        self.flush_()
        out = {
            "overall_values": self.overall.values,
            "overall_ids": self.overall.ids,
            "layer_values": self.per_layer.values,
            "layer_ids": self.per_layer.ids,
            "sample_keys": self.samples.values,
            "sample_ids": self.samples.ids,
        }
        out.update(
            {f.name: getattr(self, f.name) for f in fields(self) if f.name in ("fires", "mass", "hist", "tokens")}
        )
        return {k: v.detach().cpu().contiguous() for k, v in out.items()}

    @classmethod
    def from_tensors(
        cls, t: dict[str, Tensor], context: int, device: str | torch.device = "cpu"
    ) -> "ExampleAccumulator":
        g = {k: v.to(device) for k, v in t.items()}
        if "sample_ids" not in g:  # written before the quantile samples were kept: none
            empty = TopExamples.empty(g["hist"].numel(), 1, device)
            g["sample_keys"], g["sample_ids"] = empty.values, empty.ids
        return cls(
            TopExamples(g["overall_values"], g["overall_ids"]),
            TopExamples(g["layer_values"], g["layer_ids"]),
            TopExamples(g["sample_keys"], g["sample_ids"]),
            g["fires"],
            g["mass"],
            g["hist"],
            g["tokens"],
            context,
        )

    # -- results ---------------------------------------------------------------------------------

    def distribution(self, layers: Sequence[int]) -> LayerDistribution:
        """The layer distribution of the firing mass (P(L|J), E[L|J], Var(L|J): analyze.layers' formulas)."""
        d = LayerDistribution.zeros(self.shape[0], layers, self.mass.device)
        d.mass = self.mass
        d.tokens = self.tokens.double()
        return d

    def density(self) -> Tensor:
        """[L, F] fraction of tokens on which each latent fires, per layer."""
        return self.fires.double() / max(int(self.tokens), 1)

    def examples(self, latent: int, layer_pos: int | None = None) -> list[dict[str, Any]]:
        """The kept examples of one latent, best first: value, seq, pos, layer position."""
        self.flush_()
        (F, L), C = self.shape, self.context
        if layer_pos is None:
            v, i = self.overall.values[latent], self.overall.ids[latent]
            lay, where = i % L, i // L
        else:
            g = layer_pos * F + latent
            v, i = self.per_layer.values[g], self.per_layer.ids[g]
            lay, where = torch.full_like(i, layer_pos), i
        filled = i >= 0
        return [
            {"value": float(a), "seq": int(w // C), "pos": int(w % C), "layer_pos": int(b)}
            for a, w, b in zip(v[filled].tolist(), where[filled].tolist(), lay[filled].tolist())
        ]

    def quantile_samples(self, latent: int, groups: int = QUANTILES) -> list[dict[str, Any]]:
        """The latent's firing values split into about `groups` activation-quantile groups, strongest first:
        runs of histogram bins each holding ~1/groups of its firing (token, layer) vectors (a bin is never
        split), each with its value range, its share of the vectors (q_lo..q_hi, from the top), its count and
        up to S vectors drawn at random from it (seq, pos, layer position; the value is not kept)."""
        self.flush_()
        (F, L), C = self.shape, self.context
        counts = self.hist[latent].tolist()
        B, total = len(counts), sum(counts)
        if total == 0:
            return []
        edges = hist_edges().tolist() + [math.inf]
        bins = self.samples.values.shape[0] // F
        keys = self.samples.values[latent * bins : (latent + 1) * bins]
        ids = self.samples.ids[latent * bins : (latent + 1) * bins]
        runs: list[list[int]] = []
        above, last = 0, None
        for b in range(B - 1, -1, -1):  # strongest bins first
            if counts[b] == 0:
                continue
            g = min(groups - 1, int(groups * (above + counts[b] / 2) / total))
            if g != last:
                runs.append([])
                last = g
            runs[-1].append(b)
            above += counts[b]
        out, above = [], 0
        for run in runs:
            n = sum(counts[b] for b in run)
            k, i = keys[run].reshape(-1), ids[run].reshape(-1)
            filled = i >= 0
            k, i = k[filled], i[filled]
            order = sorted(range(len(i)), key=lambda x: (-float(k[x]), int(i[x])))[: keys.shape[1]]
            picked = [int(i[x]) for x in order]
            out.append(
                {
                    "lo": edges[run[-1]],
                    "hi": edges[run[0] + 1],
                    "q_lo": above / total,
                    "q_hi": (above + n) / total,
                    "count": n,
                    "examples": [{"seq": w // L // C, "pos": w // L % C, "layer_pos": w % L} for w in sorted(picked)],
                }
            )
            above += n
        return out


# ---------------------------------------------------------------------------------------------
# cache + SAE -> examples.safetensors, examples.json, the browser


class ExamplesError(RunError):
    """Bad input to `analyze examples`."""


def _work_key(record: RunRecord, cache_fingerprint: str, **args: Any) -> str:
    """What a checkpoint must match to be resumed: the SAE file, the cache and every argument."""
    st = (record.dir / "sae.safetensors").stat()
    return json.dumps(
        {"sae": [str(record.dir.resolve()), st.st_size, st.st_mtime_ns], "cache": cache_fingerprint, **args},
        sort_keys=True,
    )


@torch.no_grad()
def run_examples(
    sae_dir: str | Path,
    cache_path: str | Path | None = None,
    tokens: int | None = None,
    top: int = 32,
    context: int = 12,
    out_dir: str | Path | None = None,
    device: str = "auto",
    model: str | None = None,
    logits: int = 10,
    browser: bool = True,
    heldout: bool = False,
    seed: int = 0,
    rows: int = 4096,
    samples: int = SAMPLES,
    checkpoint_seconds: float = 60.0,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Stream up to `tokens` kept tokens (default: all) of the run's cache through its SAE and keep, per
    latent, the `top` best examples over all layers and at each layer; write examples.safetensors,
    examples.json and (with `browser`) the static latent browser into `out_dir` (default <run>/latents).
    With `heldout`, only the run's held-out tokens (RunRecord.heldout: tokens it was never trained on).

    Resumable: every `checkpoint_seconds` each rank saves its state (a few fixed-size tensors) under
    out_dir/.examples-work; the same call again continues after the last completed chunk and gives the
    same result as an uninterrupted pass. Under torchrun the chunks are split over ranks, which merge
    their states at the end; rank 0 writes. Returns the summary (examples.json)."""
    from harvest.models import resolve_device
    from train.latents import iter_latents

    sae_dir = Path(sae_dir)
    if tokens is not None and tokens < 1:
        raise SpecError(f"--tokens must be positive, got {tokens}")
    if top < 1 or context < 0 or logits < 0 or samples < 1:
        raise SpecError(
            f"need --top >= 1, --samples >= 1, --context >= 0 and --logits >= 0; got {top}, {samples}, {context}, "
            f"{logits}"
        )
    out_dir = Path(out_dir) if out_dir is not None else sae_dir / "latents"
    inputs = open_inputs(sae_dir, cache_path, purpose="analyze examples" + " --heldout" * heldout, heldout=heldout)
    record, cache, layers = inputs.record, inputs.cache, inputs.record.layers
    if not inputs.trained_on:
        log(f"reading {inputs.describe()}")
    cache.require_complete()
    dev = resolve_device(device)
    sae = record.load_sae(dev)
    special = SpecialTokens.of(record.special_tokens, cache)  # the tokens (and vectors) the run trained on
    F, L, C = sae.cfg.n_latents, len(layers), cache.layout.context
    # the top lists (a float32 value and an int64 id per entry, over all layers and per layer), about 3x over
    # while a batch's candidates are merged in and when they are written
    what = f"keeping the top {top:,} examples of {F:,} latents (over all layers and at each of {L})"
    require(3 * (1 + L) * F * top * 12, dev, what, "--top")

    with _distributed() as (rank, world):
        budget = None if tokens is None else tokens // world + (rank < tokens % world)
        key = _work_key(
            record,
            cache.fingerprint,
            tokens=tokens,
            top=top,
            samples=samples,
            seed=seed,
            world=world,
            special=special.mode,
            held=heldout,
        )
        work = out_dir / WORK_DIR
        ckpt = work / f"rank{rank}.safetensors"
        acc, skip, resumed = ExampleAccumulator.zeros(F, L, top, C, dev, samples), 0, False
        if ckpt.is_file():
            state = load_file(str(ckpt))
            meta = json.loads(state.pop("_meta").numpy().tobytes().decode())
            if meta["key"] == key:
                acc, skip, resumed = ExampleAccumulator.from_tensors(state, C, dev), meta["chunks"], True
                log(f"resuming: {skip} chunks ({int(acc.tokens):,} tokens) already done on rank {rank}")
        try:
            work.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ExamplesError(f"cannot write into {out_dir} ({e.strerror or e}): choose a writable --out")
        t0 = last = time.perf_counter()
        done = skip
        seen0 = int(acc.tokens)
        left = None if budget is None else budget - seen0
        stream = iter_latents(
            sae, cache, layers, chunks=record.heldout.chunks if heldout else None, tokens=left, rows=rows,
            device=dev, special=special, select=record.heldout.mask if heldout else None,
            seed=seed, rank=rank, world_size=world, skip=skip,
        )  # fmt: skip
        from harvest.progress import progress_bar

        total = cache.layout.n_tokens // world if budget is None else budget  # an upper bound: kept tokens are fewer
        with progress_bar("examples", total, "tokens", enabled=progress and rank == 0, completed=seen0) as bar:
            for b in stream:
                acc.update(b.values, b.indices, b.seq, b.pos)
                bar.advance(b.n)
                if b.last_of_chunk:
                    done += 1
                    if time.perf_counter() - last > checkpoint_seconds:
                        _save_checkpoint(ckpt, acc, key, done)
                        last = time.perf_counter()
            bar.update(completed=int(acc.tokens), total=int(acc.tokens))
        if dev.startswith("cuda"):
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
        streamed = int(acc.tokens) - seen0
        acc.flush_().all_reduce_()

    summary: dict[str, Any] = {
        "tokens": int(acc.tokens),
        "tokens_requested": tokens,
        "tokens_per_s": streamed * world / max(seconds, 1e-9),
        "seconds": seconds,
        "resumed": resumed,
        "top": top,
        "samples": samples,
        "context": context,
        "layers": layers,
        "n_latents": F,
        "k": sae.cfg.k,
        "special_tokens": special.mode,
        "tokens_used": f"held out: {record.heldout.describe()}" if heldout else "all kept tokens of the cache",
        "sae": str(sae_dir.resolve()),
        "cache": str(cache.path),
        "cache_fingerprint": cache.fingerprint,
        "model": cache.meta["model"]["name"],
        "lens": cache.lens_record,
        "seed": seed,
        "world_size": world,
        "device": dev,
        "fire_threshold": FIRE_THRESHOLD,
        "out": str(out_dir),
        "dead_latents": int((acc.overall.ids[:, 0] < 0).sum()),
        "memory_bytes": sum(t.numel() * t.element_size() for t in acc.to_tensors().values()),
        "definitions": {
            "overall": "per latent, the tokens with the largest maximum-over-layers activation (one entry per "
            "token, with the layer of its maximum); ties: value desc, then seq, pos, layer",
            "per_layer": "per (layer, latent), the tokens with the largest activation at that layer",
            "density": "fraction of tokens on which the latent fires (value > 1e-3), per layer",
            "p_layer_given_latent": "P(L=l|J=j): the latent's firing activation mass at layer l / its total mass",
            "histogram": "firing values per log-spaced bin (edges 1e-3 .. 1e3, 8 per decade; last bin >= 1e3)",
            "samples": "per (latent, histogram bin), up to `samples` firing (token, layer) vectors drawn at random "
            "(the largest hash keys of (latent, id); id = (seq * context + pos) * L + layer); the browser groups "
            "bins into activation quantiles",
        },
    }
    if rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        tensors = acc.to_tensors()
        dist_ = acc.distribution(layers)
        tensors.update(
            hist_edges=hist_edges(),
            p_layer_given_latent=dist_.p_layer_given_latent().cpu(),
            mean_layer=dist_.mean_layer().cpu(),
            var_layer=dist_.var_layer().cpu(),
            density=acc.density().cpu(),
        )
        atomic_write(
            out_dir / EXAMPLES_FILE,
            lambda tmp: save_file(tensors, str(tmp), metadata={"layers": json.dumps(layers), "context": str(C)}),
        )
        files = [EXAMPLES_JSON, EXAMPLES_FILE]
        summary = to_jsonable(summary)
        if browser:
            from analyze.browser import write_browser

            shown = {**summary, "run_name": sae_dir.resolve().name, "cache_name": _last_part(str(cache.path))}
            ident = cache.meta["model"].get("identity", {})
            shown["model"] = ident.get("hub_id") or _last_part(summary["model"])  # never a local path
            shown["quantiles"] = QUANTILES
            data = browser_data(
                acc, shown, tensors, cache, sae, special, model=model, n_logits=logits, device=dev, rows=rows,
                log=log, progress=progress,
            )  # fmt: skip
            summary["browser"] = write_browser(out_dir, data, progress=progress)
            files.append(summary["browser"]["index"])
        summary["files"] = files
        atomic_write_json(out_dir / EXAMPLES_JSON, summary)
        # the typed summary the report reads (analyze/results.py); browser path relative to out_dir
        ExamplesSummary(
            sae=str(sae_dir),
            browser=summary["browser"]["index"] if browser else "",
            tokens=summary["tokens"],
            latents=F - summary["dead_latents"],
            examples_per_latent=top,
            files=files,
            definitions=summary["definitions"],
        ).save(out_dir)
        shutil.rmtree(work, ignore_errors=True)
    return summary


def _last_part(path: str) -> str:
    """A cache's name for the browser: the last part of its path or URL (the browser names no machine path)."""
    return path.rstrip("/").rsplit("/", 1)[-1] or path


def format_examples(res: dict[str, Any]) -> str:
    lines = [
        f"examples of {res['n_latents']:,} latents over {res['tokens']:,} tokens x {len(res['layers'])} layers "
        f"({res['tokens_per_s']:,.0f} tok/s{', resumed' if res['resumed'] else ''}); "
        f"{res['dead_latents']:,} never fired; state {res['memory_bytes'] / 2**20:.1f} MiB",
        f"wrote {', '.join(str(Path(res['out']) / f) for f in res['files'])}",
    ]
    if "browser" in res:
        lines.append(f"latent browser: {(Path(res['out']) / res['browser']['index']).resolve().as_uri()}")
    return "\n".join(lines)


def _save_checkpoint(path: Path, acc: ExampleAccumulator, key: str, chunks: int) -> None:
    meta = json.dumps({"key": key, "chunks": chunks}).encode()
    tensors = {**acc.to_tensors(), "_meta": torch.frombuffer(bytearray(meta), dtype=torch.uint8)}
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp)))


# ---------------------------------------------------------------------------------------------
# what the browser needs: token strings, context windows, direct logits


def _final_norm(hf: Any) -> Any:
    """The final norm module of a Hugging Face causal LM (Llama/Gemma `norm`, GPT-NeoX `final_layer_norm`,
    GPT-2 `ln_f`), or None."""
    for name in ("norm", "final_layer_norm", "ln_f", "final_norm"):
        m = getattr(hf.base_model, name, None)
        if isinstance(m, torch.nn.Module):
            return m
    return None


@torch.no_grad()
def decoder_logits(sae: Any, model_path: str, n: int, batch: int = 64) -> tuple[Tensor, Tensor, Tensor, Tensor] | None:
    """Each latent's direct effect on the next-token logits: its decoder direction (scaled to the norm of a
    standardized vector, sqrt(d)) through the model's final norm and unembedding, minus the same for the
    zero vector (a LayerNorm's bias, an unembedding bias). Ignores every block after the layer: it is the
    logit-lens reading of the direction. Returns top/bottom (values, token ids) [F, n], or None when the
    model has no recognizable final norm."""
    from transformers import AutoModelForCausalLM

    from harvest.models import _quiet_transformers

    _quiet_transformers()
    hf = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    norm, head = _final_norm(hf), hf.get_output_embeddings()
    if norm is None or head is None:
        return None
    W = sae.W_dec.detach().float().cpu()
    d = W.shape[1]
    base = head(norm(torch.zeros(1, d)))
    tops, bots = [], []
    for s in range(0, len(W), batch):
        out = head(norm(W[s : s + batch] * math.sqrt(d))) - base
        tops.append(out.topk(n, dim=1))
        bots.append((-out).topk(n, dim=1))
    cat = lambda xs, i: torch.cat([x[i] for x in xs])
    return cat(tops, 0), cat(tops, 1), -cat(bots, 0), cat(bots, 1)


class TokenText:
    """Token id -> display string with the cache's tokenizer (decoded once per id)."""

    def __init__(self, tokenizer: Any):
        self.tok = tokenizer
        self.cache: dict[int, str] = {}

    def add(self, ids: Sequence[int]) -> None:
        new = sorted(set(int(i) for i in ids) - self.cache.keys())
        # decode each id after a fixed prefix token and strip the prefix's text: single-id decoding drops a
        # leading space in SentencePiece tokenizers (Gemma), this keeps it
        anchor = self.tok.convert_tokens_to_ids(self.tok.tokenize("a"))[-1:] or []
        pre = self.tok.decode(anchor)
        for i, text in zip(new, self.tok.batch_decode([anchor + [i] for i in new])):
            self.cache[i] = text[len(pre) :] if text.startswith(pre) else self.tok.decode([i])

    def __getitem__(self, i: int) -> str:
        return self.cache[int(i)]


@torch.no_grad()
def context_activations(
    sae: Any,
    cache: Any,
    layers: Sequence[int],
    special: SpecialTokens,
    items: Tensor,
    width: int,
    device: str = "cpu",
    rows: int = 4096,
    progress: bool = False,
) -> tuple[Tensor, Tensor]:
    """The whole context of each item, with the latent's activation at every token of it.

    items [N, 4]: (seq, pos, latent, layer position). Returns token ids [N, 2 width + 1] (-1 outside the
    window; the item's token in the middle) and the latent's TopK value at that layer [N, 2 width + 1]
    (0 where it does not fire, NaN for tokens that are not encoded, e.g. special tokens). One pass over the
    chunks that hold those windows (a shuffled write block spreads a window over its block's chunks),
    encoding only their tokens, the same way as the streaming pass (`iter_latents`, the run's special-token
    mode)."""
    from harvest.progress import progress_bar
    from train.latents import iter_latents

    C, L, F = cache.layout.context, len(layers), sae.cfg.n_latents
    W = 2 * width + 1
    items = items.long().reshape(-1, 4)
    seq, pos, lat, lp = items.unbind(1)
    p = pos.unsqueeze(1) + torch.arange(-width, width + 1)
    inside = (p >= 0) & (p < C)
    pc = p.clamp(0, C - 1)
    windows = cache.windows() if len(items) else torch.zeros(0, C, dtype=torch.int32)
    tokens = torch.where(inside, windows[seq.unsqueeze(1).expand(-1, W), pc].long(), -1)
    token_key = seq.unsqueeze(1) * C + pc  # [N, W] position id
    entry_key = (token_key * L + lp.unsqueeze(1)) * F + lat.unsqueeze(1)
    uk, inv = torch.unique(entry_key[inside], return_inverse=True)
    tk, tinv = torch.unique(token_key[inside], return_inverse=True)
    vals = torch.zeros(len(uk), dtype=torch.float32)
    encoded = torch.zeros(len(tk), dtype=torch.bool)
    need = torch.unique(seq)
    if len(need):
        at = torch.isin(cache.read_tokens("seq").long(), need).nonzero().squeeze(1)
        chunks = torch.unique(at // cache.layout.chunk_tokens).tolist()
        layer_ids = torch.arange(L).view(L, 1, 1)
        stream = iter_latents(
            sae, cache, layers, chunks=chunks, rows=rows, device=device, special=special,
            select=lambda s: torch.isin(s, need),
        )  # fmt: skip
        with progress_bar("contexts", len(chunks), "chunks", enabled=progress) as bar:
            for b in stream:
                bar.advance(int(b.last_of_chunk))
                _mark(b, tk, encoded, uk, vals, C, L, F, layer_ids)
    acts = torch.zeros(len(items), W, dtype=torch.float32)
    acts[inside] = torch.where(encoded[tinv], vals[inv], math.nan)
    return tokens, acts


def _mark(b: Any, tk: Tensor, encoded: Tensor, uk: Tensor, vals: Tensor, C: int, L: int, F: int, layer_ids: Tensor):
    """One batch of the context pass: flag its tokens that a context needs as encoded (position ids `tk`),
    and store the firing values a context needs (ids of (position, layer, latent) `uk`)."""
    where = (b.seq.cpu() * C + b.pos.cpu()).long()
    hit = torch.searchsorted(tk, where).clamp_(max=max(len(tk) - 1, 0))
    encoded[hit[tk[hit] == where]] = True
    v, i = b.values.cpu(), b.indices.cpu()
    key = (where.view(1, -1, 1) * L + layer_ids) * F + i
    on = v > FIRE_THRESHOLD
    key, v = key[on], v[on]
    j = torch.searchsorted(uk, key).clamp_(max=max(len(uk) - 1, 0))
    ok = uk[j] == key
    vals[j[ok]] = v[ok].float()


def browser_data(
    acc: ExampleAccumulator,
    summary: dict[str, Any],
    tensors: dict[str, Tensor],
    cache: Any,
    sae: Any,
    special: SpecialTokens,
    model: str | None = None,
    n_logits: int = 10,
    device: str = "cpu",
    rows: int = 4096,
    log: Callable[[str], None] = print,
    progress: bool = False,
) -> Any:
    """Everything the browser shows: decoded contexts of the examples it shows (with the latent's activation
    at every token), quantile samples, and the direct logits (model space only: through a tuned lens the
    decoder directions are not in the unembedding's basis)."""
    from analyze.browser import BrowserData
    from analyze.delta_ce import _resolve
    from harvest.models import load_tokenizer

    acc = ExampleAccumulator.from_tensors({k: tensors[k] for k in acc.to_tensors()}, acc.context)
    source = _resolve(model, cache)
    tokenizer = load_tokenizer(source)
    text = TokenText(tokenizer)
    layers = list(summary["layers"])

    def token_text(ids: list[int]) -> dict[int, str]:
        text.add(ids)
        return {int(i): text[i] for i in ids}

    def contexts(items: Tensor) -> tuple[Tensor, Tensor]:
        return context_activations(sae, cache, layers, special, items, summary["context"], device, rows, progress)

    logits, note = None, ""
    if n_logits == 0:
        note = "not computed (--logits 0)"
    elif cache.lens_record is not None:
        note = (
            "not shown: the cache is in tuned-lens space, so decoder directions are not in the model's residual "
            "basis and the unembedding cannot read them directly"
        )
    else:
        res = decoder_logits(sae, source.path, n_logits)
        if res is None:
            note = "not shown: no final norm found in this model architecture"
        else:
            tv, ti, bv, bi = res
            logits = (ti, tv, bi, bv)
            note = (
                "direct effect of the decoder direction on the next-token logits: through the final norm and "
                "the unembedding, skipping every later block (a logit-lens reading; model space)"
            )
    return BrowserData(
        summary=summary,
        layers=layers,
        p_layer=tensors["p_layer_given_latent"],
        mean_layer=tensors["mean_layer"],
        var_layer=tensors["var_layer"],
        density=tensors["density"],
        hist=tensors["hist"],
        hist_edges=tensors["hist_edges"],
        examples=acc.examples,
        samples=acc.quantile_samples,
        contexts=contexts,
        token_text=token_text,
        vocab_size=len(tokenizer),
        logits=logits,
        logits_note=note,
    )
