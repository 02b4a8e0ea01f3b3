"""What both sides of the wire stand on: the ``flowserve.v1`` proto and its stubs, the wire
codec (``tensors``), names, errors and their transport-neutral statuses, the syntax of
bearer tokens, and TLS files. Imports the contract and nothing else of flowserve."""
