#!/usr/bin/env bash
# Install fairport with everything its demo and tests use, on a fresh machine (idempotent, quick when done).
# torch: pinned to the CPU wheel this machine kind serves (a bare `pip install torch` pulls a CUDA build).
# fairseq 0.12 on Python 3.11: the rebuilt `ve-fairseq` wheel, without its torchaudio dependency
# (which drags in another torch; fairseq's text models do not need it). numpy<2 for fairseq 0.12.
set -euo pipefail
cd "$(dirname "$0")/.."
PIP="python -m pip install -q --disable-pip-version-check"
python -c "import torch, sys; sys.exit(0 if torch.__version__.startswith('2.13.0') else 1)" 2>/dev/null \
  || $PIP "torch==2.13.0"
python -c "import fairseq" 2>/dev/null || $PIP --no-deps "ve-fairseq==0.12.3"
$PIP "numpy<2" "hydra-core>=1.3.2" "omegaconf>=2.1" cffi cython regex sacrebleu tqdm bitarray scikit-learn packaging \
     "safetensors>=0.4" "transformers>=5.0,<6" "huggingface_hub>=1.0" sacremoses tokenizers "pytest>=7" \
     subword-nmt sentencepiece matplotlib rouge-score
python -c "import fastBPE" 2>/dev/null || $PIP --no-build-isolation fastbpe || echo "note: fastBPE not built (optional)"
$PIP --no-deps -e .
