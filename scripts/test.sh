#!/usr/bin/env bash
# Everything CI checks: setup, then lint, format, types and tests inside .venv; the tests that run
# real Orthanc servers run twice, against Orthanc 1.10 (/usr/sbin/Orthanc) and 1.12 (scripts/orthanc-next).
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
# The layers of bridge/ ([tool.importlinter] in pyproject.toml): an import that breaks one fails.
step lint-imports
step pytest
# The real-server tests (marker `orthanc`) again, against Debian 13's Orthanc 1.12 from the root
# scripts/setup.sh built; the first pass ran Debian 12's 1.10.
step env ORTHANC_BINARY=scripts/orthanc-next pytest -m orthanc

if [ "${#failed[@]}" -gt 0 ]; then
    printf 'FAILED: %s\n' "${failed[@]}" >&2
    exit 1
fi
echo "all checks passed"
