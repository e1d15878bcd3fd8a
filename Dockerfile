# syntax=docker/dockerfile:1
# tls-sidecar image. The build stage installs the pinned dependencies (requirements.lock, with
# hashes) in their own layer, so a source change does not reinstall them, then the package
# itself, into a virtual environment without pip; the final stage copies it. Runs as a non-root
# numeric user, with a read-only root filesystem (only /tmp needs to be writable: an emptyDir,
# or `docker run --read-only --tmpfs /tmp`), no shell and no pip, and an exec-form entrypoint
# so the process is PID 1 and receives SIGTERM itself.
#
# The base image is pinned by digest; the tag it was taken from is python:3.12-slim. To move
# to a newer build: docker pull python:3.12-slim, then put its RepoDigest below (both FROMs).

ARG BASE=python:3.12-slim@sha256:78387bc3881b8273120a12ebe6c1ab22b018ccc2c9adf565ae1ac9b536e184ea

FROM ${BASE} AS build
WORKDIR /src
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
# These three steps are what tests/e2e/test_image_install.py repeats in a fresh environment.
RUN python -m venv --without-pip /opt/tls-sidecar
COPY requirements.lock ./
RUN python -m pip --python /opt/tls-sidecar/bin/python install --require-hashes --no-deps -r requirements.lock
COPY pyproject.toml README.md ./
COPY proxy ./proxy
RUN python -m pip --python /opt/tls-sidecar/bin/python install --no-deps .

FROM ${BASE}
LABEL org.opencontainers.image.title="tls-sidecar" \
      org.opencontainers.image.description="TLS-terminating reverse proxy sidecar" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.base.name="docker.io/library/python:3.12-slim"
COPY --from=build /opt/tls-sidecar /opt/tls-sidecar
ENV PATH=/opt/tls-sidecar/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    TMPDIR=/tmp
# No pip (nothing installs at run time) and no shell (nothing for an attacker to exec into).
RUN ["/usr/local/bin/python", "-m", "pip", "uninstall", "--yes", "--quiet", "pip"]
# (two RUNs: without a shell, exec form runs one program each)
# hadolint ignore=DL3059
RUN ["/bin/rm", "-f", "/bin/sh", "/bin/bash", "/bin/dash", "/usr/bin/sh", "/usr/bin/bash", "/usr/bin/dash"]
USER 65532:65532
EXPOSE 8443 9901
STOPSIGNAL SIGTERM
ENTRYPOINT ["tls-sidecar"]
CMD ["serve"]
