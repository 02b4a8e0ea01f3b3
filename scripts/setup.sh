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
# Machines of this workplace have the CPU wheel on local disk; elsewhere set TORCH_INDEX_URL to
# PyTorch's CPU wheel index.
pip_install torch==2.13.0 ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"}
pip_install -c constraints.txt -e ".[test]"
.venv/bin/python -m pip check --disable-pip-version-check
# Triton's Python stub links against libpython3.X, which some Python installs lack.
stub_libs="$(.venv/bin/python - <<'PY'
import subprocess
from flowserve.server.launcher import TritonInstallation
install = TritonInstallation.find()
env = install.environment()
print(subprocess.run(["ldd", str(install.stub)], env=env, capture_output=True, text=True).stdout)
PY
)"
if grep -q "not found" <<<"$stub_libs"; then
  echo "setup: Triton's Python stub cannot load these libraries:" >&2
  grep "not found" <<<"$stub_libs" >&2
  echo "setup: install them (on Debian: apt-get install libpython3.X for this Python) and rerun" >&2
  exit 1
fi
echo "setup: ready ($(.venv/bin/python -c 'import torch, onnxruntime, numpy; print(f"torch {torch.__version__}, onnxruntime {onnxruntime.__version__}, numpy {numpy.__version__}")'))"
