#!/usr/bin/env bash
# Create .venv and install flowserve with everything its demo and tests need.
# Idempotent: a second run only checks what is installed.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv with $("$PYTHON" --version)"
  "$PYTHON" -m venv .venv
fi
pip_install() { .venv/bin/python -m pip install --quiet --disable-pip-version-check "$@"; }
pip_install --upgrade "pip>=25"
# torch's CPU wheel first: left to itself, pip resolves a bare "torch" to a multi-GB CUDA build.
pip_install torch==2.13.0
pip_install -c constraints.txt -e ".[test]"
.venv/bin/python -m pip check --disable-pip-version-check
echo "setup: ready ($(.venv/bin/python -c 'import torch, onnxruntime, numpy; print(f"torch {torch.__version__}, onnxruntime {onnxruntime.__version__}, numpy {numpy.__version__}")'))"
