#!/usr/bin/env bash
# Everything CI checks: setup, then lint, format, types and tests inside .venv.
# Runs every step even after a failure, so one run reports all problems; exits 1 if any failed.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

scripts/setup.sh

export PATH="$PWD/.venv/bin:$PATH"
failed=()
step() {
    echo "==> $*"
    "$@" || failed+=("$*")
}

step ruff check .
step ruff format --check .
step mypy
step pytest

if [ "${#failed[@]}" -gt 0 ]; then
    printf 'FAILED: %s\n' "${failed[@]}" >&2
    exit 1
fi
echo "all checks passed"
