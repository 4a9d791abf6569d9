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
# Dependencies first: pyproject.toml's list, pinned by constraints.txt. This layer depends on those two
# files only, so a change to the code alone reuses it and reinstalls no dependency.
COPY pyproject.toml constraints.txt ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
        > /tmp/requirements.txt \
    && /opt/venv/bin/pip install --no-cache-dir --constraint constraints.txt --requirement /tmp/requirements.txt
COPY README.md ./
COPY shared ./shared
COPY api_service ./api_service
COPY worker_service ./worker_service
# Then Conveyor itself, without dependencies (all installed above). A regular (not editable) install:
# the code ends up in the venv's site-packages, compiled to .pyc, so the runtime image needs neither
# /src nor a writable file system.
RUN /opt/venv/bin/pip install --no-cache-dir --no-deps .

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
# SSL_CERT_FILE / SSL_CERT_DIR: psycopg2-binary bundles its own OpenSSL, whose default CA path does not
# exist in this image, so with `sslrootcert=system` no server certificate could be verified. These
# point it at the CA store of the ca-certificates package, which the python:*-slim base installs.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt \
    SSL_CERT_DIR=/etc/ssl/certs \
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
