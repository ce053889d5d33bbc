#!/usr/bin/env bash
# Fresh machine -> the whole test suite (tiny random models, plus the real embedded Gemma 3 270M).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
python -m pytest -q "$@"
