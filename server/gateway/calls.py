"""Every flowserve call's bookkeeping, whatever the transport (gRPC or HTTP): the gateway-wide
limit on calls running at once, and the metrics of each call's outcome, labelled with its
protocol. Each transport opens a :class:`Call` per request and closes it with a status name
(gRPC's: ``OK``, a :class:`~flowserve.server.protocol.errors.Status` name, ``CANCELLED``)."""

from __future__ import annotations

import time
from typing import Callable

from flowserve.server.protocol.errors import ResourceExhausted

from .metrics import UNKNOWN_MODEL, GatewayMetrics

GRPC = "grpc"
HTTP = "http"
OK = "OK"
CANCELLED = "CANCELLED"
DEADLINE_EXCEEDED = "DEADLINE_EXCEEDED"
INTERNAL = "INTERNAL"


class CallLedger:
    """The calls the gateway runs, over both transports.

    ``is_known_model`` bounds the ``model`` label: names that match no flow are recorded as
    ``"unknown"``. Beyond ``max_running`` calls at once, a call is refused with
    ResourceExhausted as soon as its request is parsed (:meth:`Call.admit`). The labelled
    collectors are looked up once per label set: this runs on every call.
    """

    def __init__(self, metrics: GatewayMetrics, is_known_model: Callable[[str], bool],
                 max_running: int | None = None):
        self.metrics = metrics
        self.is_known_model = is_known_model
        self.max_running = max_running
        self.running = 0
        self._children: dict[tuple, object] = {}

    def labelled(self, collector, *labels: str):
        """``collector.labels(*labels)``, looked up once per label set."""
        key = (collector, labels)
        if key not in self._children:
            self._children[key] = collector.labels(*labels)
        return self._children[key]

    def open(self, protocol: str, method: str) -> Call:
        """A call of ``method`` over ``protocol``, running from now until :meth:`Call.close`."""
        return Call(self, protocol, method)

    def count(self, protocol: str, method: str, model: str, code: str) -> None:
        self.labelled(self.metrics.requests, method, model, code, protocol).inc()

    def count_refused(self, protocol: str, method: str, code: str) -> None:
        """Count a call refused before its request was read (a missing token): model "unknown"."""
        self.count(protocol, method, UNKNOWN_MODEL, code)


class Call:
    """One call: in flight from its creation, counted once by :meth:`close`. ``rows`` are
    the rows it answered (observed when it ends OK); ``model`` its label."""

    def __init__(self, ledger: CallLedger, protocol: str, method: str):
        self.ledger, self.protocol, self.method = ledger, protocol, method
        self.model = UNKNOWN_MODEL  # until the request is parsed
        self.rows = 0
        self.started = time.perf_counter()
        self._in_flight = ledger.labelled(ledger.metrics.in_flight, method, protocol)
        self._in_flight.inc()
        ledger.running += 1

    def admit(self, model: str | None) -> None:
        """Label the call with its request's ``model`` (None: a call without one, ListModels)
        and refuse it with ResourceExhausted beyond the gateway's limit of running calls."""
        ledger = self.ledger
        self.model = "" if model is None else (model if ledger.is_known_model(model) else UNKNOWN_MODEL)
        if ledger.max_running is not None and ledger.running > ledger.max_running:
            raise ResourceExhausted(f"the gateway is running {ledger.max_running} calls, its limit "
                                    "(--max-concurrent-rpcs); retry later")

    @property
    def elapsed_s(self) -> float:
        return time.perf_counter() - self.started

    def close(self, code: str) -> None:
        """End the call with status ``code``: count it, its latency, and its rows if OK."""
        ledger = self.ledger
        self._in_flight.dec()
        ledger.running -= 1
        if code == OK and self.rows:
            ledger.labelled(ledger.metrics.rows, self.method, self.model, self.protocol).observe(self.rows)
        ledger.count(self.protocol, self.method, self.model, code)
        ledger.labelled(ledger.metrics.latency, self.method, self.model, self.protocol).observe(self.elapsed_s)
