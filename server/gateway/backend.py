"""What the gateway's service layer needs of an inference server.

:class:`~flowserve.server.gateway.triton_backend.TritonBackend` is the real one; tests use an in-memory
one. Methods raise the errors of :mod:`flowserve.server.protocol.errors`
(``BackendUnavailable``, ``DeadlineExceeded``, ``BackendError``), never a client library's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np

from flowserve.contract.spec import DirectionSpec


@dataclass(frozen=True)
class QueuePolicy:
    """A model's queue on the server: at most ``max_size`` requests (0: no limit), each
    rejected after waiting ``timeout_s`` (0: no limit)."""

    max_size: int = 0
    timeout_s: float = 0.0


class Backend(Protocol):
    """Runs the Triton models of flows' directions."""

    async def is_ready(self) -> bool:
        """Whether the server answers and reports itself ready."""

    async def model_versions(self) -> dict[str, list[str]]:
        """Ready versions of every model the server has."""

    async def model_ready(self, model: str) -> bool:
        """Whether the server reports ``model`` ready (a dead worker may still count as ready)."""

    async def probe(self, model: str, spec: DirectionSpec, timeout: float) -> None:
        """Run one row of zeros through ``model``; raises if it does not answer."""

    async def load_model(self, model: str) -> None:
        """Load ``model``, or its new files if it is loaded; calls in flight finish on the old."""

    async def unload_model(self, model: str) -> None:
        """Unload ``model``."""

    async def max_batch_size(self, model: str) -> int:
        """The largest batch ``model`` accepts in one call."""

    async def dynamic_batching(self, model: str) -> bool:
        """Whether ``model`` may run several requests as one batch."""

    async def queue_policy(self, model: str) -> QueuePolicy:
        """How long and how many requests may wait for ``model``."""

    def forget_configs(self) -> None:
        """Drop what is cached about models' configs (flows were re-exported)."""

    async def infer(
        self, model: str, spec: DirectionSpec, inputs: dict[str, np.ndarray], timeout: float | None
    ) -> dict[str, np.ndarray]:
        """Run one batch (``inputs`` by the spec's names, at most ``max_batch_size`` rows,
        ``timeout`` seconds > 0 or None) and return the spec's outputs as [rows, *dims]."""

    async def close(self) -> None:
        """Release connections."""
