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
PLAIN=runs/quickstart/gemma-3-270m-sotu-mlsae-x8-k32
RUN=runs/lens/gemma-3-270m-sotu-lens-mlsae-x8-k32
[ -d "$PLAIN/analysis" ] || { echo "error: run scripts/quickstart.sh first (no $PLAIN/analysis)" >&2; exit 2; }
[ -f "$LENS/params.pt" ] || harvest lens train --out "$LENS"
harvest run --config cache_spec.yaml --lens "$LENS" --out caches/gemma-3-270m-sotu-lens
train run --config train_config.yaml --cache caches/gemma-3-270m-sotu-lens --out "$RUN"
analyze report --run "$RUN" --tokens 40960 --delta-ce-tokens 1024
analyze compare "$PLAIN/analysis" "$RUN/analysis" --label "no lens" --label "tuned lens" --out runs/lens/compare
