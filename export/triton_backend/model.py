"""flowserve's Triton runner: executes a model's ONNX file with ONNX Runtime.

Installed once as the Python-based backend ``flowserve_onnx`` (Triton looks for
``<backend-directory>/flowserve_onnx/model.py``); every model whose config says
``backend: "flowserve_onnx"`` shares this file. Its ONNX file is
``<model>/<version>/model.onnx``.

Triton's dynamic batcher hands ``execute`` a list of requests. They are concatenated
along the batch dimension, run as ONE ONNX Runtime call, and split back per request.

On a ``KIND_GPU`` instance the CUDA execution provider is used with the instance's
device id; on ``KIND_CPU`` only the CPU provider is asked for. (onnxruntime-gpu lists
CUDA as available even without a GPU, so the decision follows the instance kind.)
"""

import json
import os

import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils

DEFAULT_MODEL_FILENAME = "model.onnx"


def _parameter(model_config, key, default):
    value = model_config.get("parameters", {}).get(key, {}).get("string_value")
    return default if value in (None, "") else value


class TritonPythonModel:
    """One ONNX Runtime session per Triton model instance."""

    def initialize(self, args):
        model_config = json.loads(args["model_config"])
        filename = model_config.get("default_model_filename") or DEFAULT_MODEL_FILENAME
        path = os.path.join(args["model_repository"], args["model_version"], filename)

        options = ort.SessionOptions()
        options.intra_op_num_threads = int(_parameter(model_config, "intra_op_num_threads", "1"))
        options.inter_op_num_threads = 1

        if args["model_instance_kind"] == "GPU":
            device_id = int(args["model_instance_device_id"])
            providers = [("CUDAExecutionProvider", {"device_id": device_id}), "CPUExecutionProvider"]
        else:
            providers = ["CPUExecutionProvider"]
        self.session = ort.InferenceSession(path, options, providers=providers)
        self.input_names = [t["name"] for t in model_config["input"]]
        self.output_names = [t["name"] for t in model_config["output"]]
        self.output_dtypes = {
            t["name"]: pb_utils.triton_string_to_numpy(t["data_type"]) for t in model_config["output"]
        }
        pb_utils.Logger.log_info(
            f"flowserve_onnx: loaded {path} on {self.session.get_providers()[0]} "
            f"(instance kind {args['model_instance_kind']})"
        )

    def execute(self, requests):
        try:
            feeds = {}
            row_counts = None
            for name in self.input_names:
                arrays = [pb_utils.get_input_tensor_by_name(r, name).as_numpy() for r in requests]
                if row_counts is None:
                    row_counts = [a.shape[0] for a in arrays]
                feeds[name] = arrays[0] if len(arrays) == 1 else np.concatenate(arrays, axis=0)
            results = self.session.run(self.output_names, feeds)
        except Exception as exc:  # one failed batch fails its requests, not the server
            error = pb_utils.TritonError(f"flowserve_onnx: {type(exc).__name__}: {exc}")
            return [pb_utils.InferenceResponse(error=error) for _ in requests]

        splits = np.cumsum(row_counts)[:-1]
        per_output = [np.split(r, splits, axis=0) for r in results]
        responses = []
        for i in range(len(requests)):
            tensors = [
                pb_utils.Tensor(name, np.ascontiguousarray(parts[i], dtype=self.output_dtypes[name]))
                for name, parts in zip(self.output_names, per_output)
            ]
            responses.append(pb_utils.InferenceResponse(output_tensors=tensors))
        return responses
