"""A user's flow from a Python file: import its builder function, load its weights, and wrap
it in the adapter its library needs (``flowserve export --module file.py:build``)."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import torch
from torch import nn

from ..flows.base import SERVABLE_MEMBERS, servable_problem

_SPEC = re.compile(r"^(?P<path>.+\.py):(?P<function>[A-Za-z_][A-Za-z0-9_]*)$")


def load_builder(spec: str):
    """The function ``spec`` (``path/to/file.py:function``) names, from its file."""
    match = _SPEC.match(spec)
    if match is None:
        raise ValueError(f"--module must be path/to/file.py:function, got {spec!r}")
    path = Path(match["path"])
    if not path.is_file():
        raise FileNotFoundError(f"no builder file at {path}")
    module_spec = importlib.util.spec_from_file_location(f"flowserve_user_builder_{path.stem}", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    builder = getattr(module, match["function"], None)
    if not callable(builder):
        raise ValueError(f"{path} has no function {match['function']!r}")
    return builder


def wrap(flow, features: int, context: int = 0) -> nn.Module:
    """``flow`` as a servable model: zuko, nflows and normflows flows and sbi posteriors get
    their adapter (detected by their class's module, so the library is imported only for
    them); other modules must follow the protocol. ``features``: values per data row
    (flattened, for images)."""
    library = type(flow).__module__.split(".")[0]
    if library == "sbi":
        from .sbi import SbiPosterior

        flow = SbiPosterior(flow)
        if (flow.noise_dim, flow.context_dim) != (features, context):
            raise ValueError(f"the sbi posterior is over θ of {flow.noise_dim} values given x of {flow.context_dim}; "
                             f"the rows given have {features} and their contexts {context}")
        return flow
    if library == "zuko":
        from .zuko import ZukoFlow

        return ZukoFlow(flow, features, context)
    if library == "nflows":
        from .nflows import NflowsFlow

        flow = NflowsFlow(flow, context)
        if flow.event_shape != (features,):
            raise ValueError(f"the nflows flow is over {flow.event_shape[0]} features, not {features}; "
                             "its data rows must have as many values")
        return flow
    if library == "normflows":
        from .normflows import NormflowsFlow

        flow = NormflowsFlow(flow, context)
        if flow.noise_dim != features:
            raise ValueError(f"the normflows flow is over rows of {flow.noise_dim} values "
                             f"({' x '.join(map(str, flow.event_shape))}), not {features}; its data rows must have "
                             "as many")
        return flow
    if servable_problem(flow):
        raise ValueError(f"the builder returned a {type(flow).__name__}, which is neither a zuko, nflows or normflows "
                         f"flow, an sbi posterior nor a torch.nn.Module with {', '.join(SERVABLE_MEMBERS)}")
    return flow


def build_user_flow(spec: str, weights: Path | None, features: int, context: int = 0) -> nn.Module:
    """Call the builder ``spec`` names, load ``weights`` (a state dict, read with
    ``weights_only=True``) into what it returns (into the density estimator of an sbi
    posterior), and wrap that for export."""
    flow = load_builder(spec)()
    if weights is not None:
        module = getattr(flow, "posterior_estimator", flow)  # sbi: the posterior's estimator holds the weights
        if not Path(weights).is_file():
            raise FileNotFoundError(f"no weights file at {weights}")
        state = torch.load(weights, map_location="cpu", weights_only=True)
        if not isinstance(state, dict):
            raise ValueError(f"{weights} does not hold a state dict (found {type(state).__name__})")
        if not isinstance(module, nn.Module):
            raise ValueError(f"the builder returned a {type(flow).__name__}, not a torch.nn.Module to load "
                             "weights into")
        try:
            module.load_state_dict(state, strict=True)
        except RuntimeError as error:
            summary = str(error).splitlines()
            raise ValueError(f"{weights} does not fit the flow the builder returns: "
                             f"{' '.join(line.strip() for line in summary[:3])[:500]}") from None
    return wrap(flow, features, context).eval()
