#!/usr/bin/env bash
# Issue 19's convergence run (docs/convergence.md): the million-token cache of scripts/scale_run.sh, the
# MLSAE of the scale run (R = 8, k = 32, 2,048 tokens per step, lr 5e-4) trained to 4,194,304 tokens with
# snapshots at 0.25M, 0.5M, 1M and 2M training tokens, then `analyze convergence`: held-out FVU and both
# variance ratios (proper and the reference code's formulas) at each point, a table and a figure.
# The held-out curve (heldout.csv) says whether the FVU flattened (< 2% drop over the last quarter).
# Cost on a 2-core CPU: ~3.5 h harvest (24.2 GB), ~5-6 h training, ~40 min per point for the ratios over
# the million tokens (set MLSAE_CONVERGENCE_TOKENS lower to measure them on fewer tokens); minutes on a GPU.
# Every stage resumes where it stopped: rerun after a kill.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1}
C=${MLSAE_SCALE_CACHE:-caches/gemma-3-270m-sotu-1m}
R=${MLSAE_CONVERGENCE_OUT:-runs/convergence/mlsae}
harvest run --spec cache_spec.yaml --tokens 1048576 --out "$C"
train run --cache "$C" --layers all --expansion-factor 8 -k 32 --tokens 4194304 --batch-tokens 2048 --lr 5e-4 \
  --dead-tokens 250000 --eval-tokens 65536 --eval-every 64 --checkpoint-every 64 --log-every 16 \
  --snapshot-tokens 262144,524288,1048576,2097152 --out "$R"
analyze convergence --sae "$R" --tokens "${MLSAE_CONVERGENCE_TOKENS:-1048576}"
