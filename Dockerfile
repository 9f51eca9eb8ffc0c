# syntax=docker/dockerfile:1
# The gateway image: dependencies built in a separate stage, the app run by gunicorn as an unprivileged user.
# Tests and demo.env stay out (see .dockerignore), the stand-ins too, and DEMO_MODE is off.
#   docker build -t wecom-gateway .                                  the gateway
#   docker build --target standins -t wecom-gateway-standins .       Dify + auth API stand-ins for a test cluster

FROM python:3.11-slim-bookworm AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
COPY requirements.txt /tmp/requirements.txt
RUN python -m venv /opt/venv \
    && /opt/venv/bin/pip install --no-cache-dir -r /tmp/requirements.txt

FROM python:3.11-slim-bookworm AS gateway
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    DEMO_MODE=false \
    LOG_FORMAT=json \
    PORT=8080
RUN groupadd --system --gid 10001 gateway \
    && useradd --system --uid 10001 --gid gateway --no-create-home --home-dir /app --shell /usr/sbin/nologin gateway
COPY --from=build /opt/venv /opt/venv
WORKDIR /app
COPY app.py gunicorn.conf.py ./
COPY config/ config/
COPY services/ services/
COPY web/ web/
COPY utils/ utils/
COPY cli/ cli/
# The instance folder holds the embedded SQLite default; on Kubernetes it is an emptyDir (read-only root fs).
RUN mkdir -p /app/instance && chown gateway:gateway /app/instance
USER 10001:10001
# 8080: the callback, /healthz, /readyz; 9090: /metrics when METRICS_PORT=9090 (k8s/base/configmap.yaml).
EXPOSE 8080 9090
CMD ["gunicorn", "-c", "gunicorn.conf.py", "app:create_app()"]

FROM gateway AS standins
COPY demo/ demo/
EXPOSE 5001 8000
CMD ["python", "-m", "demo.standins", "--host", "0.0.0.0"]

# The default target is the gateway.
FROM gateway
