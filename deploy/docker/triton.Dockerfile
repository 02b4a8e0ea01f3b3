# syntax=docker/dockerfile:1
# Triton for flowserve: NGC Triton (which has the native onnxruntime and pytorch backends)
# plus the Python runner `flowserve_runner` with its dependencies, and a model repository
# at /models. Build from the repository root:
#   docker build -f deploy/docker/triton.Dockerfile -t ghcr.io/flowserve/triton:0.1.0 .
# In Kubernetes the overlays mount the model repository PVC over /models; the copy in the
# image serves `docker run` and clusters without shared storage.

FROM nvcr.io/nvidia/tritonserver:24.10-py3

COPY deploy/docker/triton-runner-requirements.txt /tmp/runner-requirements.txt

RUN --mount=type=cache,target=/root/.cache/pip \
    python3 -m pip install --requirement /tmp/runner-requirements.txt

COPY server/triton/runner/model.py /opt/tritonserver/backends/flowserve_runner/model.py
COPY --chown=triton-server:triton-server model_repository /models

USER triton-server

EXPOSE 8000 8001 8002

HEALTHCHECK --interval=30s \
    --timeout=5s \
    CMD ["python3", "-c", "import urllib.request as r; r.urlopen('http://127.0.0.1:8000/v2/health/ready', timeout=3)"]

CMD ["tritonserver", "--model-repository=/models", "--model-control-mode=none", "--exit-on-error=true"]
