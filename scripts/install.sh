#!/usr/bin/env bash
# Install fairport with everything its demo and tests use, into the current Python (a venv is best), on a fresh
# machine. Idempotent: quick when everything is there. The versions are pyproject.toml's extras.
# - torch: the CPU build 2.13.0 (a bare `pip install torch` pulls a CUDA build of several GB).
# - fairseq 0.12 on Python 3.11: the rebuilt `ve-fairseq` wheel, installed without its dependencies: it asks for
#   torchaudio, which drags in another torch and which fairseq's text models do not use. pip's later message
#   "ve-fairseq 0.12.3 requires torchaudio>=0.8.0, which is not installed" is expected and harmless.
# - fastBPE (optional: the tests compare against it): built from source with Cython.
set -euo pipefail
cd "$(dirname "$0")/.."
PIP="python -m pip install -q --disable-pip-version-check"
python -c "import torch, sys; sys.exit(0 if torch.__version__.startswith('2.13.0') else 1)" 2>/dev/null \
  || $PIP "torch==2.13.0"
python -c "import fairseq" 2>/dev/null || $PIP --no-deps "ve-fairseq==0.12.3"
$PIP -e ".[text,hf,report,fairseq,test,ctranslate2]"
python -c "import fastBPE" 2>/dev/null || $PIP --no-build-isolation fastbpe || echo "note: fastBPE not built (optional)"
