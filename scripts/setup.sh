#!/usr/bin/env bash
# Create .venv (once) and install the project into it. Idempotent; safe to rerun.
# torch: where `nvidia-smi` sees a GPU, the normal (CUDA) build; otherwise torch==2.13.0, which these
# machines serve as a local CPU wheel. Override with MLSAE_TORCH="torch==X ..." (pip arguments).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
# shellcheck disable=SC1091
. .venv/bin/activate
if ! python -c "import torch" 2>/dev/null; then
  if [ -n "${MLSAE_TORCH:-}" ]; then
    python -m pip install $MLSAE_TORCH
  elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    python -m pip install torch
  else
    python -m pip install "torch==2.13.0"
  fi
fi
python -m pip install -q -e ".[test]"
