# The README's commands. Each target creates and uses its own virtual environment in .venv.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: run test test-slow fuzz lint typecheck loadtest lock clean

run: $(STAMP)
	$(BIN)/tls-sidecar demo

test: lint typecheck
	$(BIN)/pytest -m "not slow" -q

test-slow: $(STAMP)
	$(BIN)/pytest -m slow -q -s

fuzz: $(STAMP)
	TLS_SIDECAR_FUZZ_EXAMPLES=$${EXAMPLES:-5000} $(BIN)/pytest -q tests/integration/test_fuzz.py

lint: $(STAMP)
	$(BIN)/ruff check proxy tests loadtest
	$(BIN)/ruff format --check proxy tests loadtest
	$(BIN)/lint-imports

typecheck: $(STAMP)
	$(BIN)/mypy

loadtest: $(STAMP)
	$(BIN)/python -m loadtest

# requirements.lock: what the image installs, pinned with hashes (needs PyPI). pip-compile
# resolves for the Python it runs on, so the lock is made by the image's Python (3.13), in an
# environment of its own; the machine's pip configuration (local indexes) is left out.
LOCK_PYTHON ?= python3.13
LOCK_VENV   := .cache/lock-venv
lock:
	$(LOCK_PYTHON) -m venv $(LOCK_VENV)
	PIP_CONFIG_FILE=/dev/null $(LOCK_VENV)/bin/python -m pip install -q 'pip-tools>=7.4'
	PIP_CONFIG_FILE=/dev/null $(LOCK_VENV)/bin/pip-compile --quiet --generate-hashes --strip-extras \
	  --no-emit-index-url --no-emit-find-links --output-file requirements.lock pyproject.toml

$(BIN)/python:
	@$(PYTHON) -m venv $(VENV) 2>/dev/null || { \
	  rm -rf $(VENV); \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "python3 cannot create a virtual environment: installing python3-venv"; \
	    apt-get update -qq && apt-get install -y -qq python3-venv >/dev/null && $(PYTHON) -m venv $(VENV); \
	  else \
	    echo "error: python3 cannot create a virtual environment; fix: sudo apt-get install -y python3-venv"; exit 1; \
	  fi; }

# the C shim is built in place by the editable install: a change to it reinstalls
$(STAMP): $(BIN)/python pyproject.toml setup.py proxy/http2/_nghttp2_shim.c proxy/http2/_nghttp2_build.py
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	@touch $(STAMP)

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .mypy_cache .ruff_cache \
	  proxy/http2/_nghttp2*.so proxy/http2/_nghttp2.c
