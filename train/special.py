"""Special tokens (BOS/EOS/PAD) in training and analyses: one named mode per choice (docs/method.md Sec. 1).

    exclude       the SAE never sees them: dropped from training, every metric and every analysis
    reference     BOS/EOS/PAD vectors are replaced by ZEROS and kept in the loss and every metric, as the
                  reference code does (its Transformer zeroes them before the SAE); every other token,
                  other tokenizer specials (unk, mask, ...) included, is kept with its real vector
    include-real  their real vectors are kept (Gemma's BOS reaches ~1e5 in one dimension)
    cache         follow the cache: its `keep` mask and the vectors it stores (harvest's
                  --special-tokens exclude | reference | include-real, `include` in old caches)

A cache harvested with `reference` stores zeros at special positions, so `include-real` cannot be
recovered from it (refused); every other combination works on any cache: special positions are found
by token id (the cache's tokenizer record), whatever the cache's `keep` says about them. Caches harvested
in `reference` mode before it zeroed only BOS/EOS/PAD hold zeros at every tokenizer special id.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

from harvest.errors import SpecError
from harvest.text import special_token_ids


def _isin(token_ids: Tensor, ids: tuple[int, ...]) -> Tensor:
    return torch.isin(token_ids.to(torch.int64), torch.tensor(ids, dtype=torch.int64, device=token_ids.device))


SpecialTokensMode = Literal["cache", "exclude", "reference", "include-real"]
# what a cache holds at special positions, by harvest's --special-tokens (`include`: caches before `reference`)
HARVESTED = {"exclude": "exclude", "include": "include-real", "include-real": "include-real", "reference": "reference"}


@dataclass(frozen=True)
class SpecialTokens:
    mode: str  # the effective mode: exclude | reference | include-real
    ids: tuple[int, ...]  # every special token id of the tokenizer
    zeroed: tuple[int, ...] = ()  # reference mode: the ids whose vectors are zeroed (BOS/EOS/PAD)

    @classmethod
    def of(cls, mode: str, cache: Any) -> SpecialTokens:
        """`mode` (any SpecialTokensMode) resolved against what `cache` stores."""
        harvested = cache.meta.get("spec", {}).get("special_tokens", "exclude")
        stored = HARVESTED.get(harvested, "exclude")
        effective = stored if mode == "cache" else mode
        if effective not in ("exclude", "reference", "include-real"):
            raise SpecError(f"special_tokens = {mode!r}: use cache, exclude, reference or include-real")
        if effective == "include-real" and stored == "reference":
            raise SpecError(
                f"cache {cache.path} stores zeros at special tokens (harvested with --special-tokens reference): "
                f"train with --special-tokens reference or exclude, or harvest with include-real"
            )
        tok = cache.meta.get("tokenizer", {})
        zeroed = special_token_ids(tok, "reference") if effective == "reference" else []
        return cls(effective, tuple(special_token_ids(tok, "exclude")), tuple(zeroed))

    def is_special(self, token_ids: Tensor) -> Tensor:
        """[n] bool: any tokenizer special id."""
        return _isin(token_ids, self.ids)

    def is_zeroed(self, token_ids: Tensor) -> Tensor:
        """[n] bool: the positions whose vectors are zeros in reference mode (BOS/EOS/PAD)."""
        return _isin(token_ids, self.zeroed)

    def usable(self, keep: Tensor, token_ids: Tensor) -> Tensor:
        """[n] bool: the tokens an SAE sees (before any held-out filtering). Reference mode and
        include-real: every token (a cache harvested with exclude stores real vectors with keep=False)."""
        special = self.is_special(token_ids)
        return keep & ~special if self.mode == "exclude" else keep | special

    def vectors(self, acts: Tensor, token_ids: Tensor) -> Tensor:
        """The vectors [L, n, d] an SAE sees for tokens `token_ids` [n]: zeros at BOS/EOS/PAD in
        `reference` mode (in place: pass a copy), unchanged otherwise."""
        if self.mode == "reference":
            special = self.is_zeroed(token_ids).to(acts.device)
            if bool(special.any()):
                acts[:, special] = 0
        return acts
