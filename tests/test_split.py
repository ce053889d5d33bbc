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
from train.split import HeldOut, choose_heldout, document_runs


def _doc_of_first_token(windows: np.ndarray, eos: int, first: int) -> np.ndarray:
    """Brute force: the document (count of EOS so far in the token stream) of each window's first text token."""
    stream = windows[:, first:].reshape(-1)
    docs = np.cumsum(stream == eos)
    return docs[:: windows.shape[1] - first]


def test_document_runs_group_windows_by_the_document_of_their_first_token():
    rng = np.random.default_rng(0)
    for first in (0, 1):
        w = rng.integers(1, 6, size=(40, 9))
        w[rng.random(w.shape) < 0.04] = 0  # EOS = 0, now and then, anywhere (also at a window's first text token)
        if first:
            w[:, 0] = 0  # a prepended BOS equal to EOS is not a document start
        runs = document_runs(w, eos=0, first=first)
        want = _doc_of_first_token(w, 0, first)
        assert (np.diff(runs) > 0).tolist() == (np.diff(want) > 0).tolist()
        assert runs[0] == 0 and len(runs) == len(w)


def test_held_out_windows_are_whole_documents_seeded_and_read_from_few_blocks(docs_cache):
    cache = open_cache(docs_cache)
    ctx, layout = cache.layout.context, cache.layout
    held = choose_heldout(cache, 512, seed=0)
    assert held == choose_heldout(cache, 512, seed=0) and held != choose_heldout(cache, 512, seed=1)
    assert held.method == "documents" and 16 <= len(held.windows) <= 32 and held.n_tokens == len(held.windows) * ctx
    # whole runs of one document's windows (clipped at block edges), nothing cut in the middle
    tok = cache.meta["tokenizer"]
    runs = document_runs(cache.windows().numpy(), tok["eos_token_id"], int(tok["prepend_bos"]))
    block = np.arange(layout.n_sequences) * ctx // layout.block_tokens
    chosen = set(held.windows)
    for key in {(runs[w], block[w]) for w in held.windows}:
        members = [w for w in range(layout.n_sequences) if (runs[w], block[w]) == key]
        assert set(members) <= chosen, key
    # all in one write block, whose chunks are all an evaluation reads; every held-out token found there
    assert len({block[w] for w in held.windows}) == 1
    seq = cache.read_tokens("seq").numpy()
    holding = np.flatnonzero(np.isin(seq, held.windows))
    assert held.chunks == sorted(set((holding // layout.chunk_tokens).tolist()))
    assert held.positions(cache).tolist() == holding.tolist() and len(holding) == held.n_tokens
    # at most half the cache, and nothing when asked for nothing
    assert len(choose_heldout(cache, 10**9, seed=0).windows) <= layout.n_sequences // 2
    assert choose_heldout(cache, 0, seed=0).windows == []
    # a leading part: fewer windows, their chunks only
    part = held.limited(40, cache)
    assert part.windows == held.windows[:3] and part.n_tokens == 48 and set(part.chunks) <= set(held.chunks)


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
    assert record.heldout.windows and record.heldout.method == "documents"
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
