"""The cost of moving tensors in and out of Triton's Python stub, by path, side by side.

One embedded Triton (this environment's numpy) serves three echo models that answer each
request with its input, so the time is the I/O alone (client → Triton → stub → Triton →
client), no flow:

* ``numpy-path``: ``as_numpy()`` in, ``pb_utils.Tensor(name, ndarray)`` out: how the runner
  moved tensors before it used DLPack (under numpy 2 these garble inputs and send nothing);
* ``runner``: flowserve's runner with the probe parameter: ``np.from_dlpack`` in, a DLPack
  capsule out, the path of its ONNX sessions (the echo also copies each input, which
  ``np.from_dlpack`` gives read-only; a session's outputs are new arrays);
* ``torch-dlpack``: ``torch.from_dlpack`` in, ``pb_utils.Tensor.from_dlpack(torch tensor)`` out,
  the path of its TorchScript sessions.

For 1, 64 and 4096 rows of 64 float32 columns, the three take turns call by call (so a
drift of the machine's speed hits all three alike), in rounds; it prints each path's median
per call, the best of the rounds, and its ratio to the numpy path.

Usage (about 20 s on 2 cores)::

    .venv/bin/python benchmarks/runner_io.py [--calls 200] [--rounds 3]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import tritonclient.grpc as triton_grpc

from flowserve.contract.spec import RUNNER_BACKEND
from flowserve.server.triton.launcher import TritonServer
from flowserve.server.triton.probe import PROBE_INPUT, PROBE_OUTPUT, echo_config

COLUMNS = 64
ROWS = (1, 64, 4096)
ECHO_MODEL = f'''
import numpy as np
import torch
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        self.torch_path = "torch" in args["model_name"]

    def execute(self, requests):
        responses = []
        for request in requests:
            tensor = pb_utils.get_input_tensor_by_name(request, "{PROBE_INPUT}")
            if self.torch_path:
                out = pb_utils.Tensor.from_dlpack("{PROBE_OUTPUT}", torch.from_dlpack(tensor))
            else:
                out = pb_utils.Tensor("{PROBE_OUTPUT}", np.ascontiguousarray(tensor.as_numpy()))
            responses.append(pb_utils.InferenceResponse(output_tensors=[out]))
        return responses
'''
PATHS = ("numpy-path", "runner", "torch-dlpack")


def write_repository(repository: Path) -> Path:
    """The three echo models of float32[COLUMNS] rows."""
    for name in PATHS:
        backend = RUNNER_BACKEND if name == "runner" else "python"
        (repository / name / "1").mkdir(parents=True)
        (repository / name / "config.pbtxt").write_text(echo_config(name, COLUMNS, max(ROWS), backend))
        if name != "runner":
            (repository / name / "1" / "model.py").write_text(ECHO_MODEL)
    return repository


def medians_ms(client, rows: int, calls: int) -> dict[str, float]:
    """Median milliseconds per path of ``calls`` sequential echo calls of ``rows`` rows, the
    paths taking turns call by call; checks each answer."""
    x = np.random.default_rng(rows).normal(size=(rows, COLUMNS)).astype(np.float32)
    tensor = triton_grpc.InferInput(PROBE_INPUT, list(x.shape), "FP32")
    tensor.set_data_from_numpy(x)
    times = {model: [] for model in PATHS}
    for _ in range(calls):
        for model in PATHS:
            started = time.perf_counter()
            answer = client.infer(model, [tensor]).as_numpy(PROBE_OUTPUT)
            times[model].append(time.perf_counter() - started)
            if not np.array_equal(answer, x):
                raise SystemExit(f"{model} did not echo its input at {rows} rows")
    return {model: 1000 * statistics.median(spent) for model, spent in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=200, help="calls per path, size and round")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    print(f"machine: {platform.machine()}, {len(os.sched_getaffinity(0))} cores, numpy {np.__version__}; "
          f"{args.calls} sequential calls per path and size, in turns; best median of {args.rounds} rounds")
    with tempfile.TemporaryDirectory(prefix="flowserve-runner-io-") as folder:
        repository = write_repository(Path(folder) / "repository")
        with TritonServer(repository, Path(folder) / "triton") as triton:
            client = triton_grpc.InferenceServerClient(triton.grpc_url)
            medians_ms(client, max(ROWS), 5)  # warm up each stub
            best = {(model, rows): float("inf") for model in PATHS for rows in ROWS}
            for _ in range(args.rounds):
                for rows in ROWS:
                    for model, median in medians_ms(client, rows, args.calls).items():
                        best[model, rows] = min(best[model, rows], median)
            client.close()
    print(f"{'rows':>6} " + " ".join(f"{model + ' ms':>16}" for model in PATHS) + "   ratio to numpy-path")
    for rows in ROWS:
        base = best["numpy-path", rows]
        ratios = " ".join(f"{best[model, rows] / base:.2f}" for model in PATHS[1:])
        print(f"{rows:>6} " + " ".join(f"{best[model, rows]:>16.3f}" for model in PATHS) + f"   {ratios}")


if __name__ == "__main__":
    main()
