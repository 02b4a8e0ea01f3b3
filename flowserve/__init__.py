"""flowserve: serve normalizing flows in production through Triton and a gRPC gateway."""

__version__ = "0.1.0"
