#!/usr/bin/env bash
# Fresh machine -> lint + format check + the whole test suite (tiny random models, plus the real
# embedded Gemma 3 270M).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
ruff format --check --quiet . || { echo "ruff format: run 'ruff format .' to fix the files above" >&2; exit 1; }
ruff check --quiet .
python -m pytest -q "$@"
