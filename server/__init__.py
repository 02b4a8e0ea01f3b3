"""Asyncio gRPC gateway in front of Triton, its launcher and metrics."""
