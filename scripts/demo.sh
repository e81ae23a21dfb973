#!/usr/bin/env bash
# Set up (see install.sh), then the main job on an embedded default: fairseq builds a small BART-like and a
# small WMT-like checkpoint, fairport converts them and checks the port against the original.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
python -m fairport.validation.demo "${1:-fairport-demo}"
