# syntax=docker/dockerfile:1
# tls-sidecar image. The build stage installs the pinned dependencies (requirements.lock, with
# hashes) in their own layer, so a source change does not reinstall them, then the package
# itself, into a virtual environment without pip; the final stage copies it. Runs as a non-root
# numeric user, with a read-only root filesystem (only /tmp needs to be writable: an emptyDir,
# or `docker run --read-only --tmpfs /tmp`), no shell and no pip, and an exec-form entrypoint
# so the process is PID 1 and receives SIGTERM itself.
#
# Every build step is in deploy/image/build-root.sh, which tests/e2e/test_image_root.py also
# runs on a Debian 13 root filesystem (debootstrap), so what is tested is what is built.
#
# Debian 13 (trixie): OpenSSL 3.5, so hybrid post-quantum key exchange (X25519MLKEM768) by
# default. The base image is pinned by digest; the tag it was taken from is
# python:3.13-slim-trixie (the digest as published for that tag on 2026-09-08: Python 3.13.15,
# Debian 13.6). It has not been checked against a registry from here: refresh it where one is
# reachable, `docker buildx imagetools inspect python:3.13-slim-trixie`, and put its digest
# below (both FROMs use it).

ARG BASE=python:3.13-slim-trixie@sha256:9d2e5553305c7c7b0097999bb17187c69b921ccd6bc9d40e4bb5ebe652c00285

FROM ${BASE} AS build
WORKDIR /src
# gcc and libnghttp2's headers build the nghttp2 HTTP/2 codec and the compiled core (mypyc,
# from build-requirements.lock); they stay in this stage
RUN --mount=type=bind,source=deploy/image/build-root.sh,target=/usr/local/sbin/build-root.sh \
    ["/bin/sh", "/usr/local/sbin/build-root.sh", "build-tools"]
COPY requirements.lock ./
RUN --mount=type=bind,source=deploy/image/build-root.sh,target=/usr/local/sbin/build-root.sh \
    ["/bin/sh", "/usr/local/sbin/build-root.sh", "deps", "requirements.lock"]
COPY build-requirements.lock ./
RUN --mount=type=bind,source=deploy/image/build-root.sh,target=/usr/local/sbin/build-root.sh \
    ["/bin/sh", "/usr/local/sbin/build-root.sh", "build-deps", "build-requirements.lock"]
COPY pyproject.toml setup.py README.md ./
COPY proxy ./proxy
RUN --mount=type=bind,source=deploy/image/build-root.sh,target=/usr/local/sbin/build-root.sh \
    ["/bin/sh", "/usr/local/sbin/build-root.sh", "package", "/src"]

FROM ${BASE}
LABEL org.opencontainers.image.title="tls-sidecar" \
      org.opencontainers.image.description="TLS-terminating reverse proxy sidecar" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.base.name="docker.io/library/python:3.13-slim-trixie"
COPY --from=build /opt/tls-sidecar /opt/tls-sidecar
ENV PATH=/opt/tls-sidecar/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    TMPDIR=/tmp
# libnghttp2 (Debian's libnghttp2-14) is what the nghttp2 codec links at run time; then no pip
# (nothing installs at run time) and no shell (nothing for an attacker to exec into). The
# script is mounted for these steps, not copied into the image.
RUN --mount=type=bind,source=deploy/image/build-root.sh,target=/usr/local/sbin/build-root.sh \
    ["/bin/sh", "/usr/local/sbin/build-root.sh", "runtime", "harden"]
USER 65532:65532
EXPOSE 8443 9901
STOPSIGNAL SIGTERM
ENTRYPOINT ["tls-sidecar"]
CMD ["serve"]
