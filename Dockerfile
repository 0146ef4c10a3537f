# One image for every process of inpaint-gateway; the command picks the role:
#   API (default): gunicorn -c python:service.gunicorn_conf "service:create_app()"
#   worker:        celery -A workers worker -Q jobs,webhooks -l INFO --without-gossip --without-mingle
#   scheduler:     celery -A workers beat -l INFO -s /tmp/celerybeat-schedule   (exactly one)
#   emulator:      python -m emulator --host 0.0.0.0 --port 8100 --token TOKEN  (local only)
# No secret is baked in: RUNCOMFY_API_TOKEN (or RUNCOMFY_API_TOKEN_FILE) comes at run time.
# No HEALTHCHECK here because the image runs four roles; docker-compose.yml and deploy/ give
# each role its own check.

ARG PYTHON_IMAGE=python:3.11-slim

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
# .dockerignore keeps the context to the sources; pyproject.toml decides which packages install.
COPY . .
# Runtime dependencies only (no [dev] extra). The venv moves as a whole to the runtime stage.
# The SDK (clients/python) first: the jobs CLI depends on it, and no index serves it.
RUN python -m venv /opt/venv \
    && /opt/venv/bin/pip install --upgrade pip \
    && /opt/venv/bin/pip install ./clients/python \
    && /opt/venv/bin/pip install .

FROM ${PYTHON_IMAGE}
RUN groupadd --system --gid 10001 app \
    && useradd --system --uid 10001 --gid app --no-create-home --home-dir /tmp \
       --shell /usr/sbin/nologin app
COPY --from=build /opt/venv /opt/venv
# HOME=/tmp: the one writable place when the root filesystem is read-only (Kubernetes mounts an
# emptyDir there); gunicorn puts its control socket under $HOME and beat its schedule in /tmp.
ENV PATH=/opt/venv/bin:$PATH \
    HOME=/tmp \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
# An empty, root-owned working directory: celery puts the cwd on sys.path, so it must hold nothing.
WORKDIR /app
# The default media store; owned by the process's user, so a volume mounted there starts so too.
RUN mkdir -p /var/lib/inpaint-gateway/media && chown 10001:10001 /var/lib/inpaint-gateway/media
# Numeric so Kubernetes' runAsNonRoot can verify it without reading /etc/passwd.
USER 10001:10001
EXPOSE 8000
CMD ["gunicorn", "-c", "python:service.gunicorn_conf", "service:create_app()"]
