"""The poster's claims next to our numbers, generated from the typed results of one analysis folder.

Each row: the claim, the poster's number, ours, the reference code's formula where one exists (the
variance ratios: the reference computes them with formulas that are not proper variances, see
analyze.layers.reference_variance_terms), a verdict by a stated threshold, and what would change the
verdict. The thresholds are ours (the poster states none); they are written into the verdict text.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from analyze.results import Analyses, HeldOutCurve, MultiLayer, VarianceResult, format_value

VARIANCE_TENFOLD = 0.1  # "more than an order of magnitude smaller"
DIAGONAL_SIMILAR = 1.25  # MLSAE FVU / single-layer FVU on its own layer: "similar" up to 25% worse
POSTER_FVU = (0.081, 0.106)  # Pythia-70m .. 1b, R = 64, k = 32
POSTER_DELTA_CE = (0.404, 0.565)
FLAT = 0.02  # held-out FVU "has flattened": it fell by less than 2% over the last quarter of training


@dataclass
class Claim:
    claim: str
    poster: str
    ours: str
    reference: str  # the reference code's formula on the same SAE and tokens, "" where there is none
    verdict: str  # starts with "supported", "partly", "not supported", or "in range"/"outside range"
    would_change: str  # what would change the verdict

    def verdict_class(self) -> str:
        v = self.verdict
        return "ok" if v.startswith(("supported", "in range")) else "no" if v.startswith("not") else "meh"


def _f(v: float | None) -> str:
    return format_value(v)


def _training_note(curve: HeldOutCurve | None) -> str:
    if curve is None:
        return "no held-out curve recorded for this run"
    drop = curve.last_quarter_drop()
    if not math.isfinite(drop):
        return "held-out curve too short to tell whether training has converged"
    state = "has flattened" if drop < FLAT else "is still falling"
    return f"held-out FVU {state} ({drop:.1%} drop over the last quarter of training)"


def claims(a: Analyses) -> list[Claim]:
    """The claims whose numbers are present in `a`, in the poster's order."""
    rows: list[Claim] = []
    rec, var, dce, prompt, resid = a.reconstruction, a.variance, a.delta_ce, a.prompt, a.resid
    mlsae = rec.mlsae() if rec else None
    curve = next((c for c in a.training.curves if c.label == "MLSAE"), None) if a.training else None

    # 1. faithfulness
    if mlsae is not None:
        h = mlsae.held_out
        lo, hi = POSTER_FVU
        rows.append(
            Claim(
                "A multi-layer SAE reconstructs well (held-out FVU, mean over layers)",
                f"{lo}-{hi} (Pythia-70m..1b, R=64, k=32, 1B tokens)",
                f"{_f(h.fvu_mean)} (per-feature FVU {_f(h.fvu_feature_mean)}; {h.tokens:,} held-out tokens"
                + (", legacy split: their windows were partly trained on)" if rec.held_out_set.is_legacy else ")"),
                "",
                f"in range (<= {hi})" if h.fvu_mean <= hi else f"outside range (> {hi})",
                f"another model and budget than the poster's; {_training_note(curve)}",
            )
        )
    if rec is not None:
        c = rec.comparison_fvu
        if c.mlsae_over_diagonal_mean is not None:
            r = c.mlsae_over_diagonal_mean
            rows.append(
                Claim(
                    "MLSAE ~ single-layer SAE on that SAE's own layer (diagonal)",
                    "similar (Pythia-70m, 160m)",
                    f"MLSAE FVU / single-layer FVU = {_f(r)} (mean over layers with a single-layer SAE)",
                    "",
                    f"supported (ratio <= {DIAGONAL_SIMILAR})"
                    if r <= DIAGONAL_SIMILAR
                    else f"not supported (ratio > {DIAGONAL_SIMILAR})",
                    f"the ratio crossing {DIAGONAL_SIMILAR}: the MLSAE spreads its latents over every layer, so it "
                    f"needs more training than a single-layer SAE to match it; {_training_note(curve)}",
                )
            )
        if c.off_diagonal_compared:
            beats, n = c.mlsae_beats_off_diagonal, c.off_diagonal_compared
            rows.append(
                Claim(
                    "MLSAE better than single-layer SAEs on the other layers (off-diagonal)",
                    "better (Pythia-70m, 160m)",
                    f"beats the best other-layer SAE at {beats}/{n} layers",
                    "",
                    "supported" if beats == n else ("partly" if beats else "not supported"),
                    "a single-layer SAE that generalises to other layers better than the MLSAE at some layer",
                )
            )
    if dce is not None:
        lo, hi = POSTER_DELTA_CE
        v = dce.delta_ce_mean
        held = dce.window_source.held_out_token_fraction
        rows.append(
            Claim(
                "Splicing in reconstructions costs little loss (mean delta CE over layers)",
                f"{lo}-{hi} nats (Pythia)",
                f"{_f(v)} nats (clean CE {_f(dce.clean_ce)}; {dce.tokens:,} predictions in {dce.windows} "
                f"{dce.window_source.source} windows"
                + (f", held-out share of their tokens {_f(held)})" if held is not None else ")"),
                "",
                f"in range (<= {hi})" if v <= hi else f"outside range (> {hi})",
                f"lower FVU per feature (the spliced vector's error the model reads); {_training_note(curve)}",
            )
        )

    # 2. latents shared between layers across tokens, not within one token
    shared = [(var, "over the cache's tokens", f"{var.tokens:,} tokens")] if var else []
    shared += [(prompt, "one prompt", f"{prompt.n_tokens_used} tokens")] if prompt else []
    for res, where, n in shared:
        reference = res.reference.rel_var_t if isinstance(res, VarianceResult) and res.reference else None
        rows += _sharing_claims(where, res.multi_layer, res.variances.ratio_token, reference, n)

    # 3. residual geometry
    if resid is not None and resid.cosine_centered:
        cos = resid.cosine_centered
        mean = sum(cos) / len(cos)
        rows.append(
            Claim(
                "Adjacent layers' residuals are similar (cosine of layer-mean-centered vectors)",
                "high, rising with model size",
                f"mean {_f(mean)}, min {_f(min(cos))} over {len(cos)} pairs",
                "",
                "supported (mean > 0.5)" if mean > 0.5 else "not supported (mean <= 0.5)",
                "the mean over adjacent pairs crossing 0.5",
            )
        )
    if resid is not None and len(resid.norm_mean) > 1:
        norm = resid.norm_mean
        ups = sum(b > a for a, b in zip(norm, norm[1:]))
        grows = norm[-1] > norm[0] and ups >= (len(norm) - 1) / 2
        rows.append(
            Claim(
                "Residual norm grows with depth",
                "grows (roughly exponentially)",
                f"x{_f(norm[-1] / norm[0])} first to last layer; rises at {ups}/{len(norm) - 1} steps",
                "",
                "supported" if grows else "not supported",
                "the norm falling over more than half of the layer steps",
            )
        )
    return rows


def _sharing_claims(where: str, ml: MultiLayer, ratio: float, reference: float | None, n: str) -> list[Claim]:
    aggregated, per_token = ml.aggregated, ml.per_token_pooled
    rows = [
        Claim(
            f"Most latents fire at several layers over many tokens, fewer at one token ({where})",
            "aggregated over tokens: most; per token: fewer",
            f"at >= 2 layers: aggregated {_f(aggregated)} vs per token {_f(per_token)} ({n})",
            "",
            ("supported" if aggregated > 0.5 else "partly (aggregated <= 0.5)")
            if aggregated > per_token
            else "not supported (per token >= aggregated)",
            "the per-token fraction reaching the aggregated one, or the aggregated one falling to 0.5",
        )
    ]
    if math.isfinite(ratio):
        if ratio < VARIANCE_TENFOLD:
            verdict = f"supported (< {VARIANCE_TENFOLD})"
        elif ratio < 1:
            verdict = f"partly: below 1, not below {VARIANCE_TENFOLD}"
        else:
            verdict = "not supported"
        change = f"a proper ratio below {VARIANCE_TENFOLD} (now {_f(ratio)})"
        if reference is not None and math.isfinite(reference):
            change += f"; the reference code's formula gives {_f(reference)}" + (
                ", i.e. it reproduces the claim where the proper variance does not"
                if reference < VARIANCE_TENFOLD <= ratio
                else ""
            )
        rows.append(
            Claim(
                f"The layer index varies >10x less within a token: E[Var(L|J,T)]/E[Var(L|J)] ({where})",
                "<< 1 (more than an order of magnitude)",
                f"{_f(ratio)} ({n})",
                "" if reference is None else f"{_f(reference)} (not a proper variance)",
                verdict,
                change,
            )
        )
    return rows
