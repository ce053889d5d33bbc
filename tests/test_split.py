"""The held-out split: whole context windows, grouped by document, seeded, never trained on."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import spy_on_trained_batches

from harvest import open_cache
from train.config import TrainConfig
from train.evaluate import evaluate
from train.loop import train
from train.record import load_run
from train.split import HeldOut, cheapest_span, choose_heldout, document_ids, guard_windows


def test_the_cheapest_span_is_found_by_brute_force():
    """cheapest_span against every span tried by hand: its guards (windows outside it sharing a document
    with it, counted token by token) are at most two, or the fewest any span has."""
    rng = np.random.default_rng(0)
    for trial in range(20):
        w = rng.integers(1, 6, size=(30, 7))
        w[rng.random(w.shape) < (0.02 if trial % 2 else 0.2)] = 0  # EOS = 0: long documents, then short ones
        docs = document_ids(w, eos=0, first=0)
        lo, hi = docs[:, 0], docs[:, -1]

        n, costs = 6, {}
        for s in range(5, 25 - n + 1):
            held = set(docs[s : s + n].reshape(-1).tolist())
            outside = [v for v in range(len(w)) if not s <= v < s + n]
            costs[s] = sum(bool(held & set(docs[v].tolist())) for v in outside)
        span = cheapest_span(lo, hi, 5, 25, n, np.random.default_rng(trial))
        assert span.tolist() == list(range(span[0], span[0] + n)) and span[0] >= 5 and span[-1] < 25
        assert costs[int(span[0])] <= max(2, min(costs.values()))
        assert len(guard_windows(w, span, 0, 0)) == costs[int(span[0])]


def test_held_out_windows_are_a_cheap_span_seeded_and_read_from_few_blocks(docs_cache):
    cache = open_cache(docs_cache)
    ctx, layout = cache.layout.context, cache.layout
    held = choose_heldout(cache, 512, seed=0)
    assert held == choose_heldout(cache, 512, seed=0) and held != choose_heldout(cache, 512, seed=1)
    assert held.method == "span" and len(held.windows) == 32 and held.n_tokens == len(held.windows) * ctx
    assert held.windows == list(range(held.windows[0], held.windows[0] + 32))  # consecutive
    assert held.guards == "documents" and 1 <= len(held.excluded_windows) <= 2  # its two ends at most
    # all in one write block, whose chunks are all an evaluation reads; every held-out token found there
    block = np.arange(layout.n_sequences) * ctx // layout.block_tokens
    assert len({block[w] for w in held.windows}) == 1
    seq = cache.read_tokens("seq").numpy()
    holding = np.flatnonzero(np.isin(seq, held.windows))
    assert held.chunks == sorted(set((holding // layout.chunk_tokens).tolist()))
    assert held.positions(cache).tolist() == holding.tolist() and len(holding) == held.n_tokens
    # at most half the cache, and nothing when asked for nothing
    assert len(choose_heldout(cache, 10**9, seed=0).windows) <= layout.n_sequences // 2
    assert choose_heldout(cache, 0, seed=0).windows == []
    # a leading part: fewer windows, their chunks only, the same guards (training saw none of them)
    part = held.limited(40, cache)
    assert part.windows == held.windows[:3] and part.n_tokens == 48 and set(part.chunks) <= set(held.chunks)
    assert part.excluded_windows == held.excluded_windows


def test_no_held_out_window_shares_a_token_with_training(docs_cache, tmp_path, monkeypatch):
    """Every minibatch actually trained on (spied on its way from the stream to the step) holds no token
    of a held-out window; one epoch covers every other kept token."""
    trained = spy_on_trained_batches(monkeypatch)
    out = tmp_path / "run"
    cfg = TrainConfig(
        cache=str(docs_cache), out=str(out), expansion_factor=2, k=4, batch_tokens=128, eval_tokens=512, round_chunks=4
    )
    [summary] = train([cfg], show_progress=False)
    record = load_run(out)
    assert record.heldout.windows and record.heldout.method == "span"
    cache = open_cache(docs_cache)
    seq, keep = cache.read_tokens("seq").numpy(), cache.read_tokens("keep").numpy()
    positions = torch.cat([p for p, _ in trained]).numpy()
    assert len(positions) == summary["steps"] * 128
    assert not np.isin(seq[positions], record.heldout.windows).any()
    assert len(set(positions.tolist())) == len(positions)  # one epoch: no token twice
    not_trained = record.heldout.windows + record.heldout.excluded_windows
    assert not np.isin(seq[positions], not_trained).any()
    allowed = np.flatnonzero(keep & ~np.isin(seq, not_trained))
    assert set(positions.tolist()) <= set(allowed.tolist()) and len(allowed) - len(positions) < 128
    # the evaluation encodes exactly the kept tokens of the held-out windows
    held_kept = int((keep & np.isin(seq, record.heldout.windows)).sum())
    assert summary["held_out"]["tokens"] == held_kept
    again = evaluate(record.load_sae(), cache, record.heldout, record.layers, "cpu")
    assert again.fvu == pytest.approx(summary["held_out"]["fvu"], rel=1e-6)


def _documents_by_hand(windows: np.ndarray, eos: int, first: int) -> list[set[int]]:
    """Independent of train.split: walk the windows' text token by token, starting a new document at each
    EOS (as the harvest joined them); the set of documents each window holds a token of."""
    doc, out = 0, []
    for window in windows.tolist():
        docs = set()
        for token in window[first:]:
            if token == eos:
                doc += 1
            docs.add(doc)
        out.append(docs)
    return out


def test_no_held_out_document_has_a_token_in_a_window_training_may_use(docs_cache, tmp_path, monkeypatch):
    """The held-out set is document-disjoint: the documents (rebuilt here by hand from the raw `windows`
    array) of held-out windows appear in no window whose tokens training reads; guards are exactly the
    windows that would break this, their cost is in the summary, and training never touches them."""
    trained = spy_on_trained_batches(monkeypatch)
    out = tmp_path / "run"
    cfg = TrainConfig(
        cache=str(docs_cache), out=str(out), expansion_factor=2, k=4, batch_tokens=128, eval_tokens=512, round_chunks=4
    )
    [summary] = train([cfg], show_progress=False)
    held = load_run(out).heldout
    cache = open_cache(docs_cache)
    tok = cache.meta["tokenizer"]
    docs = _documents_by_hand(cache.windows().numpy(), tok["eos_token_id"], int(tok["prepend_bos"]))
    held_docs = set().union(*(docs[w] for w in held.windows))
    seq = cache.read_tokens("seq").numpy()
    trained_windows = set(seq[torch.cat([p for p, _ in trained]).numpy()].tolist())
    usable = set(range(len(docs))) - set(held.windows) - set(held.excluded_windows)
    assert held.guards == "documents" and held.excluded_windows
    assert all(not (docs[w] & held_docs) for w in usable)  # no held-out document in any trainable window
    assert trained_windows <= usable and len(trained_windows) > len(usable) // 2
    # the guards are the minimal set: each one shares a document with the held-out text
    assert all(docs[w] & held_docs for w in held.excluded_windows)
    split = summary["heldout_split"]
    keep = cache.read_tokens("keep").numpy()
    assert split["guard_windows"] == len(held.excluded_windows)
    assert split["guard_tokens"] == int((keep & np.isin(seq, held.excluded_windows)).sum()) > 0
    assert "document-disjoint" in held.describe()


def test_a_held_out_set_round_trips_through_its_dict():
    held = HeldOut("documents", 3, [9, 2, 5], 48, [1, 0], [10, 1], "documents")
    assert held.windows == [2, 5, 9] and held.chunks == [0, 1] and held.excluded_windows == [1, 10]
    assert HeldOut.from_dict(held.to_dict()) == held
    # a record written before guards: no excluded windows, and it says it is not document-disjoint
    old = {k: v for k, v in held.to_dict().items() if k not in ("excluded_windows", "guards")}
    assert (
        HeldOut.from_dict(old).excluded_windows == [] and "NOT document-disjoint" in HeldOut.from_dict(old).describe()
    )
    with pytest.raises(ValueError, match="method"):
        HeldOut.from_dict({**held.to_dict(), "method": "random"})
