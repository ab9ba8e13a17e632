#!/usr/bin/env bash
# The main job on this machine: installs what is missing (scripts/setup.sh), then runs
# scripts/demo.py: two local Orthanc servers, pydicom's compressed samples, the bridge, and a
# before/after of sending them to an uncompressed-only workstation. `--keep` leaves them running.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
scripts/setup.sh
exec .venv/bin/python scripts/demo.py "$@"
