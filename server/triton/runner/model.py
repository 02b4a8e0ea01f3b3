"""flowserve's Triton runner: executes a model's ONNX file with ONNX Runtime, or its
TorchScript file with torch.

Installed once as the Python-based backend ``flowserve_runner`` (Triton looks for
``<backend-directory>/flowserve_runner/model.py``); every model whose config says
``backend: "flowserve_runner"`` shares this file. The model file is
``<model>/<version>/<default_model_filename>``: ``model.onnx`` or ``model.pt``.

Triton's dynamic batcher hands ``execute`` a list of requests. They are concatenated
along the batch dimension, run as ONE call, and split back per request.

Tensors cross the stub through DLPack both ways, never through ``as_numpy()`` or
``pb_utils.Tensor(name, ndarray)``: the stub of Triton 2.51 was built against numpy 1's
binary layout, and under numpy 2 those two garble inputs and send empty outputs
(docs/performance.md). At load, a known tensor makes the round trip first; a runner whose
round trip comes back wrong refuses to load, with the reason.

On a ``KIND_GPU`` instance the model runs on the instance's GPU (ONNX Runtime's CUDA
execution provider, or torch on ``cuda:<id>``), or refuses to load with the reason; on
``KIND_CPU`` on the CPU only. (onnxruntime-gpu lists CUDA as available even without a GPU,
so the decision follows the instance kind, and the session's providers are checked.)

A config with the parameter ``flowserve_probe`` runs no model: it answers each request with
its inputs, through the same path (``flowserve doctor`` serves one to test the stub).

A TorchScript model on a GPU instance whose config has ``flowserve_cuda_graph_buckets``
(say ``1,4,16,64,256,1024,4096``) captures one CUDA graph per bucket at load, and runs a
batch as the replay of the smallest bucket that holds it, padded up (``CapturedBatches``):
one launch in place of a launch per kernel, for the small flows whose calls cost their
launches. A batch above the largest bucket runs as before. If a capture fails, or a replay
disagrees with the module at load, the model runs without graphs and says why in Triton's log.
"""

import ctypes
import json
import os

import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils

DEFAULT_MODEL_FILENAME = "model.onnx"
PROBE_PARAMETER = "flowserve_probe"
CUDA_GRAPH_PARAMETER = "flowserve_cuda_graph_buckets"
NUMPY_FIX = ("the runner exchanges tensors with the stub through DLPack; if this stub cannot, "
             "give Triton's python3 numpy<2 (nvidia-pytriton's own pin: pip install 'numpy<2')")

# The stub (python_backend r24.10) renames a capsule it consumes "used_dlpack" rather than
# the standard "used_dltensor". numpy's capsule destructor then takes the capsule for
# unconsumed and fails on it (under numpy 1.26 the stub dies). The standard name tells
# numpy that the stub owns the array now; the stub releases it with the tensor.
_set_capsule_name = ctypes.pythonapi.PyCapsule_SetName
_set_capsule_name.argtypes = (ctypes.py_object, ctypes.c_char_p)
_CONSUMED = b"used_dltensor"


def array_of(tensor):
    """A stub tensor as a numpy array over the same memory (read-only under numpy 2)."""
    return np.from_dlpack(tensor)


def tensor_of(name, array, dtype):
    """A numpy array as a stub tensor of ``dtype`` over the array's memory."""
    array = np.require(array, dtype=dtype, requirements=("C_CONTIGUOUS", "WRITEABLE"))
    capsule = array.__dlpack__()
    tensor = pb_utils.Tensor.from_dlpack(name, capsule)
    _set_capsule_name(capsule, _CONSUMED)
    return tensor


def check_round_trip():
    """Send a known array through the stub's tensor type and back; raise if it changes."""
    known = np.arange(-6, 6, dtype=np.float32).reshape(4, 3) / 4
    try:
        back = array_of(tensor_of("flowserve_round_trip", known, np.float32))
        intact = back.shape == known.shape and back.dtype == known.dtype and np.array_equal(back, known)
        problem = None if intact else f"came back as {back.dtype}{list(back.shape)} {back.ravel()[:4].tolist()}"
    except Exception as exc:  # noqa: BLE001 - any failure of the stub's tensor API is the finding
        problem = f"failed: {type(exc).__name__}: {exc}"
    if problem is not None:
        raise RuntimeError(f"flowserve_runner: a known float32[4, 3] tensor sent through Triton's Python stub "
                           f"{problem} (numpy {np.__version__}); {NUMPY_FIX}")


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


class NumpyBatches:
    """How a session keeps its batches as numpy arrays: read from the stub, concatenated,
    split per request, written back."""

    def batch(self, tensors):
        arrays = [array_of(t) for t in tensors]
        return arrays[0] if len(arrays) == 1 else np.concatenate(arrays, axis=0)

    def split(self, output, row_counts):
        return np.split(output, np.cumsum(row_counts)[:-1], axis=0)

    def tensor(self, name, part, dtype):
        return tensor_of(name, part, dtype)


class OnnxSession(NumpyBatches):
    """ONNX Runtime on the instance's device."""

    def __init__(self, path, threads, device_id, model_config=None):
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        # Idle threads would spin between calls, taking the cores from Triton and the gateway.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        providers = ["CPUExecutionProvider"]
        if device_id is not None:
            available = ort.get_available_providers()
            if "CUDAExecutionProvider" not in available:
                raise RuntimeError(
                    f"flowserve_runner: a GPU instance, but ONNX Runtime {ort.__version__} has no CUDA execution "
                    f"provider (it has {', '.join(available)}); install onnxruntime-gpu in place of onnxruntime, "
                    f"or export the flow with --instance-kind cpu")
            providers.insert(0, ("CUDAExecutionProvider", {"device_id": device_id}))
        self.session = ort.InferenceSession(path, options, providers=providers)
        self.device = self.session.get_providers()[0]
        if device_id is not None and self.device != "CUDAExecutionProvider":
            raise RuntimeError(
                f"flowserve_runner: a GPU instance, but ONNX Runtime {ort.__version__} could not start its CUDA "
                f"execution provider on GPU {device_id} and would run on the CPU (its error is in the lines above: "
                f"usually CUDA or cuDNN libraries it cannot load); install the CUDA and cuDNN versions this "
                f"onnxruntime-gpu was built for, or export the flow with --instance-kind cpu")

    def run(self, output_names, input_names, inputs):
        return self.session.run(output_names, dict(zip(input_names, inputs)))


def bucket_for(rows, buckets):
    """The smallest of the sorted ``buckets`` that holds ``rows`` rows, or None."""
    return next((bucket for bucket in buckets if bucket >= rows), None)


class CapturedBatches:
    """A module's calls as replays of captured graphs, one per batch-size bucket.

    ``capture(run, statics)`` records ``run(*statics)`` once and returns ``(replay, outputs)``:
    each ``replay()`` runs the record again on whatever ``statics`` hold now, writing into
    ``outputs``. A batch of ``n`` rows is copied into the first ``n`` rows of the smallest
    bucket that holds it; the rows beyond keep what they held, since every row of a flow is
    computed on its own, and the answer is the first ``n`` rows of the outputs, copied out
    (the next replay overwrites them). ``templates`` are ``(dtype, row shape)`` per input.
    Buckets are captured largest first, so that smaller ones can reuse its memory.
    """

    def __init__(self, run, templates, buckets, capture, new_buffer):
        self.run = run
        self.buckets = sorted(set(buckets))
        self.graphs = {}
        for bucket in reversed(self.buckets):
            statics = [new_buffer((bucket, *shape), dtype) for dtype, shape in templates]
            replay, outputs = capture(run, statics)
            self.graphs[bucket] = (statics, replay, outputs)

    def __call__(self, inputs):
        rows = inputs[0].shape[0]
        bucket = bucket_for(rows, self.buckets)
        if bucket is None:
            return self.run(*inputs)
        statics, replay, outputs = self.graphs[bucket]
        for static, tensor in zip(statics, inputs):
            static[:rows].copy_(tensor)
        replay()
        return tuple(output[:rows].clone() for output in outputs)


def _torch_dtype(torch, numpy_dtype):
    return torch.from_numpy(np.empty(0, numpy_dtype)).dtype


def _row_shape(tensor_config):
    """The shape of one row of a config's tensor (``reshape`` where it has one)."""
    if "reshape" in tensor_config:
        return [int(d) for d in tensor_config["reshape"].get("shape", [])]
    return [int(d) for d in tensor_config.get("dims", [])]


class TorchScriptSession:
    """A TorchScript module on the instance's device; inputs positional, in config order.
    Each batch moves to the device once; outputs go back to the stub through DLPack as they
    are (on the GPU for a GPU instance)."""

    def __init__(self, path, threads, device_id, model_config=None):
        import torch

        self.torch = torch
        if device_id is not None:
            if not torch.cuda.is_available():
                raise RuntimeError(
                    f"flowserve_runner: a GPU instance, but torch {torch.__version__} sees no CUDA device "
                    f"(CUDA build: {torch.version.cuda or 'none, a CPU-only wheel'}); install a CUDA build of torch "
                    f"that this machine's driver supports, or export the flow with --instance-kind cpu")
            if device_id >= torch.cuda.device_count():
                raise RuntimeError(f"flowserve_runner: GPU {device_id} was asked for, but torch sees "
                                   f"{torch.cuda.device_count()} CUDA device(s)")
        torch.set_num_threads(threads)
        self.device = torch.device("cpu" if device_id is None else f"cuda:{device_id}")
        self.module = torch.jit.load(path, map_location=self.device).eval()
        self.graphs = None
        buckets = _parameter(model_config or {}, CUDA_GRAPH_PARAMETER, "")
        if buckets and device_id is not None:
            self.graphs = self._capture(model_config, [int(b) for b in buckets.split(",")])

    def _eager(self, *inputs):
        outputs = self.module(*inputs)
        return outputs if isinstance(outputs, tuple) else (outputs,)

    def _capture(self, model_config, buckets):
        """``CapturedBatches`` for the buckets up to the config's batch limit, checked against
        the module on one batch; None, with the reason logged, where they fail."""
        torch = self.torch
        limit = int(model_config.get("max_batch_size", 0)) or max(buckets)
        buckets = sorted(b for b in buckets if 0 < b <= limit)
        templates = [(_torch_dtype(torch, pb_utils.triton_string_to_numpy(t["data_type"])), _row_shape(t))
                     for t in model_config["input"]]
        pool = None  # the graphs' shared memory pool, made with the first capture

        def capture(run, statics):
            nonlocal pool
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                for _ in range(3):  # TorchScript's executor settles on its plan over the first calls
                    run(*statics)
            torch.cuda.current_stream(self.device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            pool = pool if pool is not None else torch.cuda.graph_pool_handle()
            with torch.cuda.graph(graph, pool=pool):
                outputs = run(*statics)
            return graph.replay, outputs

        def new_buffer(shape, dtype):
            return torch.zeros(shape, dtype=dtype, device=self.device)

        try:
            with torch.inference_mode(), torch.cuda.device(self.device):
                graphs = CapturedBatches(self._eager, templates, buckets, capture, new_buffer)
                check = [torch.randn((buckets[-1], *shape), device=self.device).to(dtype) for dtype, shape in templates]
                for replayed, eager in zip(graphs(check), self._eager(*check)):
                    if not torch.allclose(replayed, eager, rtol=1e-5, atol=1e-6, equal_nan=True):
                        raise ValueError(f"a replay differs from the module by up to "
                                         f"{(replayed - eager).abs().nan_to_num().max().item():.3g}")
        except Exception as exc:  # noqa: BLE001 - graphs are an optimisation: without them the model still answers
            pb_utils.Logger.log_warn(f"flowserve_runner: no CUDA graphs for buckets {buckets}, running each batch "
                                     f"as it comes: {type(exc).__name__}: {exc}")
            return None
        pb_utils.Logger.log_info(f"flowserve_runner: CUDA graphs captured for batches of {buckets} rows")
        return graphs

    def batch(self, tensors):
        parts = [self.torch.from_dlpack(t) for t in tensors]
        return (parts[0] if len(parts) == 1 else self.torch.cat(parts)).to(self.device)

    def run(self, output_names, input_names, inputs):
        with self.torch.inference_mode():
            return self.graphs(inputs) if self.graphs is not None else self._eager(*inputs)

    def split(self, output, row_counts):
        return self.torch.split(output, row_counts)

    def tensor(self, name, part, dtype):
        part = part.to(_torch_dtype(self.torch, dtype)).contiguous()
        return pb_utils.Tensor.from_dlpack(name, part)


class ProbeSession(NumpyBatches):
    """No model: answers each request with its inputs (``flowserve doctor``'s stub check)."""

    device = "the stub's tensor path only"

    def run(self, output_names, input_names, inputs):
        return inputs


SESSIONS = {".onnx": OnnxSession, ".pt": TorchScriptSession}


class TritonPythonModel:
    """One ONNX Runtime or TorchScript session per Triton model instance."""

    def initialize(self, args):
        check_round_trip()
        model_config = json.loads(args["model_config"])
        filename = model_config.get("default_model_filename") or DEFAULT_MODEL_FILENAME
        path = os.path.join(args["model_repository"], args["model_version"], filename)
        threads = _threads(model_config)
        gpu = args["model_instance_kind"] == "GPU"
        device_id = int(args["model_instance_device_id"]) if gpu else None
        if _parameter(model_config, PROBE_PARAMETER, None) is not None:
            self.session, path = ProbeSession(), "a probe (no model file)"
        else:
            session_type = SESSIONS.get(os.path.splitext(filename)[1])
            if session_type is None:
                raise RuntimeError(f"flowserve_runner: cannot run {filename}; expected .onnx or .pt")
            self.session = session_type(path, threads, device_id, model_config)
        self.input_names = [t["name"] for t in model_config["input"]]
        self.output_names = [t["name"] for t in model_config["output"]]
        self.output_dtypes = [pb_utils.triton_string_to_numpy(t["data_type"]) for t in model_config["output"]]
        pb_utils.Logger.log_info(
            f"flowserve_runner: loaded {path} on {self.session.device} (instance kind "
            f"{args['model_instance_kind']}, {threads} intra-op thread(s), numpy {np.__version__})"
        )

    def execute(self, requests):
        try:
            inputs, row_counts = [], None
            for name in self.input_names:
                tensors = [pb_utils.get_input_tensor_by_name(r, name) for r in requests]
                rows = [int(t.shape()[0]) for t in tensors]
                if row_counts is not None and rows != row_counts:
                    raise ValueError(f"input {name!r} has {rows} rows per request where "
                                     f"{self.input_names[0]!r} has {row_counts}")
                row_counts = rows
                inputs.append(self.session.batch(tensors))
            outputs = self.session.run(self.output_names, self.input_names, inputs)
            if len(outputs) != len(self.output_names):
                raise ValueError(f"the model returned {len(outputs)} output(s) for the config's "
                                 f"{len(self.output_names)}")
            per_request = [[] for _ in requests]
            for name, dtype, output in zip(self.output_names, self.output_dtypes, outputs):
                if output.shape[0] != sum(row_counts):
                    raise ValueError(f"output {name!r} has {output.shape[0]} rows for {sum(row_counts)} input rows")
                for tensors_of_request, part in zip(per_request, self.session.split(output, row_counts)):
                    tensors_of_request.append(self.session.tensor(name, part, dtype))
        except Exception as exc:  # one failed batch fails its requests, not the server
            error = pb_utils.TritonError(f"flowserve_runner: {type(exc).__name__}: {exc}")
            return [pb_utils.InferenceResponse(error=error) for _ in requests]
        return [pb_utils.InferenceResponse(output_tensors=tensors) for tensors in per_request]
