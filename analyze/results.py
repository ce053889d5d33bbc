"""Typed results of every analysis: one dataclass per analysis, saved as JSON and loaded back.

The analyses (analyze/layers.py, reconstruction.py, delta_ce.py, geometry.py, prompt.py, examples.py)
RETURN these types and write them with `save(folder)`; the report, the claims table and `analyze
compare` read them with `load(folder)` and use their fields by name. So renaming a field is a change
the type checker and the tests see (an AttributeError in the report, a failed load of an old file),
never a report row that silently disappears, as it was when the report searched JSON keys.

JSON layout: {"kind": "variance", "version": 2, <the fields>}. Version 1 was the untyped JSON written
before these types (no "kind"): such files are refused with one line telling which command rewrites
them. Loading is strict: a missing or unknown field, or a value of the wrong type, is a one-line
`ResultError` naming the file and the field, never a half-read result. NaN and infinities are written
as null (standard JSON) and read back as NaN where the field is a float.
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal, TypeVar, Union

from harvest.atomic import atomic_write_json
from harvest.errors import UserError
from train.evaluate import EvalResult
from train.split import HeldOut

VERSION = 2  # 1 = the untyped JSON of the analyses before this module
R = TypeVar("R", bound="Result")


class ResultError(UserError):
    """An analysis file is missing, unreadable, of an older version, or not of the expected kind."""


# ---------------------------------------------------------------------------------------------
# JSON <-> dataclass (strict, by the declared field types)


def to_jsonable(x: Any) -> Any:
    """Dataclasses -> dicts (field order), Paths -> str, NaN/inf -> None, recursively."""
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        return {f.name: to_jsonable(getattr(x, f.name)) for f in dataclasses.fields(x)}
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, Path):
        return str(x)
    if isinstance(x, dict):
        return {str(k): to_jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [to_jsonable(v) for v in x]
    return x


class _Mismatch(Exception):
    """Internal: a JSON value does not fit the declared type (message = what was wrong, where)."""


def from_jsonable(hint: Any, x: Any, where: str = "") -> Any:
    """A JSON value as a value of type `hint` (dataclasses, lists, dicts, Optional, Literal, scalars)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return x
    if origin in (Union, types.UnionType):
        if x is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        errors = []
        for a in inner:
            try:
                return from_jsonable(a, x, where)
            except _Mismatch as e:
                errors.append(str(e))
        raise _Mismatch(errors[0])
    if origin is Literal:
        if x not in args:
            raise _Mismatch(f"{where or 'value'} = {x!r} is not one of {', '.join(map(repr, args))}")
        return x
    if origin is list:
        if not isinstance(x, list):
            raise _Mismatch(f"{where or 'value'} should be a list, got {type(x).__name__}")
        return [from_jsonable(args[0], v, f"{where}[{i}]") for i, v in enumerate(x)]
    if origin is dict:
        if not isinstance(x, dict):
            raise _Mismatch(f"{where or 'value'} should be a mapping, got {type(x).__name__}")
        return {k: from_jsonable(args[1], v, f"{where}.{k}") for k, v in x.items()}
    if dataclasses.is_dataclass(hint):
        return _dataclass_from(hint, x, where)
    if hint is float:
        if x is None:
            return math.nan
        if isinstance(x, (int, float)) and not isinstance(x, bool):
            return float(x)
    elif hint is int:
        if isinstance(x, int) and not isinstance(x, bool):
            return x
    elif hint in (str, bool):
        if isinstance(x, hint):
            return x
    else:
        raise _Mismatch(f"{where}: unsupported field type {hint!r}")
    raise _Mismatch(f"{where or 'value'} = {x!r} should be of type {hint.__name__}")


def _dataclass_from(cls: type, x: Any, where: str) -> Any:
    if not isinstance(x, dict):
        raise _Mismatch(f"{where or 'value'} should be a mapping, got {type(x).__name__}")
    renamed = getattr(cls, "RENAMED", {})  # a class's {old field name: today's}, for files written before
    x = {renamed.get(k, k): v for k, v in x.items()}
    hints = typing.get_type_hints(cls)
    fields = [f for f in dataclasses.fields(cls) if f.init]
    names = {f.name for f in fields}
    unknown = sorted(set(x) - names)
    if unknown:
        raise _Mismatch(f"unknown field {where + '.' if where else ''}{unknown[0]}")
    kwargs = {}
    for f in fields:
        path = f"{where}.{f.name}" if where else f.name
        if f.name in x:
            kwargs[f.name] = from_jsonable(hints[f.name], x[f.name], path)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise _Mismatch(f"missing field {path}")
    return cls(**kwargs)


# ---------------------------------------------------------------------------------------------
# the base of every result


@dataclass(frozen=True)
class Headline:
    """One headline number of a result: what the report's summary tables and `analyze compare` show."""

    label: str
    value: float | int | str | None


@dataclass(kw_only=True)
class Result:
    """Base of the typed results (dataclasses). A subclass names its kind (its file in an analysis folder
    is <kind>.json), the command that writes it (for the 'rerun' message) and its section title, and
    lists its headline numbers:

        @dataclass
        class ResidResult(Result, kind="resid", command="analyze resid", title="Residual-stream geometry"):
    """

    KIND: ClassVar[str]
    FILE: ClassVar[str]
    COMMAND: ClassVar[str]
    TITLE: ClassVar[str]

    files: list[str] = field(default_factory=list)  # what the analysis wrote into its folder
    figures: list[str] = field(default_factory=list)  # its PNGs, in that folder
    definitions: dict[str, str] = field(default_factory=dict)  # of its quantities, for the reader

    def __init_subclass__(cls, kind: str, command: str, title: str, **kw: Any) -> None:
        super().__init_subclass__(**kw)
        cls.KIND, cls.FILE, cls.COMMAND, cls.TITLE = kind, f"{kind}.json", command, title

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.KIND, "version": VERSION, **to_jsonable(self)}

    @classmethod
    def from_json(cls: type[R], data: Any, source: str = "") -> R:
        where = source or cls.FILE
        if not isinstance(data, dict):
            raise ResultError(f"{where} is not a JSON object: rerun `{cls.COMMAND}` to rewrite it")
        if "kind" not in data:
            raise ResultError(
                f"{where} was written by an older version of the analyses (untyped JSON): rerun `{cls.COMMAND}` "
                f"to rewrite it"
            )
        if data["kind"] != cls.KIND:
            raise ResultError(f"{where} holds a {data['kind']!r} result, not {cls.KIND!r}: pass the right file")
        if data.get("version") != VERSION:
            newer = isinstance(data.get("version"), int) and data["version"] > VERSION
            raise ResultError(
                f"{where} is of result version {data.get('version')!r}, this code reads version {VERSION}: "
                + ("update mlsae-cache" if newer else f"rerun `{cls.COMMAND}` to rewrite it")
            )
        body = {k: v for k, v in data.items() if k not in ("kind", "version")}
        try:
            return _dataclass_from(cls, body, "")
        except _Mismatch as e:
            raise ResultError(f"{where}: {e}: rerun `{cls.COMMAND}` to rewrite it") from None

    def save(self, folder: str | Path) -> Path:
        """Write <folder>/<FILE> atomically; returns its path."""
        path = Path(folder) / self.FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(path, self.to_json())
        return path

    @classmethod
    def path_in(cls, folder: str | Path) -> Path:
        return Path(folder) / cls.FILE

    @classmethod
    def load(cls: type[R], folder: str | Path) -> R:
        """The result saved in `folder` (or the file itself); ResultError in one line otherwise."""
        path = Path(folder)
        path = path / cls.FILE if path.is_dir() else path
        if not path.is_file():
            raise ResultError(f"{path} not found: run `{cls.COMMAND}` first (or pass the folder it wrote)")
        try:
            data = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ResultError(f"{path} is not readable JSON ({str(e).splitlines()[0]}): rerun `{cls.COMMAND}`")
        return cls.from_json(data, str(path))

    @classmethod
    def load_if_present(cls: type[R], folder: str | Path) -> R | None:
        return cls.load(folder) if cls.path_in(folder).is_file() else None

    def headlines(self) -> list[Headline]:
        raise NotImplementedError


def format_value(v: Any) -> str:
    """How the report and `analyze compare` print a headline value: ints with separators, floats to 4
    significant digits (scientific outside [1e-3, 1e5)), '-' for missing or NaN."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        return f"{v:.4g}" if v == 0 or not math.isfinite(v) or 1e-3 <= abs(v) < 1e5 else f"{v:.3e}"
    return str(v)


def lens_name(lens: dict[str, Any] | None) -> str:
    """The tuned lens a result's vectors went through, in words ('none' without one)."""
    return "none" if lens is None else str(lens.get("source", "unnamed lens"))


def _mean(xs: list[float]) -> float:
    finite = [x for x in xs if math.isfinite(x)]
    return sum(finite) / len(finite) if finite else math.nan


# ---------------------------------------------------------------------------------------------
# layer distributions and variance ratios (analyze variance; analyze/layers.py)


@dataclass
class LayerVariances:
    """The variances of the layer index (docs/method.md Sec. 4) and the two ratios (NaN where undefined)."""

    var_l: float  # Var(L) over all activation mass
    exp_var_l_given_j: float  # E[Var(L|J)]
    exp_var_l_given_jt: float  # E[Var(L|J,T)]
    ratio_latent: float  # E[Var(L|J)] / Var(L)
    ratio_token: float  # E[Var(L|J,T)] / E[Var(L|J)]


@dataclass
class MultiLayer:
    """Fractions of latents active at more than one layer, per token and aggregated over tokens."""

    per_token_mean: float
    per_token_pooled: float
    aggregated: float
    active_latents: int
    multi_layer_latents: int
    active_tokens: int
    mean_active_latents_per_token: float


REFERENCE_LABEL = (
    "reference code's formulas: NOT proper variances (the first ratio is ~1 for any data); comparison only"
)


@dataclass
class ReferenceFormulas:
    """The reference code's variance formulas (tim-lawson/mlsae, mlsae/analysis/variances.py), averaged over
    batches as it does. Not proper variances: see analyze.layers.reference_variance_terms."""

    exp_var_l_f: float
    exp_var_l_tf: float
    var_l: float
    rel_var_f: float  # its "E[Var(L|J)] / Var(L)"
    rel_var_t: float  # its "E[Var(L|J,T)] / E[Var(L|J)]"
    batches: int
    batch_tokens: int
    tokens: int
    source: str
    label: str = REFERENCE_LABEL
    # the tokens its batches held, in words ("" in results written before this was recorded: shuffled batches)
    tokens_seen: str = ""


@dataclass
class VarianceResult(
    Result, kind="variance", command="analyze variance", title="Latents over layers: distributions and variance ratios"
):
    tokens: int  # kept tokens streamed
    tokens_requested: int
    layers: list[int]  # the model's layer numbers of layer positions 0..L-1
    n_latents: int
    k: int
    variances: LayerVariances
    multi_layer: MultiLayer
    reference: ReferenceFormulas | None  # with --reference-formulas, from the same stream
    special_tokens: str  # how special tokens were treated (the run's mode)
    sae: str
    cache: str
    cache_fingerprint: str
    lens: dict[str, Any] | None
    seed: int
    device: str
    world_size: int
    seconds: float
    tokens_per_s: float

    def headlines(self) -> list[Headline]:
        v, ml, ref = self.variances, self.multi_layer, self.reference
        rows = [
            Headline("tokens", self.tokens),
            Headline("Var(L)", v.var_l),
            Headline("E[Var(L|J)] / Var(L)", v.ratio_latent),
            Headline("E[Var(L|J,T)] / E[Var(L|J)]", v.ratio_token),
            Headline("latents active at >= 2 layers: per token (pooled)", ml.per_token_pooled),
            Headline("latents active at >= 2 layers: aggregated over tokens", ml.aggregated),
        ]
        if ref is not None:
            rows += [
                Headline("E[Var(L|J)] / Var(L), reference formula (not a variance)", ref.rel_var_f),
                Headline("E[Var(L|J,T)] / E[Var(L|J)], reference formula (not a variance)", ref.rel_var_t),
            ]
        return rows


# ---------------------------------------------------------------------------------------------
# reconstruction: held-out metrics and the layer x layer FVU matrix (analyze/reconstruction.py)


@dataclass
class RunReconstruction:
    """One SAE of the comparison: train's held-out evaluation (EvalResult, docs/format.md) on its own layers,
    and on every layer of the matrix (its row)."""

    label: str  # 'MLSAE' or 'L<l>' (+ the folder name where two runs share a label)
    run: str
    trained_layers: list[int]
    multi_layer: bool
    n_latents: int
    k: int
    held_out: EvalResult  # on the layers it was trained on
    matrix: EvalResult  # on every column layer (ReconstructionResult.layers)


@dataclass
class LayerComparison:
    layer: int
    mlsae: float | None
    diagonal: float | None  # the single-layer SAE trained on this layer
    off_diagonal_best: float | None  # the best single-layer SAE trained on another layer
    off_diagonal_layer: int | None


@dataclass
class Comparison:
    """The paper's claim, per layer: MLSAE ~ diagonal single-layer SAE, better than the off-diagonal ones."""

    mlsae: str | None
    per_layer: list[LayerComparison]
    mlsae_over_diagonal_mean: float | None
    mlsae_beats_off_diagonal: int
    off_diagonal_compared: int


@dataclass
class ReconstructionResult(
    Result,
    kind="reconstruction",
    command="analyze reconstruction",
    title="Reconstruction: held-out metrics per layer, layer x layer FVU matrix",
):
    cache: str
    fingerprint: str
    model: str
    lens: dict[str, Any] | None
    held_out_set: HeldOut  # the first run's held-out set (train/split.py), limited to --tokens
    tokens: int
    special_tokens: str
    layers: list[int]  # the matrix's columns
    runs: list[RunReconstruction]  # the matrix's rows
    comparison_fvu: Comparison
    comparison_fvu_feature: Comparison

    @property
    def rows(self) -> list[str]:
        return [r.label for r in self.runs]

    @property
    def fvu_matrix(self) -> list[list[float]]:
        return [r.matrix.fvu for r in self.runs]

    @property
    def fvu_feature_matrix(self) -> list[list[float]]:
        return [r.matrix.fvu_feature for r in self.runs]

    def mlsae(self) -> RunReconstruction | None:
        return next((r for r in self.runs if r.multi_layer), None)

    def headlines(self) -> list[Headline]:
        c = self.comparison_fvu
        rows = [
            Headline("held-out tokens", self.tokens),
            Headline("MLSAE FVU / diagonal single-layer FVU (mean over layers)", c.mlsae_over_diagonal_mean),
            Headline("layers where the MLSAE beats the best off-diagonal SAE", c.mlsae_beats_off_diagonal),
            Headline("layers compared off-diagonal", c.off_diagonal_compared),
        ]
        for r in self.runs:
            h = r.held_out
            rows += [
                Headline(f"{r.label}: held-out FVU, mean over layers", h.fvu_mean),
                Headline(f"{r.label}: held-out per-feature FVU, mean over layers", h.fvu_feature_mean),
                Headline(f"{r.label}: L0, mean over layers", _mean(h.l0)),
                Headline(
                    f"{r.label}: never fires at a layer on held-out tokens, mean over layers",
                    _mean(h.silent_on_heldout),
                ),
                Headline(f"{r.label}: never fires at any layer on held-out tokens", h.silent_on_heldout_all_layers),
                Headline(f"{r.label}: firing density, mean over layers", _mean(h.firing_density)),
            ]
        return rows


# ---------------------------------------------------------------------------------------------
# training curves: held-out FVU against training tokens (the run folders' heldout.csv, from train)


@dataclass
class HeldOutCurve:
    label: str
    run: str
    layers: list[int]
    tokens: list[int]  # training tokens at each evaluation
    fvu_mean: list[float]
    fvu_feature_mean: list[float]
    fvu: list[list[float]]  # per evaluation, per layer

    def last_quarter_drop(self) -> float:
        """Relative decrease of fvu_mean over the last quarter of the training tokens (0 = flat)."""
        if len(self.tokens) < 2:
            return math.nan
        cut = self.tokens[-1] - (self.tokens[-1] - self.tokens[0]) / 4
        i = min(i for i, t in enumerate(self.tokens) if t >= cut)
        i = min(i, len(self.tokens) - 2)
        a, b = self.fvu_mean[i], self.fvu_mean[-1]
        return (a - b) / a if a else math.nan


@dataclass
class TrainingResult(
    Result, kind="training", command="analyze report", title="Training: held-out FVU against training tokens"
):
    curves: list[HeldOutCurve]

    def headlines(self) -> list[Headline]:
        rows = []
        for c in self.curves:
            rows += [
                Headline(f"{c.label}: training tokens at the last evaluation", c.tokens[-1] if c.tokens else None),
                Headline(f"{c.label}: held-out FVU at the last evaluation", c.fvu_mean[-1] if c.fvu_mean else None),
                Headline(f"{c.label}: relative FVU drop over the last quarter of training", c.last_quarter_drop()),
            ]
        return rows


# ---------------------------------------------------------------------------------------------
# delta CE and KL (analyze/delta_ce.py)


@dataclass
class WindowSource:
    """Which context windows delta CE ran on."""

    source: Literal["heldout", "dataset"]  # the run's held-out windows of the cache | fresh text
    windows: list[int]  # cache window indices ([] for a dataset)
    dataset: str | None
    held_out_token_fraction: float | None  # of the chosen windows' tokens (cache windows)
    fully_held_out_windows: int | None


DELTA_CE_BASELINES = {  # what delta CE and KL compare with (DeltaCeResult.baseline)
    "clean": "the clean model",
    "zeroed-special": "the model with the special positions zeroed at that layer (reference)",
}


@dataclass
class DeltaCeResult(
    Result, kind="delta_ce", command="analyze delta-ce", title="Downstream loss: delta CE and KL per layer"
):
    run: str
    model: str
    cache: str
    hook: str
    lens: dict[str, Any] | None
    layers: list[int]
    tokens: int  # predictions counted
    clean_ce: float
    ce: list[float]
    delta_ce: list[float]
    kl: list[float]
    delta_ce_mean: float
    kl_mean: float
    windows: int
    context: int
    positions: int
    special_tokens: str
    window_source: WindowSource
    seconds: float
    # what delta CE and KL compare with: "clean" (the clean model) or "zeroed-special" (special-token mode
    # reference: the model with the special positions zeroed at the spliced layer, as the reference code)
    baseline: str = "clean"
    baseline_ce: list[float] | None = None  # per layer, where the baseline is not the clean model

    def headlines(self) -> list[Headline]:
        return [
            Headline("mean delta CE (nats)", self.delta_ce_mean),
            Headline("mean KL (nats)", self.kl_mean),
            Headline("clean CE (nats)", self.clean_ce),
            Headline("predictions", self.tokens),
            Headline("held-out share of the windows' tokens", self.window_source.held_out_token_fraction),
        ]


# ---------------------------------------------------------------------------------------------
# residual geometry and decoder MMCS (analyze/geometry.py)


@dataclass
class ResidResult(Result, kind="resid", command="analyze resid", title="Residual-stream geometry"):
    cache: str
    model: str | None
    hook: str | None
    lens: dict[str, Any] | None
    tokens: int
    layers: list[int]
    pairs: list[list[int]]  # consecutive cached layers (l, l')
    cosine_centered: list[float]
    cosine_uncentered: list[float]
    norm_mean: list[float]
    norm_growth: float | None  # last / first layer

    def headlines(self) -> list[Headline]:
        return [
            Headline("tokens", self.tokens),
            Headline("adjacent-layer cosine (centered), mean over pairs", _mean(self.cosine_centered)),
            Headline("norm growth (last / first layer)", self.norm_growth),
        ]


@dataclass
class MmcsResult(Result, kind="mmcs", command="analyze resid --sae RUN", title="Decoder: mean max cosine similarity"):
    sae: str
    n_latents: int
    mmcs: float
    max_cosine_quantiles: dict[str, float]

    def headlines(self) -> list[Headline]:
        return [Headline("MMCS of the decoder", self.mmcs)]


# ---------------------------------------------------------------------------------------------
# one prompt (analyze/prompt.py)


@dataclass
class TopLatent:
    latent: int
    activation: float  # summed over layers
    layers: list[int]
    values: list[float]


@dataclass
class PromptToken:
    pos: int
    id: int
    text: str
    special: bool  # shown, left out of every statistic
    n_active: int
    n_multi: int
    top: list[TopLatent]


@dataclass
class PromptLatents:
    """The latents active in the prompt, sorted by E[L|J] of the prompt's activation mass."""

    ids: list[int]
    mean_layer: list[float]
    var_layer: list[float]
    n_layers: list[int]


@dataclass
class PromptResult(
    Result, kind="prompt", command="analyze prompt", title="One prompt: which latents fire at which layers"
):
    text: str
    sae: str
    cache: str
    model: str
    hook: str
    lens: dict[str, Any] | None
    prepend_bos: bool
    n_latents: int
    k: int
    layers: list[int]
    n_tokens: int
    n_tokens_used: int
    variances: LayerVariances
    multi_layer: MultiLayer
    tokens: list[PromptToken]
    latents: PromptLatents

    def headlines(self) -> list[Headline]:
        return [
            Headline("tokens used (special excluded)", self.n_tokens_used),
            Headline("latents active at >= 2 layers: per token (pooled)", self.multi_layer.per_token_pooled),
            Headline("latents active at >= 2 layers: aggregated over the prompt", self.multi_layer.aggregated),
            Headline("E[Var(L|J,T)] / E[Var(L|J)] (this prompt)", self.variances.ratio_token),
        ]


# ---------------------------------------------------------------------------------------------
# top activating examples and the latent browser (analyze/examples.py, analyze/browser.py: `latents`)


@dataclass
class ExamplesSummary(
    Result, kind="latent_browser", command="analyze report", title="Top activating examples and the latent browser"
):
    """Where the report finds `analyze examples`' latent browser (and, where that analysis fills them, its
    numbers); latent_browser.json in the analysis folder."""

    sae: str
    browser: str  # the browser's index.html, relative to the analysis folder
    tokens: int | None = None  # tokens scanned
    latents: int | None = None  # latents that fired
    examples_per_latent: int | None = None

    def headlines(self) -> list[Headline]:
        return [Headline("latents with examples", self.latents), Headline("latent browser", self.browser)]


# ---------------------------------------------------------------------------------------------
# provenance: the cache and the runs behind a report (written by `analyze report`)


@dataclass
class CacheInfo:
    path: str
    model: str
    dataset: str
    tokens: int
    context: int
    layers: list[int]
    d_model: int
    dtype: str
    hook: str
    special_tokens: str
    prepend_bos: bool
    lens: str
    fingerprint: str


@dataclass
class RunInfo:
    folder: str
    label: str
    layers: list[int]
    n_latents: int
    k: int
    steps: int | None
    train_tokens: int | None  # tokens trained on (one vector per layer each)
    special_tokens: str
    held_out: str  # how the held-out set was chosen, in words


@dataclass
class Provenance(Result, kind="provenance", command="analyze report", title="Provenance"):
    cache: CacheInfo | None  # None where the cache is no longer readable at its recorded path
    runs: list[RunInfo]
    created: str  # UTC time of the report

    def headlines(self) -> list[Headline]:
        c = self.cache
        rows = [
            Headline("model", c.model if c else None),
            Headline("dataset", c.dataset if c else None),
            Headline("cache tokens", c.tokens if c else None),
        ]
        for r in self.runs:
            rows.append(Headline(f"{r.label}: training tokens", r.train_tokens))
        return rows


# ---------------------------------------------------------------------------------------------
# an analysis folder


RESULT_TYPES: tuple[type[Result], ...] = (
    Provenance,
    VarianceResult,
    ReconstructionResult,
    TrainingResult,
    DeltaCeResult,
    ResidResult,
    MmcsResult,
    PromptResult,
    ExamplesSummary,
)


@dataclass
class Analyses:
    """Every typed result found in one analysis folder (None where that analysis was not run)."""

    folder: Path
    provenance: Provenance | None = None
    variance: VarianceResult | None = None
    reconstruction: ReconstructionResult | None = None
    training: TrainingResult | None = None
    delta_ce: DeltaCeResult | None = None
    resid: ResidResult | None = None
    mmcs: MmcsResult | None = None
    prompt: PromptResult | None = None
    latent_browser: ExamplesSummary | None = None

    def present(self) -> list[Result]:
        """The results found, in the report's order."""
        return [r for r in (getattr(self, t.KIND) for t in RESULT_TYPES) if r is not None]

    def lens(self) -> str:
        """The tuned lens the analysed vectors went through, from the first result that records one."""
        for r in (self.variance, self.reconstruction, self.delta_ce, self.resid, self.prompt):
            if r is not None:
                return lens_name(r.lens)
        return self.provenance.cache.lens if self.provenance and self.provenance.cache else "unknown"


def load_analyses(folder: str | Path) -> Analyses:
    """The typed results in `folder`; ResultError (one line) for a file that is unreadable or older."""
    folder = Path(folder)
    return Analyses(folder, **{t.KIND: t.load_if_present(folder) for t in RESULT_TYPES})
