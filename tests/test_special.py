"""Special tokens in training and evaluation: exclude, reference (zeros, kept), include-real, cache."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from helpers import spy_on_trained_batches

from harvest import open_cache
from harvest.errors import SpecError
from train.config import TrainConfig
from train.loop import train
from train.record import load_run
from train.special import SpecialTokens


def _train_spying(cache: Path, out: Path, monkeypatch, **kw) -> tuple[dict, list]:
    """Train one epoch; return the summary and every (positions, acts) minibatch the loop trained on."""
    seen = spy_on_trained_batches(monkeypatch)
    cfg = TrainConfig(
        cache=str(cache), out=str(out), expansion_factor=2, k=4, batch_tokens=128, eval_tokens=512, round_chunks=4
    )
    [summary] = train([cfg.replace(**kw)], show_progress=False)
    return summary, seen


def test_modes_resolve_against_what_the_cache_stores():
    def cache(harvested: str) -> SimpleNamespace:
        return SimpleNamespace(
            path="c",
            meta={
                "spec": {"special_tokens": harvested},
                "tokenizer": {"special_ids": [0, 2], "bos_token_id": 0, "eos_token_id": 0, "pad_token_id": None},
            },
        )

    assert SpecialTokens.of("cache", cache("exclude")).mode == "exclude"
    assert SpecialTokens.of("cache", cache("include")).mode == "include-real"  # caches before `reference`
    assert SpecialTokens.of("cache", cache("reference")).mode == "reference"
    assert SpecialTokens.of("reference", cache("include-real")) == SpecialTokens("reference", (0, 2), (0,))
    with pytest.raises(SpecError, match="stores zeros"):
        SpecialTokens.of("include-real", cache("reference"))
    # 0 = EOS, 2 = unk: reference mode keeps both, zeroes EOS only (the reference zeroes BOS/EOS/PAD)
    sp = SpecialTokens.of("reference", cache("exclude"))
    assert sp.zeroed == (0,) and sp.ids == (0, 2)
    keep = torch.tensor([True, False, False, False])
    ids = torch.tensor([5, 0, 2, 7])
    assert sp.usable(keep, ids).tolist() == [True, True, True, False]
    assert SpecialTokens.of("exclude", cache("exclude")).usable(keep, ids).tolist() == [True, False, False, False]
    x = torch.ones(2, 4, 3)
    assert sp.vectors(x, ids)[:, :, 0].tolist() == [[1, 0, 1, 1]] * 2
    assert SpecialTokens.of("include-real", cache("exclude")).vectors(torch.ones(2, 4, 3), ids).all()


def test_reference_mode_trains_on_zeros_at_special_positions_and_keeps_them_in_every_metric(
    docs_cache, tmp_path, monkeypatch
):
    cache = open_cache(docs_cache)
    tok, keep, seq = (cache.read_tokens(n).numpy() for n in ("token_ids", "keep", "seq"))
    is_special = np.isin(tok, cache.meta["tokenizer"]["special_ids"])
    assert is_special.sum() > 20 and not keep[is_special].any()  # harvested with exclude
    summary, seen = _train_spying(docs_cache, tmp_path / "ref", monkeypatch, special_tokens="reference")
    record = load_run(tmp_path / "ref")
    assert record.special_tokens == "reference"
    held = np.isin(seq, record.heldout.windows)
    guard = np.isin(seq, record.heldout.excluded_windows)
    positions = torch.cat([p for p, _ in seen]).numpy()
    acts = torch.cat([a for _, a in seen], dim=1)
    special_rows = is_special[positions]
    assert special_rows.sum() > 10  # special tokens are trained on ...
    assert (acts[:, torch.from_numpy(special_rows)] == 0).all()  # ... as zero vectors
    for i in np.flatnonzero(~special_rows)[:5]:  # the others are the cache's vectors
        assert torch.equal(acts[1, i], cache.read(1, int(positions[i]), int(positions[i]) + 1)[0])
    # one epoch: every token neither held out nor a guard, special or not
    assert len(np.flatnonzero(~held & ~guard)) - len(positions) < 128 and not (held | guard)[positions].any()
    # the held-out metrics count the special tokens too (zeros): every held-out position
    assert summary["held_out"]["tokens"] == int(held.sum()) > int((held & keep).sum())

    # exclude (= this cache's own mode): no special token trained on; include-real: their real vectors
    summary_x, seen_x = _train_spying(docs_cache, tmp_path / "exc", monkeypatch, special_tokens="exclude")
    assert not is_special[torch.cat([p for p, _ in seen_x]).numpy()].any()
    assert summary_x["held_out"]["tokens"] == int((held & keep).sum())
    _, seen_r = _train_spying(docs_cache, tmp_path / "real", monkeypatch, special_tokens="include-real")
    pos_r = torch.cat([p for p, _ in seen_r]).numpy()
    acts_r = torch.cat([a for _, a in seen_r], dim=1)
    i = int(np.flatnonzero(is_special[pos_r])[0])
    assert acts_r[:, i].abs().sum() > 0
    assert torch.equal(acts_r[0, i], cache.read(0, int(pos_r[i]), int(pos_r[i]) + 1)[0])


def test_the_old_include_special_flag_still_means_the_real_vectors(tmp_path):
    (tmp_path / "old.yaml").write_text("include_special: true\nk: 8\n")
    assert TrainConfig.from_yaml(tmp_path / "old.yaml").special_tokens == "include-real"
    (tmp_path / "off.yaml").write_text("include_special: false\n")
    assert TrainConfig.from_yaml(tmp_path / "off.yaml").special_tokens == "cache"
    (tmp_path / "bad.yaml").write_text("include_special: maybe\n")
    with pytest.raises(SpecError, match="include_special"):
        TrainConfig.from_yaml(tmp_path / "bad.yaml")
