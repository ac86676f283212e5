# syntax=docker/dockerfile:1
# fastgw's container image. The first stage builds fastgw's wheel (and a wheel of every
# dependency); the second is a slim Python with only those wheels installed, run as a
# non-root user. The configuration is mounted at /etc/fastgw/fastgw.yaml:
#
#   docker build -t fastgw .
#   docker run --rm -p 8080:8080 -p 9901:9901 --stop-timeout 30 \
#       -v "$PWD/fastgw.yaml:/etc/fastgw/fastgw.yaml:ro" -e FASTGW_ADMIN_TOKEN=... fastgw
#   docker run --rm -v "$PWD/fastgw.yaml:/etc/fastgw/fastgw.yaml:ro" fastgw check -c /etc/fastgw/fastgw.yaml
#
# The HEALTHCHECK asks the admin API's /healthz on 127.0.0.1:9901 (no token needed): give
# the configuration `admin: {host: 0.0.0.0, port: 9901, token-env: FASTGW_ADMIN_TOKEN}`, or
# set FASTGW_HEALTHZ_URL to where it listens. `docker stop` sends SIGTERM, on which fastgw
# drains (/readyz 503, new upgrades 503, live connections 1001, then exit 0 within
# `drain-time`): give `--stop-timeout` (default 10 s) more than `drain-time`.

ARG PYTHON_VERSION=3.12

FROM python:${PYTHON_VERSION}-slim AS build
RUN apt-get update \
 && apt-get install -y --no-install-recommends build-essential \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
# fastgw's wheel (the Cython core compiled here) and the wheels of its dependencies, so that
# the runtime stage needs neither a compiler nor a package index.
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

FROM python:${PYTHON_VERSION}-slim AS runtime
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
# Installed from the build stage's wheels through a bind mount: the wheels are not a layer.
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    pip install --no-cache-dir --no-index --find-links /wheels fastgw \
 && fastgw --version
RUN groupadd --gid 10001 fastgw \
 && useradd --uid 10001 --gid 10001 --home-dir /var/lib/fastgw --create-home \
        --shell /usr/sbin/nologin fastgw \
 && mkdir -p /etc/fastgw
# The working directory is where relative event and histogram-log files go.
WORKDIR /var/lib/fastgw
USER 10001:10001
# The gateway's listener and the admin API (/healthz, /readyz, /metrics), as in
# deploy/kubernetes/fastgw.yaml.
EXPOSE 8080 9901
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen(os.environ.get('FASTGW_HEALTHZ_URL', 'http://127.0.0.1:9901/healthz'), timeout=2)"]
ENTRYPOINT ["fastgw"]
CMD ["run", "-c", "/etc/fastgw/fastgw.yaml"]
