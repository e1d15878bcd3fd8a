# The README's commands. Each target creates and uses its own virtual environment in .venv.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# `make run` installs what `serve` and the demo need; tests and tools add the [dev] extra.
RUN_STAMP := $(VENV)/.installed-run
STAMP     := $(VENV)/.installed
# The lock's versions as constraints, without its hashes (pip would then demand hashes for the
# editable install too, which has no file to hash). The dev install leaves cryptography out:
# sslyze, the tests' TLS scanner, needs cryptography<47 (see README, "Development").
CONSTRAINTS     := $(VENV)/constraints.txt
DEV_CONSTRAINTS := $(VENV)/constraints-dev.txt
# build-requirements.lock's versions constrain the editable install's build (mypyc compiles with
# the mypy the image's build uses) and the dev tools (so `make typecheck` runs that mypy too).
BUILD_CONSTRAINTS := $(VENV)/constraints-build.txt
# setuptools' "Editable installation" box warns about folders named like the package: ours is
# the package itself.
PIP := PYTHONWARNINGS="ignore:Editable installation" $(BIN)/python -m pip

.PHONY: run test test-interpreted test-slow fuzz lint typecheck loadtest lock clean

run: $(RUN_STAMP)
	$(BIN)/tls-sidecar demo

test: lint typecheck
	$(BIN)/pytest -m "not slow" -q

# The compiled core's modules from their .py sources (mypyc changes semantics at the edges:
# both builds must pass): the unit tests, the HTTP/1.1 integration modules and the main HTTP/2
# ones, about 3 minutes
# where the whole unit and integration layers take 8.5 (2 shared cores).
INTERPRETED_TESTS := tests/unit $(addprefix tests/integration/test_,proxying.py errors.py \
  protocol_edges.py smuggling.py faults.py proxy_protocol_in.py proxy_protocol_out.py compiled.py \
  http2.py http2_downgrade.py http2_defences.py)
test-interpreted: $(STAMP)
	TLS_SIDECAR_COMPILED=0 $(BIN)/pytest -m "not slow" -q $(INTERPRETED_TESTS)

test-slow: $(STAMP)
	$(BIN)/pytest -m slow -q -s

fuzz: $(STAMP)
	TLS_SIDECAR_FUZZ_EXAMPLES=$${EXAMPLES:-5000} $(BIN)/pytest -q tests/integration/test_fuzz.py tests/integration/test_http2_fuzz.py

lint: $(STAMP)
	$(BIN)/ruff check proxy tests loadtest
	$(BIN)/ruff format --check proxy tests loadtest
	$(BIN)/lint-imports

typecheck: $(STAMP)
	$(BIN)/mypy

loadtest: $(STAMP)
	$(BIN)/python -m loadtest

# requirements.lock: what the image installs, pinned with hashes (needs PyPI); and
# build-requirements.lock: what builds it (setuptools, cffi, mypy for mypyc), the same way.
# pip-compile resolves for the Python it runs on, so the locks are made by the image's Python
# (3.13), in an environment of its own; the machine's pip configuration (local indexes) is left
# out.
LOCK_PYTHON ?= python3.13
LOCK_VENV   := .cache/lock-venv
lock:
	$(LOCK_PYTHON) -m venv $(LOCK_VENV)
	PIP_CONFIG_FILE=/dev/null $(LOCK_VENV)/bin/python -m pip install -q 'pip-tools>=7.4'
	PIP_CONFIG_FILE=/dev/null $(LOCK_VENV)/bin/pip-compile --quiet --generate-hashes --strip-extras \
	  --no-emit-index-url --no-emit-find-links --output-file requirements.lock pyproject.toml
	PIP_CONFIG_FILE=/dev/null $(LOCK_VENV)/bin/pip-compile --quiet --generate-hashes --strip-extras \
	  --no-emit-index-url --no-emit-find-links --all-build-deps --only-build-deps --allow-unsafe \
	  --output-file build-requirements.lock pyproject.toml

$(BIN)/python:
	@$(PYTHON) -m venv $(VENV) 2>/dev/null || { \
	  rm -rf $(VENV); \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "python3 cannot create a virtual environment: installing python3-venv"; \
	    apt-get update -qq && apt-get install -y -qq python3-venv >/dev/null && $(PYTHON) -m venv $(VENV); \
	  else \
	    echo "error: python3 cannot create a virtual environment; fix: sudo apt-get install -y python3-venv"; exit 1; \
	  fi; }

# a lock's `name==version` lines, without their hashes
PINS := sed -n 's/^\([A-Za-z0-9_.-]*==[^ ]*\).*/\1/p'
$(CONSTRAINTS): requirements.lock build-requirements.lock $(BIN)/python
	@$(PINS) requirements.lock > $@
	@$(PINS) build-requirements.lock > $(BUILD_CONSTRAINTS)
	@grep -v '^cryptography==' $@ | cat - $(BUILD_CONSTRAINTS) | sort -u > $(DEV_CONSTRAINTS)

# the C shim and the compiled core are built in place by the editable install: a change to
# either reinstalls
COMPILED_SOURCES := $(shell sed -n 's/^    "\(proxy\.[a-z0-9_.]*\)",$$/\1/p' proxy/compiled.py | tr . / | sed 's/$$/.py/')
$(RUN_STAMP): $(BIN)/python pyproject.toml setup.py proxy/http2/_nghttp2_shim.c proxy/http2/_nghttp2_client.c proxy/http2/_nghttp2_build.py proxy/compiled.py $(COMPILED_SOURCES) $(CONSTRAINTS)
	$(PIP) install -q --upgrade 'pip>=25.3'
	$(PIP) install -q -c $(CONSTRAINTS) --build-constraint $(BUILD_CONSTRAINTS) -e .
	@touch $(RUN_STAMP)

# the dev extra's requirements alone: installing '.[dev]' would build the package a second time
$(STAMP): $(RUN_STAMP)
	$(BIN)/python -c "import tomllib; print('\\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['optional-dependencies']['dev']))" > $(VENV)/requirements-dev.txt
	$(PIP) install -q -c $(DEV_CONSTRAINTS) -r $(VENV)/requirements-dev.txt
	@touch $(STAMP)

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .mypy_cache .ruff_cache \
	  proxy/http2/_nghttp2*.so proxy/http2/_nghttp2.c proxy_core__mypyc*.so
	find proxy -name '*.so' -delete
