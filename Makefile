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
	TLS_SIDECAR_FUZZ_EXAMPLES=$${EXAMPLES:-5000} $(BIN)/pytest -q tests/integration/test_fuzz.py tests/integration/test_http2_fuzz.py

lint: $(STAMP)
	$(BIN)/ruff check proxy tests loadtest
	$(BIN)/ruff format --check proxy tests loadtest

typecheck: $(STAMP)
	$(BIN)/mypy

loadtest: $(STAMP)
	$(BIN)/python -m loadtest

# requirements.lock: what the image installs, pinned with hashes (needs PyPI).
lock: $(STAMP)
	$(BIN)/pip-compile --quiet --generate-hashes --strip-extras --no-emit-index-url \
	  --no-emit-find-links --output-file requirements.lock pyproject.toml

$(BIN)/python:
	@$(PYTHON) -m venv $(VENV) 2>/dev/null || { \
	  rm -rf $(VENV); \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "python3 cannot create a virtual environment: installing python3-venv"; \
	    apt-get update -qq && apt-get install -y -qq python3-venv >/dev/null && $(PYTHON) -m venv $(VENV); \
	  else \
	    echo "error: python3 cannot create a virtual environment; fix: sudo apt-get install -y python3-venv"; exit 1; \
	  fi; }

$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	@touch $(STAMP)

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .mypy_cache .ruff_cache
