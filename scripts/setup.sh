#!/usr/bin/env bash
# Create .venv and install flowserve with everything its demo needs; with --test, also what
# the tests need: the test extras, the deployment linters (checkov, tally) in their own
# environment, Prometheus with promtool, and Chromium (Debian packages; installed as root).
# Idempotent: a second run only checks what is installed.
set -euo pipefail
cd "$(dirname "$0")/.."
case "${1:-}" in
  "") test_tools=false ;;
  --test) test_tools=true ;;
  *) echo "usage: scripts/setup.sh [--test]" >&2; exit 2 ;;
esac
PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv with $("$PYTHON" --version)"
  "$PYTHON" -m venv .venv
fi
# constraints.txt pins versions that have wheels for Python 3.11 and 3.12; the tests run on 3.11.
if ! .venv/bin/python -c 'import sys; sys.exit(sys.version_info[:2] not in ((3, 11), (3, 12)))'; then
  echo "setup: .venv has $(.venv/bin/python --version 2>&1); use Python 3.11 (tested) or 3.12:" \
       "remove .venv and run PYTHON=python3.11 scripts/setup.sh" >&2
  exit 1
fi
pip_install() { .venv/bin/python -m pip install --quiet --disable-pip-version-check "$@"; }
pip_install --upgrade "pip>=25"
# torch's CPU wheel first: left to itself, pip resolves a bare "torch" to a multi-GB CUDA build.
# Machines of this workplace have the CPU wheel on local disk; elsewhere set TORCH_INDEX_URL to
# PyTorch's CPU wheel index.
pip_install torch==2.13.0 ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"}
# The demo trains and exports, so both commands install the export extra (torch, onnx,
# scikit-learn, matplotlib) beside the serving side; the tests also need the test extra and
# the libraries whose flows flowserve adapts (zuko, nflows, sbi, normflows).
if $test_tools; then
  pip_install -c constraints.txt -e ".[export,zuko,nflows,sbi,normflows,test]"
else
  pip_install -c constraints.txt -e ".[export]"
fi
.venv/bin/python -m pip check --disable-pip-version-check
if $test_tools; then
  # checkov needs numpy 2, so the linters live in an environment of their own.
  if [ ! -x .venv/tools/lint/bin/python ]; then
    "$PYTHON" -m venv .venv/tools/lint
  fi
  .venv/tools/lint/bin/python -m pip install -qq --disable-pip-version-check -r deploy/lint-requirements.txt
  # Triton's Python stub under numpy 2 (tests/e2e/test_numpy2_stub.py): an interpreter of its own.
  if [ ! -x .venv/tools/numpy2/bin/python ]; then
    "$PYTHON" -m venv .venv/tools/numpy2
  fi
  .venv/tools/numpy2/bin/python -m pip install -qq --disable-pip-version-check torch==2.13.0 \
    ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"}
  .venv/tools/numpy2/bin/python -m pip install -qq --disable-pip-version-check \
    -r tests/helpers/numpy2_stub_requirements.txt
  # Debian packages: Prometheus and promtool, and Chromium for the page of the HTTP API.
  packages=()
  { command -v prometheus && command -v promtool; } >/dev/null || packages+=(prometheus)
  command -v chromium >/dev/null || packages+=(chromium)
  if [ ${#packages[@]} -gt 0 ]; then
    if [ "$(id -u)" -ne 0 ]; then
      echo "setup: the tests need ${packages[*]}: run as root, or apt-get install ${packages[*]}" >&2
      exit 1
    fi
    echo "setup: installing ${packages[*]} (Debian packages)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -qq --no-install-recommends "${packages[@]}" >/dev/null \
      || { apt-get update -qq && apt-get install -y -qq --no-install-recommends "${packages[@]}" >/dev/null; }
  fi
fi
# Triton's Python stub links against libpython3.X, which some Python installs lack.
stub_libs="$(.venv/bin/python - <<'PY'
import subprocess
from flowserve.server.triton.launcher import TritonInstallation
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
