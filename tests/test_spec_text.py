"""The spec (YAML <-> dataclass <-> flags) and the tokenization into context windows."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from harvest.errors import DatasetError, SpecError
from harvest.spec import RUNTIME_FIELDS, CacheSpec, fingerprint, spec_fields
from harvest.text import make_windows

ROOT = Path(__file__).parent.parent


def test_cache_spec_yaml_is_the_dataclass_default_and_names_every_field():
    text = (ROOT / "cache_spec.yaml").read_text()
    assert CacheSpec.from_yaml(ROOT / "cache_spec.yaml") == CacheSpec()
    for f in spec_fields():
        assert f"\n{f.name}:" in text, f"cache_spec.yaml lacks {f.name}"


def test_overrides_and_validation():
    s = CacheSpec().replace(tokens=100, layers=[0, 2], model=None)
    assert s.tokens == 100 and s.layers == "0,2" and s.model == "gemma-3-270m"
    assert s.layer_list(3) == [0, 2] and CacheSpec().layer_list(4) == [0, 1, 2, 3]
    assert s.n_sequences() == 1  # rounded up to whole windows
    with pytest.raises(SpecError, match="out of range"):
        s.layer_list(2)
    for bad, msg in [
        ({"layers": "3,1"}, "increasing"),
        ({"context": 0}, "positive"),
        ({"shard_tokens": 1000}, "multiple of chunk_tokens"),
        ({"compression": "gzip"}, "blosc-zstd"),
        ({"lens": "some/lens", "hook": "resid_mid"}, "lens"),
    ]:
        with pytest.raises(SpecError, match=msg):
            CacheSpec().replace(**bad).validate()


def test_fingerprint_ignores_runtime_fields_only():
    base = CacheSpec()
    assert {"out", "batch_size", "device", "strict_text", "allow_nonfinite", "allow_out_of_range"} == RUNTIME_FIELDS
    runtime = base.replace(
        batch_size=9, out="x", device="cpu", strict_text=True, allow_nonfinite=True, allow_out_of_range=True
    )
    assert fingerprint(runtime.identity()) == fingerprint(base.identity())
    changes = [{"seed": 1}, {"tokens": 1}, {"dtype": "float32"}, {"dtype": "float8"}, {"layers": "1"}, {"context": 512}]
    for change in [*changes, {"special_tokens": "reference"}, {"special_tokens": "include-real"}]:
        assert fingerprint(base.replace(**change).identity()) != fingerprint(base.identity())


def test_fingerprints_of_existing_caches_are_stable():
    """Caches harvested before the special-token modes and the runtime-only flags were added keep their
    fingerprint (values computed with the code of that time), so they still resume; include-real is the
    same data as the old "include" and shares its fingerprint."""
    assert fingerprint(CacheSpec().identity()) == "c39377b261d67194"
    assert fingerprint(CacheSpec(special_tokens="include").identity()) == "95f433a19c868220"
    assert fingerprint(CacheSpec(special_tokens="include-real").identity()) == "95f433a19c868220"
    assert CacheSpec(special_tokens="include").validate().special_tokens == "include-real"


class FakeTokenizer:
    """Characters -> ids (a=10, b=11, ...); EOS 1, BOS 2."""

    eos_token_id, bos_token_id = 1, 2

    def __call__(self, texts, add_special_tokens=True):
        class Out:
            input_ids = [[10 + ord(c) - ord("a") for c in t] for t in texts]  # noqa: RUF012

        return Out()


def test_windows_eos_before_each_document_trailing_partial_dropped():
    docs = ["abc", "de", "fghij"]  # stream: 1 10 11 12 1 13 14 1 15 16 17 18 19
    w = make_windows(iter(docs), FakeTokenizer(), context=4, n_windows=3, prepend_bos=False)
    assert w.tolist() == [[1, 10, 11, 12], [1, 13, 14, 1], [15, 16, 17, 18]]
    with pytest.raises(DatasetError, match="holds only 13 tokens .3 windows of 4 = 12 tokens.*at most 12"):
        make_windows(iter(docs), FakeTokenizer(), context=4, n_windows=4, prepend_bos=False)


def test_windows_with_bos_hold_context_minus_one_text_tokens():
    docs = ["abc", "de", "fghij"]
    w = make_windows(iter(docs), FakeTokenizer(), context=4, n_windows=4, prepend_bos=True, batch_docs=1)
    assert w.tolist() == [[2, 1, 10, 11], [2, 12, 1, 13], [2, 14, 1, 15], [2, 16, 17, 18]]
    assert w.dtype == np.int32
