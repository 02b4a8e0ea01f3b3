"""The Triton side: the launcher and supervisor of the embedded Triton (``launcher``), and the
runner that runs inside Triton's Python stub (``runner/model.py``, which imports nothing of
flowserve: Triton loads it from its backend directory)."""
