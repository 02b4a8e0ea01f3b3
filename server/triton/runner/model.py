"""flowserve's Triton runner: executes a model's ONNX file with ONNX Runtime, or its
TorchScript file with torch.

Installed once as the Python-based backend ``flowserve_runner`` (Triton looks for
``<backend-directory>/flowserve_runner/model.py``); every model whose config says
``backend: "flowserve_runner"`` shares this file. The model file is
``<model>/<version>/<default_model_filename>``: ``model.onnx`` or ``model.pt``.

Triton's dynamic batcher hands ``execute`` a list of requests. They are concatenated
along the batch dimension, run as ONE call, and split back per request.

On a ``KIND_GPU`` instance the model runs on the instance's GPU (ONNX Runtime's CUDA
execution provider, or torch on ``cuda:<id>``); on ``KIND_CPU`` on the CPU only.
(onnxruntime-gpu lists CUDA as available even without a GPU, so the decision follows
the instance kind.)
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


def _threads(model_config):
    """Intra-op threads per instance: the config's ``intra_op_num_threads``, or for 0 the cores
    this process may use divided by the model's instance count."""
    threads = int(_parameter(model_config, "intra_op_num_threads", "0"))
    if threads > 0:
        return threads
    instances = sum(int(group.get("count", 1)) for group in model_config.get("instance_group", [])) or 1
    return max(1, len(os.sched_getaffinity(0)) // instances)


class OnnxSession:
    """ONNX Runtime on the instance's device."""

    def __init__(self, path, threads, device_id):
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        # Idle threads would spin between calls, taking the cores from Triton and the gateway.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        providers = ["CPUExecutionProvider"]
        if device_id is not None:
            providers.insert(0, ("CUDAExecutionProvider", {"device_id": device_id}))
        self.session = ort.InferenceSession(path, options, providers=providers)
        self.device = self.session.get_providers()[0]

    def run(self, output_names, feeds, input_names):
        return self.session.run(output_names, feeds)


class TorchScriptSession:
    """A TorchScript module on the instance's device; inputs positional, in config order."""

    def __init__(self, path, threads, device_id):
        import torch

        self.torch = torch
        torch.set_num_threads(threads)
        self.device = torch.device("cpu" if device_id is None else f"cuda:{device_id}")
        self.module = torch.jit.load(path, map_location=self.device).eval()

    def run(self, output_names, feeds, input_names):
        with self.torch.inference_mode():
            outputs = self.module(*(self.torch.from_numpy(feeds[name]).to(self.device) for name in input_names))
        outputs = outputs if isinstance(outputs, tuple) else (outputs,)
        return [output.cpu().numpy() for output in outputs]


SESSIONS = {".onnx": OnnxSession, ".pt": TorchScriptSession}


class TritonPythonModel:
    """One ONNX Runtime or TorchScript session per Triton model instance."""

    def initialize(self, args):
        model_config = json.loads(args["model_config"])
        filename = model_config.get("default_model_filename") or DEFAULT_MODEL_FILENAME
        path = os.path.join(args["model_repository"], args["model_version"], filename)
        threads = _threads(model_config)
        gpu = args["model_instance_kind"] == "GPU"
        device_id = int(args["model_instance_device_id"]) if gpu else None
        session_type = SESSIONS.get(os.path.splitext(filename)[1])
        if session_type is None:
            raise pb_utils.TritonModelException(f"flowserve_runner: cannot run {filename}; expected .onnx or .pt")
        self.session = session_type(path, threads, device_id)
        self.input_names = [t["name"] for t in model_config["input"]]
        self.output_names = [t["name"] for t in model_config["output"]]
        self.output_dtypes = {
            t["name"]: pb_utils.triton_string_to_numpy(t["data_type"]) for t in model_config["output"]
        }
        pb_utils.Logger.log_info(
            f"flowserve_runner: loaded {path} on {self.session.device} "
            f"(instance kind {args['model_instance_kind']}, {threads} intra-op thread(s))"
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
            results = self.session.run(self.output_names, feeds, self.input_names)
        except Exception as exc:  # one failed batch fails its requests, not the server
            error = pb_utils.TritonError(f"flowserve_runner: {type(exc).__name__}: {exc}")
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
