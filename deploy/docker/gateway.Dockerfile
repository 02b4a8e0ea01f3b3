# syntax=docker/dockerfile:1
# The flowserve gateway image: `flowserve serve` in front of an external Triton
# (--triton-url or FLOWSERVE_TRITON_URL). Build from the repository root:
#   docker build -f deploy/docker/gateway.Dockerfile -t ghcr.io/flowserve/gateway:0.1.0 .

FROM python:3.11.14-slim-bookworm AS build

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/flowserve/bin:$PATH

RUN python -m venv /opt/flowserve

WORKDIR /src

# Only what the gateway imports (see the file): no torch, no ONNX Runtime, no embedded Triton.
COPY deploy/docker/gateway-requirements.txt ./

RUN --mount=type=cache,target=/root/.cache/pip \
    pip install --requirement gateway-requirements.txt

COPY pyproject.toml README.md ./
COPY flowserve ./flowserve
COPY export ./export
COPY server ./server

RUN --mount=type=cache,target=/root/.cache/pip \
    pip install --no-deps .

FROM python:3.11.14-slim-bookworm

COPY --from=build /opt/flowserve /opt/flowserve

ENV PATH=/opt/flowserve/bin:$PATH \
    PYTHONUNBUFFERED=1

USER 10001:10001

EXPOSE 8500 8502

HEALTHCHECK --interval=30s \
    --timeout=5s \
    CMD ["flowserve", "models", "--target", "127.0.0.1:8500", "--timeout", "3"]

ENTRYPOINT ["flowserve"]

CMD ["serve", "--host", "0.0.0.0", "--model-repository", "/models"]
