"""The runtime: the asyncio gRPC gateway in front of Triton, its client, launcher and
metrics, and the Triton runner (``runner/model.py``). Imports the contract, never torch."""
