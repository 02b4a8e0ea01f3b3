"""The client library of the flowserve gateway: a synchronous ``FlowClient`` (the CLI's), and
``sample_request`` for callers of the generated stubs. Stands on the protocol alone."""

from .flow_client import Encoded, FlowClient, Samples, Scores, sample_request

__all__ = ["Encoded", "FlowClient", "Samples", "Scores", "sample_request"]
