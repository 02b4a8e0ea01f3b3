"""The runtime, cut along its processes: ``protocol`` (what both sides of the wire share),
``gateway``, ``client`` and ``triton`` (the launcher, and the runner inside Triton). Only the
CLI crosses between the last three. Nothing here imports torch."""
