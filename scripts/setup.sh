#!/usr/bin/env bash
# Create .venv (once) and install the project into it with the exact versions the test suite passed with
# (requirements/lock.txt, applied as pip constraints). Idempotent; safe to rerun.
# torch: where `nvidia-smi` sees a GPU, the CUDA build of the locked version; otherwise the locked version
# (torch==2.13.0, which these machines serve as a local CPU wheel). Override with MLSAE_TORCH="torch==X ..."
# (pip arguments). MLSAE_VENV: another venv folder; MLSAE_LOCK=none: resolve the newest allowed versions
# instead (scripts/refresh_lock.sh does that in a scratch venv). MLSAE_EXTRAS: the optional dependencies
# to install (default "test"; empty: the runtime only, as the quickstart does).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${MLSAE_VENV:-.venv}
LOCK=${MLSAE_LOCK:-requirements/lock.txt}
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
# shellcheck disable=SC1091
. "$VENV/bin/activate"
CONSTRAINTS=()
if [ "$LOCK" != none ]; then
  [ -f "$LOCK" ] || { echo "setup: no lock file $LOCK (MLSAE_LOCK=none resolves the newest versions)" >&2; exit 2; }
  # torch is installed first, below, and may be another build (CUDA) or version (MLSAE_TORCH): the lock
  # without its torch line constrains everything else.
  NO_TORCH=$(mktemp)
  trap 'rm -f "$NO_TORCH"' EXIT
  grep -v '^torch==' "$LOCK" >"$NO_TORCH"
  CONSTRAINTS=(-c "$NO_TORCH")
  LOCKED_TORCH=$(grep '^torch==' "$LOCK" || echo torch)
else
  LOCKED_TORCH=torch
fi
CPU_TORCH=$LOCKED_TORCH
[ "$CPU_TORCH" != torch ] || CPU_TORCH="torch==2.13.0"  # the local CPU wheel of these machines
if ! python -c "import torch" 2>/dev/null; then
  if [ -n "${MLSAE_TORCH:-}" ]; then
    # shellcheck disable=SC2086
    python -m pip install "${CONSTRAINTS[@]}" $MLSAE_TORCH
  elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    python -m pip install "${CONSTRAINTS[@]}" "$LOCKED_TORCH"  # PyPI's Linux wheel of this version is the CUDA build
  else
    python -m pip install "${CONSTRAINTS[@]}" "$CPU_TORCH"
  fi
fi
EXTRAS=${MLSAE_EXTRAS-test}
python -m pip install -q "${CONSTRAINTS[@]}" -e ".${EXTRAS:+[$EXTRAS]}"
