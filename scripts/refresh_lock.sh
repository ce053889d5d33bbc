#!/usr/bin/env bash
# Refresh requirements/lock.txt: install the newest versions pyproject.toml allows into a fresh scratch venv,
# run the whole test suite there, and only if it passes write the venv's exact versions to the lock
# (then review `git diff requirements/lock.txt` and commit it). torch keeps the lock's version unless
# MLSAE_TORCH names another ("torch==X", pip arguments): a torch upgrade is a decision of its own.
# Arguments go to pytest (e.g. -x). docs/install.md describes the whole procedure.
set -euo pipefail
cd "$(dirname "$0")/.."
LOCK=requirements/lock.txt
SCRATCH=$(mktemp -d "${TMPDIR:-/tmp}/mlsae-lock.XXXXXX")
trap 'rm -rf "$SCRATCH"' EXIT
export MLSAE_VENV="$SCRATCH/venv"
export MLSAE_TORCH=${MLSAE_TORCH:-$(grep '^torch==' "$LOCK" || echo "torch==2.13.0")}
MLSAE_LOCK=none bash scripts/setup.sh
PATH="$MLSAE_VENV/bin:$PATH" python -m pytest -q "$@"
{
  sed -n '/^#/p' "$LOCK"
  # the project itself is not pinned, nor torch's build label (+cpu, +cu128): setup.sh picks the build
  "$MLSAE_VENV/bin/python" -m pip freeze --exclude-editable | grep -v -i '^mlsae-cache' | sed -E 's/^(torch==[^+]+)\+.*/\1/'
} >"$SCRATCH/lock.txt"
mv "$SCRATCH/lock.txt" "$LOCK"
echo "refresh_lock: wrote $LOCK ($(grep -vc '^#' "$LOCK") packages); review 'git diff $LOCK' and commit it"
