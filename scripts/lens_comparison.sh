#!/usr/bin/env bash
# The poster's with/without tuned lens comparison at quickstart scale, on the embedded defaults: train a
# tuned lens for Gemma 3 270M, harvest the quickstart's cache again through it, train the same MLSAE on
# it, analyze it, and put its headline numbers next to the quickstart's (no lens). Run after
# scripts/quickstart.sh; every step resumes or is skipped when its output is already there.
set -euo pipefail
cd "$(dirname "$0")/.."
. .venv/bin/activate
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1}
LENS=lenses/gemma-3-270m-sotu
PLAIN=runs/quickstart/quickstart-mlsae-x8-k32
RUN=runs/lens/quickstart-lens-mlsae-x8-k32
QS_TOKENS=${QS_TOKENS:-20480} QS_TRAIN=${QS_TRAIN:-49152} QS_HELDOUT=${QS_HELDOUT:-4096}  # the quickstart's budgets
[ -d "$PLAIN/analysis" ] || { echo "error: run scripts/quickstart.sh first (no $PLAIN/analysis)" >&2; exit 2; }
[ -f "$LENS/params.pt" ] || harvest lens train --out "$LENS"
harvest run --config cache_spec.yaml --lens "$LENS" --tokens "$QS_TOKENS" --out caches/quickstart-lens
train run --config train_config.yaml --cache caches/quickstart-lens --tokens "$QS_TRAIN" --eval-tokens "$QS_HELDOUT" \
  --out "$RUN"
analyze report --run "$RUN" --tokens "$QS_TOKENS" --delta-ce-tokens 1024
analyze compare "$PLAIN/analysis" "$RUN/analysis" --label "no lens" --label "tuned lens" --out runs/lens/compare
