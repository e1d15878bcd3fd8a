# syntax=docker/dockerfile:1
# tls-sidecar image: a wheel built in one stage, installed into a virtual environment that the
# final stage copies. Runs as a non-root numeric user, with a read-only root filesystem (only
# /tmp needs to be writable: mount an emptyDir there), and exec-form entrypoint so the process
# is PID 1 and receives SIGTERM itself.

FROM python:3.12-slim AS build
WORKDIR /src
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
COPY pyproject.toml README.md ./
COPY proxy ./proxy
# These two steps are what tests/e2e/test_image_install.py repeats in a fresh virtual environment.
RUN python -m pip wheel --no-deps --wheel-dir /wheels .
RUN python -m venv /opt/tls-sidecar && /opt/tls-sidecar/bin/pip install /wheels/*.whl

FROM python:3.12-slim
LABEL org.opencontainers.image.title="tls-sidecar" \
      org.opencontainers.image.description="TLS-terminating reverse proxy sidecar" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=build /opt/tls-sidecar /opt/tls-sidecar
ENV PATH=/opt/tls-sidecar/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    TMPDIR=/tmp
# No shell in the final image: nothing for an attacker to exec into.
RUN ["/bin/rm", "-f", "/bin/sh", "/bin/bash", "/bin/dash", "/usr/bin/sh", "/usr/bin/bash", "/usr/bin/dash"]
USER 65532:65532
EXPOSE 8443 9901
STOPSIGNAL SIGTERM
ENTRYPOINT ["tls-sidecar"]
CMD ["serve"]
