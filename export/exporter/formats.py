"""Exported graphs as bytes: ONNX (``model.onnx``) and TorchScript (``model.pt``), how to
run them, and their size, node and loop counts."""

from __future__ import annotations

import contextlib
import io
import logging
import warnings

import onnxruntime as ort
import torch
from torch import nn

from ..flows.base import ServableModel
from ..flows.transforms import FixedPointInverse
from .graphs import GRAPHS, example_inputs, model_spec, prepared_copy

_EXPORTER_LOGGER = "torch.onnx._internal.exporter._registration"


@contextlib.contextmanager
def _torchscript_allowed():
    """torch 2.13 deprecates torch.jit; Triton's PyTorch backend still loads TorchScript, which
    is what ``--format torchscript`` is for, so its warning is not repeated on every call."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning, message=r"`torch\.jit\.")
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        yield


@contextlib.contextmanager
def _quiet(logger_name: str):
    logger = logging.getLogger(logger_name)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def export_onnx(model: ServableModel, direction: str) -> bytes:
    """One direction as a single-file ONNX model with a dynamic batch dimension.

    Sequential inverses become ONNX ``Loop`` nodes (see ``FixedPointInverse``).
    """
    spec = model_spec(model, direction)
    graph = GRAPHS[direction](prepared_copy(model)).eval()
    batch = torch.export.Dim("batch")
    # The exporter prints progress lines, warns that torchvision is absent and raises a
    # FutureWarning of its own; none of it concerns flows.
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings(), _quiet(_EXPORTER_LOGGER):
        warnings.simplefilter("ignore", FutureWarning)
        # Inputs that share the batch dimension make the exporter say it keeps one name for it.
        warnings.filterwarnings("ignore", message="# The axis name: batch will not be used")
        program = torch.onnx.export(
            graph,
            example_inputs(model, direction),
            input_names=spec.input_names,
            output_names=spec.output_names,
            dynamic_shapes=tuple({0: batch} for _ in spec.inputs),
            dynamo=True,
            external_data=False,
            verbose=False,
        )
    return program.model_proto.SerializeToString()


def _script_sequential_loops(module: nn.Module) -> None:
    """Replace every ``FixedPointInverse`` below ``module`` by its scripted twin, in place,
    so tracing keeps its loop (a trace would unroll it ``D`` times). TorchScript keeps the
    fixed-point loop for every batch: the cached inverse is ONNX's."""
    for name, child in module.named_children():
        if isinstance(child, FixedPointInverse):
            child.cached = None
            setattr(module, name, torch.jit.script(child))
        else:
            _script_sequential_loops(child)


def export_torchscript(model: ServableModel, direction: str) -> bytes:
    """One direction as a TorchScript module (``model.pt``); inputs and outputs in spec order."""
    graph = GRAPHS[direction](prepared_copy(model)).eval()
    buffer = io.BytesIO()
    with _torchscript_allowed():
        _script_sequential_loops(graph)
        traced = torch.jit.trace(graph, example_inputs(model, direction), check_trace=False)
        torch.jit.save(traced, buffer)
    return buffer.getvalue()


EXPORTERS = {"onnx": export_onnx, "torchscript": export_torchscript}


def load_exported(fmt: str, data: bytes):
    """A callable running an exported graph: numpy inputs in spec order -> numpy outputs."""
    if fmt == "onnx":
        session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
        names = [i.name for i in session.get_inputs()]
        return lambda *arrays: session.run(None, dict(zip(names, arrays)))
    with _torchscript_allowed():
        module = torch.jit.load(io.BytesIO(data))

    def run(*arrays):
        with torch.no_grad():
            outputs = module(*(torch.from_numpy(a) for a in arrays))
        return [o.numpy() for o in (outputs if isinstance(outputs, tuple) else (outputs,))]

    return run


def graph_stats(fmt: str, data: bytes) -> dict[str, int]:
    """Size, node count and ``Loop`` count of an exported graph, nested graphs included
    (TorchScript's counted on its inlined graph)."""
    if fmt == "onnx":
        import onnx

        def onnx_nodes(graph):
            for node in graph.node:
                yield node
                for attribute in node.attribute:
                    yield from onnx_nodes(attribute.g)

        kinds = [node.op_type for node in onnx_nodes(onnx.load_from_string(data).graph)]
    else:
        kinds = _torchscript_node_kinds(data)
    loop_kind = "Loop" if fmt == "onnx" else "prim::Loop"
    return {"bytes": len(data), "nodes": len(kinds), "loops": kinds.count(loop_kind)}


def _torchscript_node_kinds(data: bytes) -> list[str]:
    """The kind of every node of a TorchScript module's inlined graph, nested blocks included."""
    def script_nodes(nodes):
        for node in nodes:
            yield node
            for block in node.blocks():
                yield from script_nodes(block.nodes())

    with _torchscript_allowed():
        module = torch.jit.load(io.BytesIO(data))
    return [node.kind() for node in script_nodes(module.inlined_graph.nodes())]


# Nodes a CUDA graph cannot hold: control flow decided on the host from the GPU's values
# (the fixed-point inverse's loop, which stops once a step changes nothing), reads of a value
# back to the host, and random draws (a replay would draw other numbers than the module).
CUDA_GRAPH_BLOCKERS = frozenset({"prim::Loop", "prim::If", "aten::equal", "aten::item", "aten::nonzero",
                                 "aten::_local_scalar_dense", "aten::randn", "aten::rand", "aten::normal",
                                 "aten::bernoulli", "aten::multinomial"})


def cuda_graph_blockers(data: bytes) -> list[str]:
    """The node kinds of a TorchScript module that keep it out of a CUDA graph (none: it can
    be captured)."""
    return sorted(set(_torchscript_node_kinds(data)) & CUDA_GRAPH_BLOCKERS)
