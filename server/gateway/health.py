"""Per-flow health: each flow's Triton models, checked every health period, reloaded when
broken, and loaded again when an export changed their files.

A model is healthy when Triton reports it ready and a one-row probe of it answers. Readiness
alone is not enough: Triton 2.51 keeps reporting a Python-backend model ready after its stub
process died, while every call to it fails with INTERNAL "Stub process ... is not healthy".
A broken model is reloaded through Triton's repository API (unload, then load), which needs
Triton in ``--model-control-mode=explicit``.
"""

from __future__ import annotations

import asyncio
import logging
import math

from flowserve.contract.metadata import FlowMetadata
from flowserve.contract.spec import DirectionSpec
from flowserve.server.protocol.errors import DeadlineExceeded, FlowServeError

from .backend import Backend
from .catalog import ModelCatalog
from .metrics import GatewayMetrics

log = logging.getLogger(__name__)


class FlowHealth:
    """Which flows can be served now; reloads the Triton models that stopped answering.

    :meth:`check` probes every model of every flow at once. A probe that runs out of its
    ``probe_timeout_s`` means a busy model, not a broken one: the flow keeps its last state.
    A model is reloaded at most once per ``min_reload_interval_s``, and each further reload
    that it has not answered a probe since doubles the wait, up to ``max_reload_interval_s``:
    a model that cannot load (a corrupt file, a GPU it cannot have) costs a stub process's
    start every few minutes, not every few seconds.

    Without ``manage_models`` it only watches: it neither reloads nor loads, but still reads
    the changed catalog (another gateway worker on the same Triton does the loading).

    With ``load_changes``, each check also looks for flows whose metadata file is new or was
    rewritten (an export writes it last) and asks Triton to load their models. Triton loads
    the new version beside the old one, which answers until the new one is ready.
    """

    def __init__(self, backend: Backend, catalog: ModelCatalog, metrics: GatewayMetrics,
                 probe_timeout_s: float = 2.0, min_reload_interval_s: float = 5.0,
                 max_reload_interval_s: float = 300.0, manage_models: bool = True, load_changes: bool = False):
        self.backend = backend
        self.catalog = catalog
        self.metrics = metrics
        self.probe_timeout_s = probe_timeout_s
        self.min_reload_interval_s = min_reload_interval_s
        self.max_reload_interval_s = max_reload_interval_s
        self.manage_models = manage_models
        self.load_changes = load_changes
        self._ready: dict[str, bool] = {}
        self._reloads: dict[str, asyncio.Task] = {}  # by model
        self._last_reload: dict[str, float] = {}
        self._unanswered_reloads: dict[str, int] = {}  # by model: reloads since it last answered a probe
        self._loads: dict[str, asyncio.Task] = {}  # by flow
        self._loaded = {name: catalog.get(name) for name in catalog.names()}  # Triton loaded these at its start

    def is_ready(self, flow: str) -> bool:
        """Whether every model of ``flow`` answered at the last check."""
        return self._ready.get(flow, False)

    async def check(self, server_ready: bool) -> dict[str, bool]:
        """Readiness of every flow of the catalog. With ``server_ready`` false (Triton down or
        not ready) no model is probed or reloaded: every flow is not ready."""
        if self.load_changes:
            self.catalog.refresh()
            if server_ready and self.manage_models:
                self._load_changed_flows()
        flows = {name: self.catalog.get(name) for name in self.catalog.names()}
        models = [(name, direction, model) for name, flow in flows.items() for direction, model in flow.models.items()]
        if server_ready:
            answers = await asyncio.gather(*(self._probe(model, flows[name].spec(direction))
                                             for name, direction, model in models))
        else:
            answers = [False] * len(models)
        ready = {name: True for name in flows}
        for (name, direction, model), answered in zip(models, answers):
            if answered is None or name in self._loads:  # busy or loading new files: no news
                answered = self._ready.get(name, False)
            elif not answered and server_ready and self.manage_models:
                self._reload_soon(name, direction, model)
            elif answered:
                self._unanswered_reloads.pop(model, None)
            ready[name] = ready[name] and answered
        self._ready = ready
        for name, flow_ready in ready.items():
            self.metrics.flow_ready.labels(name).set(1.0 if flow_ready else 0.0)
        return ready

    async def _probe(self, model: str, spec: DirectionSpec) -> bool | None:
        """True if ``model`` is ready and answers one row, None if it is too busy to say."""
        if model in self._reloads:
            return False
        try:
            if not await self.backend.model_ready(model):
                return False
            await self.backend.probe(model, spec, self.probe_timeout_s)
        except DeadlineExceeded:
            return None
        except FlowServeError as exc:
            log.warning("health probe of %s failed: %s", model, exc)
            return False
        return True

    def _reload_soon(self, flow: str, direction: str, model: str) -> None:
        now = asyncio.get_running_loop().time()
        unanswered = self._unanswered_reloads.get(model, 0)
        wait = min(self.min_reload_interval_s * 2 ** max(unanswered - 1, 0), self.max_reload_interval_s)
        if model in self._reloads or now - self._last_reload.get(model, -math.inf) < wait:
            return
        self._last_reload[model] = now
        self._unanswered_reloads[model] = unanswered + 1
        task = asyncio.create_task(self._reload(flow, direction, model))
        self._reloads[model] = task
        task.add_done_callback(lambda _: self._reloads.pop(model, None))

    async def _reload(self, flow: str, direction: str, model: str) -> None:
        log.warning("%s (%s of flow %r) does not answer; reloading it on Triton", model, direction, flow)
        self.metrics.model_reloads.labels(flow, direction).inc()
        try:
            await self.backend.unload_model(model)
            await self.backend.load_model(model)
        except FlowServeError as exc:  # Triton's reason comes first; the runner's traceback follows it
            log.error("reloading %s failed: %s", model, str(exc).split("\n")[0])
        else:
            log.warning("%s reloaded", model)

    def _load_changed_flows(self) -> None:
        for name in self.catalog.names():
            flow = self.catalog.get(name)
            if name not in self._loads and self._loaded.get(name) != flow:
                self._loaded[name] = flow
                task = asyncio.create_task(self._load(flow))
                self._loads[name] = task
                task.add_done_callback(lambda _, name=name: self._loads.pop(name, None))

    async def _load(self, flow: FlowMetadata) -> None:
        log.warning("flow %r has new files; loading its models on Triton", flow.name)
        try:
            await asyncio.gather(*(self.backend.load_model(model) for model in flow.models.values()))
        except FlowServeError as exc:
            log.error("loading the new files of flow %r failed: %s", flow.name, exc)
        else:
            log.warning("flow %r: new files loaded", flow.name)
        self.backend.forget_configs()  # the new config may batch differently

    async def close(self) -> None:
        """Cancel reloads and loads still running."""
        tasks = [*self._reloads.values(), *self._loads.values()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
