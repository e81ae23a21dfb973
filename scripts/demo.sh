#!/usr/bin/env bash
# Set up (see install.sh), then the demo: fairseq builds a small BART-like and a small WMT-like checkpoint,
# fairport converts them and checks the port against the original, printing each command it runs.
# Usage: bash scripts/demo.sh [OUTDIR]   (default: ./fairport-demo, in the folder you run it from; a new, empty or
# earlier demo folder: the demo only ever removes what it created there)
set -euo pipefail
out="$(realpath -m "${1:-fairport-demo}")"  # OUTDIR is relative to where you run this
cd "$(dirname "$0")/.."
bash scripts/install.sh
python -m fairport.demo "$out"
