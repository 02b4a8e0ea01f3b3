"""Names both sides of the wire agree on: the service, each flow's health service, and the
metadata key of a retry hint."""

from __future__ import annotations

from .proto import flowserve_pb2 as pb

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["FlowService"].full_name
"""``flowserve.v1.FlowService``."""
METHOD_PREFIX = f"/{SERVICE_NAME}/"
"""What the full name of every FlowService method starts with."""
RETRY_AFTER_KEY = "retry-after-ms"
"""Trailing metadata of a RESOURCE_EXHAUSTED answer: milliseconds to wait before a retry."""


def flow_health_service(flow: str) -> str:
    """The gRPC health service name that reports one flow: ``flowserve.v1.FlowService/<flow>``."""
    return f"{SERVICE_NAME}/{flow}"
