"""One way in: the run record and the cache an analysis (or an export) reads, checked by one rule.

`open_inputs(run, cache, purpose=..., heldout=...)` is how every analysis of a trained run opens its
inputs (analyze variance, reconstruction, delta-ce, prompt, resid --run, examples, report; train export).

The rule. The cache (default: the one the run was trained on) must hold vectors of the same space as the
run's training cache:
    - the same model: the model's identity recorded by the harvest (`meta["model"]["identity"]`: the
      weights' sha256 for a local folder, the GGUF's for an embedded model, the Hub id and revision),
      compared on the keys both identities have;
    - the same hook, the same tuned lens (its parameters' sha256, or none), the same width (d_model);
    - the run's layers among the cache's layers.
Another dataset or another harvest (token budget, storage dtype, chunking) of that model is allowed where
the analysis reports no held-out numbers (`heldout=False`: variance, prompt, resid, examples, export), and
the result names the cache it used. Where it does (`heldout=True`: reconstruction, delta CE, examples
--heldout, report), the held-out set is a list of positions in the training cache, which mean nothing in
another cache: only the training cache itself (the same fingerprint, wherever it lives now) is accepted.

Every refusal is one `CacheMismatchError` line (a `RunError`, so a `UserError`: exit 2 in the CLIs).

Runs trained before the model identity was recorded in their `CacheRef` are compared through their
training cache when it is still readable (the same fingerprint), else by model name, width and hook, with
a warning that the weights could not be compared.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harvest.errors import UserError
from train.record import CacheRef, RunError, RunRecord, load_run, short_error


class CacheMismatchError(RunError):
    """The cache given to an analysis does not hold the vectors the run was trained on."""


@dataclass
class RunInputs:
    """What an analysis of a trained run reads: its record and the cache it streams or takes metadata from."""

    record: RunRecord
    cache: Any  # harvest.cache.Cache
    trained_on: bool  # the run's own training cache (same fingerprint), not another harvest of its model

    def describe(self) -> str:
        """One line saying which cache is used, and how it relates to the training cache."""
        if self.trained_on:
            return f"cache {self.cache.path} (the run's training cache)"
        spec = self.cache.meta.get("spec") or {}
        return (
            f"cache {self.cache.path} (fingerprint {self.cache.fingerprint}: dataset {spec.get('dataset')!r}, "
            f"{self.cache.layout.n_tokens:,} tokens), another harvest of the run's model; the run was trained on "
            f"{self.record.cache.path} ({self.record.cache.fingerprint})"
        )


def open_inputs(
    run: str | Path | RunRecord,
    cache: str | Path | None = None,
    *,
    purpose: str,
    heldout: bool = False,
    require_sae: bool = True,
) -> RunInputs:
    """The run's record and `cache` (default: the run's training cache), checked by the module's rule.
    `purpose` names the analysis in messages; `heldout`: it reports numbers on the run's held-out set."""
    record = run if isinstance(run, RunRecord) else load_run(run, require_sae=require_sae)
    opened = _open(cache if cache is not None else record.cache.path, record, given=cache is not None)
    if opened.fingerprint == record.cache.fingerprint:
        _check_layers(record, opened, purpose)  # the same data; a cache upgraded in place keeps its layers
        return RunInputs(record, opened, trained_on=True)
    check_same_space(record, opened, purpose)
    if heldout:
        raise CacheMismatchError(
            f"{purpose} reports numbers on {record.dir}'s held-out windows, which are positions in its training "
            f"cache {record.cache.path} (fingerprint {record.cache.fingerprint}); {opened.path} is another harvest "
            f"(fingerprint {opened.fingerprint}) whose windows may have been trained on: pass the training cache "
            f"with --cache (or omit --cache)"
        )
    return RunInputs(record, opened, trained_on=False)


def _open(location: str | Path, record: RunRecord, given: bool) -> Any:
    from harvest import open_cache

    try:
        return open_cache(location)
    except UserError as e:
        if given:
            raise
        raise RunError(
            f"{record.dir}'s training cache {location} is not readable from here ({short_error(e)}): pass --cache "
            f"with its current location, or with another harvest of the same model"
        )


def model_of(cache: Any) -> dict[str, Any]:
    """What the cache says about its model and vector space (the parts the rule compares)."""
    meta = cache.meta
    model = meta.get("model") or {}
    lens = cache.lens_record
    return {
        "name": model.get("name"),
        "identity": json.loads(json.dumps(model.get("identity") or {})),
        "hook": (meta.get("spec") or {}).get("hook"),
        "lens": None if lens is None else lens.get("params_sha256"),
        "d_model": cache.layout.d_model,
    }


def check_same_space(record: RunRecord, cache: Any, purpose: str) -> None:
    """CacheMismatchError unless `cache` holds vectors of the space `record` was trained in (module doc)."""
    theirs, ref = model_of(cache), record.cache
    mine = _trained_model(record)
    what = f"{purpose}: {cache.path} is a cache of {theirs['name']!r}"
    trained = f"{record.dir} was trained on {mine['name']!r} ({ref.path})"
    fix = f"pass --cache with a harvest of {mine['name']!r} (or omit --cache for the run's own)"
    if theirs["d_model"] != record.sae.d_model:
        raise CacheMismatchError(
            f"{what} with d_model {theirs['d_model']}, but {trained} with d_model {record.sae.d_model}: {fix}"
        )
    if mine["identity"]:  # else (None or {}: an old record or cache that names its model only) by name, below
        shared = sorted(set(mine["identity"]) & set(theirs["identity"]))
        differ = [k for k in shared if mine["identity"][k] != theirs["identity"][k]]
        if differ or not shared:
            why = f"its {differ[0]} differs" if differ else "the two model identities share no field"
            raise CacheMismatchError(f"{what}, but {trained}: another model ({why}); {fix}")
    elif theirs["name"] != mine["name"]:
        raise CacheMismatchError(f"{what}, but {trained}: {fix}")
    if mine["hook"] is not None and theirs["hook"] != mine["hook"]:
        raise CacheMismatchError(f"{what} at hook {theirs['hook']!r}, but {trained} at hook {mine['hook']!r}: {fix}")
    if theirs["lens"] != mine["lens"]:
        lens = {None: "no tuned lens"}
        raise CacheMismatchError(
            f"{what} with {lens.get(theirs['lens'], 'tuned lens ' + str(theirs['lens'])[:12])}, but {trained} with "
            f"{lens.get(mine['lens'], 'tuned lens ' + str(mine['lens'])[:12])}: {fix} and the same --lens"
        )
    _check_layers(record, cache, purpose)


def _check_layers(record: RunRecord, cache: Any, purpose: str) -> None:
    missing = [l for l in record.layers if l not in cache.layers]
    if missing:
        raise CacheMismatchError(
            f"{purpose}: {cache.path} holds layers {list(cache.layers)}, not {record.dir}'s layer(s) {missing}: "
            f"pass --cache with a harvest of all of the run's layers {record.layers}"
        )


def _trained_model(record: RunRecord) -> dict[str, Any]:
    """The model and space of the run's training cache: from its CacheRef (new runs), else from that cache
    itself when still readable, else the record's name and hook alone (identity None, with a warning)."""
    ref: CacheRef = record.cache
    lens = None if ref.lens is None else ref.lens.get("params_sha256")
    if ref.model_identity is not None:
        return {"name": ref.model, "identity": ref.model_identity, "hook": ref.hook, "lens": lens}
    from harvest import open_cache

    try:
        trained = open_cache(ref.path)
        if trained.fingerprint == ref.fingerprint:
            return {**model_of(trained), "lens": lens}
    except UserError:
        pass
    print(
        f"warning: {record.dir} predates recorded model identities and its training cache {ref.path} is not "
        f"readable here: the cache's model is checked by name ({ref.model!r}), width and hook only, not by "
        f"its weights",
        file=sys.stderr,
    )
    return {"name": ref.model, "identity": None, "hook": ref.hook, "lens": lens}
