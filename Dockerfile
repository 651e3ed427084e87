# laibao as a container: `laibao serve` on port 8000, configured through LAIBAO_* environment variables.
# Build: docker build -t laibao .      Run: docker run --env-file .env -p 8000:8000 laibao
# A stop must leave room for the drain: docker stop -t 30 (docker-compose.yml and deploy/k8s set it).

# Build stage: a venv with laibao and its runtime dependencies only (no test tools), compiled where needed.
FROM python:3.11-slim-bookworm AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
RUN python -m venv /opt/laibao
COPY setup.cfg pyproject.toml README.md ./
COPY laibao ./laibao
COPY handlers ./handlers
COPY stores ./stores
RUN /opt/laibao/bin/pip install --no-cache-dir .

# Runtime stage: the venv on a clean slim image, run as an unprivileged user.
FROM python:3.11-slim-bookworm
RUN useradd --system --uid 10001 --gid 0 --home-dir /srv/laibao --create-home --shell /usr/sbin/nologin laibao
COPY --from=build /opt/laibao /opt/laibao
ENV PATH=/opt/laibao/bin:$PATH PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 LAIBAO_HOST=0.0.0.0 LAIBAO_PORT=8000
USER 10001
WORKDIR /srv/laibao
EXPOSE 8000
# Liveness: the process answers. (Readiness, /readyz, is for the load balancer: it is 503 while draining.)
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('LAIBAO_PORT', '8000'), timeout=2)"]
# SIGTERM starts the drain (LAIBAO_SHUTDOWN_GRACE, 20 s): answers running then finish or are handed over.
STOPSIGNAL SIGTERM
ENTRYPOINT ["laibao"]
CMD ["serve"]
