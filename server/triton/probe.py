"""Echo models: each answers every request with its input, ``probe_in`` (float32 rows) as
``probe_out``, so a call times or checks the way tensors cross Triton's Python stub and
nothing else. The runner is one when its config carries the probe parameter; a Python-backend
model of one's own (``backend="python"``) is another."""

from __future__ import annotations

from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from flowserve.contract.spec import RUNNER_BACKEND, RUNNER_PROBE_PARAMETER

PROBE_INPUT = "probe_in"
PROBE_OUTPUT = "probe_out"


def echo_config(name: str, columns: int, max_batch_size: int, backend: str = RUNNER_BACKEND) -> str:
    """``config.pbtxt`` of an echo model of float32[``columns``] rows, one CPU instance."""
    config = mc.ModelConfig(name=name, backend=backend, max_batch_size=max_batch_size)
    config.input.add(name=PROBE_INPUT, data_type=mc.TYPE_FP32, dims=[columns])
    config.output.add(name=PROBE_OUTPUT, data_type=mc.TYPE_FP32, dims=[columns])
    config.instance_group.add(kind=mc.ModelInstanceGroup.KIND_CPU, count=1)
    if backend == RUNNER_BACKEND:
        config.parameters[RUNNER_PROBE_PARAMETER].string_value = "echo"
    return text_format.MessageToString(config)
