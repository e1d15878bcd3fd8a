#!/bin/sh
# The image's build steps, in one place: the Dockerfile runs them on python:3.13-slim-trixie,
# and tests/e2e/test_image_root.py runs them on a Debian 13 root filesystem made with
# debootstrap (there is no container engine in CI), so the two cannot drift.
#
#   build-root.sh build-tools     the build stage: what builds the nghttp2 HTTP/2 codec and the
#                                 compiled core (a C compiler, libnghttp2's and Python's headers)
#   build-root.sh deps LOCKFILE   the build stage: a virtual environment without pip in
#                                 /opt/tls-sidecar, and the pinned dependencies (hashes checked)
#   build-root.sh build-deps LOCKFILE  the build stage: what builds the package (setuptools,
#                                 cffi, mypy, whose mypyc compiles the compiled core), pinned
#                                 with hashes, in the throwaway environment pip runs from
#   build-root.sh package SOURCE  the build stage: the package itself, nothing else, built with
#                                 what build-deps installed (no build isolation fetching the
#                                 newest); fails when the nghttp2 codec or the compiled core did
#                                 not build (the image never falls back)
#   build-root.sh runtime [harden]  the final stage: libnghttp2, the codec's only run-time
#                                 need (then harden, in the same step)
#   build-root.sh harden          the final stage: no pip, no shell (run it last: it removes
#                                 the shell it runs in)
#
# pip runs from a throwaway environment (/opt/build-pip) and installs into the sidecar's with
# --python, so the sidecar's environment never holds pip; `harden` removes the throwaway one
# and the base's own pip.
set -eu

VENV=/opt/tls-sidecar
BUILD_PIP=/opt/build-pip
PYTHON=python3
export PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1

build_pip() {
    if [ ! -x "$BUILD_PIP/bin/python" ]; then
        "$PYTHON" -m venv "$BUILD_PIP"
    fi
}

pip_install() {
    build_pip
    "$BUILD_PIP/bin/python" -m pip --python "$VENV/bin/python" install --quiet "$@"
}

apt_install() {
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null
    rm -rf /var/lib/apt/lists/*
}

case "${1:-}" in
build-tools)
    # Python's headers come with python:3.13-slim's own Python; Debian's python3 needs
    # python3-dev for them.
    if "$PYTHON" -c 'import os, sys, sysconfig; sys.exit(not os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")))'; then
        apt_install gcc libc6-dev libnghttp2-dev
    else
        apt_install gcc libc6-dev libnghttp2-dev python3-dev
    fi
    ;;
runtime)
    apt_install libnghttp2-14
    # `runtime harden`: both final-stage steps in one layer
    if [ "${2:-}" = "harden" ]; then
        exec /bin/sh "$0" harden
    fi
    ;;
deps)
    "$PYTHON" -m venv --without-pip "$VENV"
    pip_install --require-hashes --no-deps -r "$2"
    ;;
build-deps)
    build_pip
    "$BUILD_PIP/bin/python" -m pip install --quiet --require-hashes --no-deps -r "$2"
    ;;
package)
    # a wheel built in a scratch folder: the source may be read-only. setup.py builds the
    # optional nghttp2 codec and the compiled core (mypyc) where a compiler and the headers
    # are; an in-place build from a developer's editable install is not shipped.
    # The wheel is built in the throwaway environment (the same Python as the sidecar's) with
    # the locked build requirements build-deps installed, not whatever versions pip's build
    # isolation would fetch: the compiled core is what that mypy compiles.
    build=$(mktemp -d)
    cp -R "$2/pyproject.toml" "$2/setup.py" "$2/README.md" "$2/proxy" "$build/"
    rm -f "$build"/proxy/http2/_nghttp2.c
    find "$build/proxy" -name '*.so' -delete
    build_pip
    "$BUILD_PIP/bin/python" -m pip wheel --quiet --no-deps --no-build-isolation \
        --check-build-dependencies --wheel-dir "$build/dist" "$build"
    pip_install --no-deps "$build"/dist/*.whl
    rm -rf "$build"
    if ! "$VENV/bin/python" -c 'import proxy.http2._nghttp2'; then
        echo "build-root.sh: the nghttp2 HTTP/2 codec did not build (run build-tools first)" >&2
        exit 1
    fi
    if ! "$VENV/bin/python" -c 'import sys, proxy.compiled as c; sys.exit(not c.built())'; then
        echo "build-root.sh: the compiled core did not build (run build-tools first)" >&2
        exit 1
    fi
    ;;
harden)
    # No pip (nothing installs at run time) ...
    rm -rf "$BUILD_PIP"
    if "$PYTHON" -m pip --version >/dev/null 2>&1; then
        "$PYTHON" -m pip uninstall --yes --quiet pip
    fi
    if "$PYTHON" -m pip --version >/dev/null 2>&1 || "$VENV/bin/python" -m pip --version >/dev/null 2>&1; then
        echo "build-root.sh: pip is still importable" >&2
        exit 1
    fi
    # ... and no shell (nothing for an attacker to exec into). Last: this removes our own shell.
    exec /bin/rm -f /bin/sh /bin/bash /bin/dash /usr/bin/sh /usr/bin/bash /usr/bin/dash
    ;;
*)
    echo "usage: build-root.sh build-tools | deps LOCKFILE | build-deps LOCKFILE | package SOURCE | runtime | harden" >&2
    exit 2
    ;;
esac
