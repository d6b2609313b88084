# NudgeFlow: one image for every process (worker, dispatcher, webhooks, one-shot commands).
#   docker build -t nudgeflow .
#   docker run --rm nudgeflow nudgeflow --help
# Multi-stage: the build stage compiles the engine's hot modules with mypyc (deploy/compile.py; the
# pure-Python modules stay beside them as the fallback) and keeps pip's cache, the C compiler and
# mypy out of the runtime image.

FROM python:3.11-slim-bookworm AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN apt-get update -qq \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends gcc libc6-dev \
 && rm -rf /var/lib/apt/lists/*
RUN python -m venv /opt/nudgeflow
WORKDIR /src
# Dependencies first (their layer survives code edits), then the package itself.
COPY pyproject.toml README.md ./
COPY processors ./processors
COPY streams ./streams
COPY schemas ./schemas
COPY deploy/compile.py ./deploy/compile.py
RUN /opt/nudgeflow/bin/pip install --upgrade pip \
 && /opt/nudgeflow/bin/pip install . "mypy==2.4.1" \
 && /opt/nudgeflow/bin/python deploy/compile.py \
      --in-place "$(/opt/nudgeflow/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')" \
 && /opt/nudgeflow/bin/pip uninstall -y -q mypy \
 && /opt/nudgeflow/bin/python -c "import processors.core.engine.engine as e; assert e.__file__.endswith('.so'), e.__file__"

FROM python:3.11-slim-bookworm
ENV PATH=/opt/nudgeflow/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    NUDGEFLOW_CAMPAIGNS_FILE=/etc/nudgeflow/campaigns.yaml \
    NUDGEFLOW_METRICS_PORT=9100 \
    NUDGEFLOW_WORKER_STORE=rocksdb:// \
    NUDGEFLOW_WORKER_WEB_PORT=0 \
    NUDGEFLOW_OUTBOX_PATH=/var/lib/nudgeflow/outbox.jsonl \
    FAUST_DATADIR=/var/lib/nudgeflow/faust
# A fixed non-root uid: Kubernetes fsGroup and volume ownership refer to it.
RUN groupadd --system --gid 10001 nudgeflow \
 && useradd --system --uid 10001 --gid nudgeflow --home-dir /var/lib/nudgeflow nudgeflow \
 && mkdir -p /var/lib/nudgeflow /etc/nudgeflow \
 && chown nudgeflow:nudgeflow /var/lib/nudgeflow
COPY --from=build /opt/nudgeflow /opt/nudgeflow
COPY examples/campaigns.yaml /etc/nudgeflow/campaigns.yaml
COPY examples /usr/share/nudgeflow/examples
USER 10001:10001
WORKDIR /var/lib/nudgeflow
# State of the worker (RocksDB) and the outbox file live here; mount a volume in production.
VOLUME ["/var/lib/nudgeflow"]
# 9100: Prometheus /metrics of every process; 8080: the webhook service.
EXPOSE 9100 8080
HEALTHCHECK --interval=15s --timeout=3s --start-period=30s --retries=3 \
  CMD python -c "import os,urllib.request as u; p=os.environ.get('NUDGEFLOW_METRICS_PORT','9100'); u.urlopen(f'http://127.0.0.1:{p}/metrics', timeout=2)" || exit 1
CMD ["nudgeflow", "worker"]
