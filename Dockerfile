# One image for every Conveyor process; the command picks which one runs:
#   docker run conveyor:0.1.0 migrate | api | worker | relay | worker-alive --max-age 60
# Build: docker build -t conveyor:0.1.0 .   (docs/deploy.md)
# The base is pinned by tag here; release builds pin it by digest too:
#   docker build --build-arg PYTHON_IMAGE=python:3.11.14-slim-bookworm@sha256:<digest> ...
ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm

# --- build: a virtualenv with Conveyor and its pinned dependencies ---------------------------------
FROM ${PYTHON_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN python -m venv /opt/venv
WORKDIR /src
# Dependencies first (constraints.txt pins them), so a code change does not reinstall them.
COPY pyproject.toml constraints.txt README.md ./
COPY shared ./shared
COPY api_service ./api_service
COPY worker_service ./worker_service
# A regular (not editable) install: the code ends up in the venv's site-packages, compiled to .pyc,
# so the runtime image needs neither /src nor a writable file system.
RUN /opt/venv/bin/pip install --no-cache-dir --constraint constraints.txt .

# --- runtime: the venv on a clean base, as an unprivileged numeric user -----------------------------
FROM ${PYTHON_IMAGE} AS runtime
ARG VERSION=0.1.0
LABEL org.opencontainers.image.title="conveyor" \
      org.opencontainers.image.description="Conveyor job service: API, worker, relay and migrations" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0"
# Numeric uid/gid: Kubernetes can only verify runAsNonRoot against a numeric USER.
RUN groupadd --system --gid 10001 conveyor \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
       --shell /usr/sbin/nologin conveyor
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    CONVEYOR_API_BIND=0.0.0.0:8000 \
    CONVEYOR_WORKER_HEARTBEAT_FILE=/tmp/conveyor-worker-heartbeat
# An empty, read-only working directory: `python -m` puts it first on sys.path.
WORKDIR /app
USER 10001:10001
EXPOSE 8000
# Exec form: `conveyor api|worker|relay` exec gunicorn / dramatiq / the relay, which become PID 1 and
# receive SIGTERM themselves.
ENTRYPOINT ["conveyor"]
CMD ["api"]
# For `docker run` and compose (Kubernetes ignores it and uses the probes): the API's liveness
# endpoint. Compose overrides it for the worker (worker-alive) and the relay (relay-alive), and turns
# it off for migrate.
HEALTHCHECK --interval=10s --timeout=3s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=2)"]
