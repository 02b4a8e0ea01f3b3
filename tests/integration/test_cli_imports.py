"""Every command stays light: building the CLI's parser in a fresh interpreter loads no
package of the torch side."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from helpers.processes import hermetic_env

ROOT = Path(__file__).resolve().parents[2]


def test_building_the_parser_loads_no_torch_side_package():
    code = ("import sys; from flowserve.cli import build_parser; build_parser(); "
            "print(sorted(m for m in ('torch', 'onnx', 'sklearn', 'matplotlib', 'tqdm') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT / "tests",
                            env=hermetic_env())
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
