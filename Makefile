# Everything a newcomer needs: `make demo` and `make test` set themselves up.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: test demo bench profile soak lint typecheck imports unit clean tools

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

# Debian's docker-compose validates the compose files (there is no Docker engine here).
tools:
	@command -v docker-compose >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing docker-compose (Debian) to validate compose files"; \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq docker-compose) >/dev/null \
	      || echo "docker-compose could not be installed; compose validation tests will skip"; \
	  else echo "docker-compose missing and not root; compose validation tests will skip"; fi; }
	@ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || command -v initdb >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing postgresql (Debian) for the workflow store tests"; \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql) >/dev/null \
	      || { echo "postgresql could not be installed"; exit 1; }; \
	  else echo "postgresql is missing and this is not root: install Debian's postgresql package"; exit 1; fi; }

lint: $(STAMP)
	$(BIN)/ruff check sidecar tests deploy bench

typecheck: $(STAMP)
	$(BIN)/mypy sidecar

# The import contracts in pyproject.toml: layers, no cycles, sidecar/ never imports tests.
imports: $(STAMP)
	$(BIN)/lint-imports

# The workflow store tests start their own PostgreSQL server (tests/support/postgres.py);
# here a missing server fails the run instead of skipping those tests.
test: $(STAMP) tools lint typecheck imports
	SIDECAR_POSTGRES=required $(BIN)/pytest -q

unit: $(STAMP)
	$(BIN)/pytest -q tests/unit

demo: $(STAMP)
	$(BIN)/python -m deploy.demo

# Both install wrk and nginx-light through apt when missing (as root; otherwise exit 2).
# BENCH_QUICK=1: one short round of a subset. Results in bench/results/.
bench: $(STAMP)
	$(BIN)/python -m bench.run
	$(BIN)/python -m bench.sagas $(if $(BENCH_QUICK),--requests 500 --sagas 60)
	$(BIN)/python -m bench.mtls $(if $(BENCH_QUICK),--requests 500)

# py-spy on both sidecars of the mesh path under a fixed rate: flame graphs and top functions.
profile: $(STAMP)
	$(BIN)/python -m bench.profile

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache *.egg-info
