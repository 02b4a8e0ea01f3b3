"""Protocol buffers of the flowserve.v1 API and their generated stubs."""
