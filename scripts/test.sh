#!/usr/bin/env bash
# Set up (see install.sh) and run fairport's test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
python -m pytest -q "$@"
