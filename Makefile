# The front door. Every target that needs a database uses DATABASE_URL when it is set,
# and otherwise starts (or reuses) the embedded PostgreSQL server in .pgdata/.

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
export PYTHONPATH := $(CURDIR)/src:$(CURDIR)

# Evaluated by the shell when a recipe runs, so the server starts only when needed.
DB_URL = $$($(PY) -m localdev.embedded_pg url)
# The database `make run` works on, created and migrated if missing.
DEMO_DB_URL = $$($(PY) -m localdev.embedded_pg demo-url)

.PHONY: run test soak lint format db-url db-stop clean bench bench-quick cli invoke lambda-sources

run: $(VENV)/.installed  ## migrate, enqueue a demo workload, run 8 workers, check the order
	DATABASE_URL="$(DB_URL)" $(PY) -m localdev.demo

test: $(VENV)/.installed  ## the test suite, on a real PostgreSQL
	DATABASE_URL="$(DB_URL)" $(PY) -m pytest $(PYTEST_ARGS)

bench: $(VENV)/.bench-installed  ## the benchmark (BENCH_ARGS=--quick for minutes)
	DATABASE_URL="$(DB_URL)" $(PY) -m bench $(BENCH_ARGS)

bench-quick: $(VENV)/.bench-installed
	DATABASE_URL="$(DB_URL)" $(PY) -m bench --quick $(BENCH_ARGS)

$(VENV)/.bench-installed: $(VENV)/.installed bench/requirements.txt
	$(PY) -m pip install --quiet -r bench/requirements.txt || \
		echo "bench: peers not installed; the benchmark will say so and go on"
	touch $@

cli: $(VENV)/.installed  ## the operator CLI on the same database: make cli ARGS='stats --json'
	@DATABASE_URL="$(DEMO_DB_URL)" $(PY) -m queue_core $(ARGS)

EVENT ?= events/schedule-default.json
invoke: $(VENV)/.installed  ## run lambda_handler in-process on EVENT (sam local invoke without Docker)
	@DATABASE_URL="$(DEMO_DB_URL)" $(PY) -m localdev.invoke "$(EVENT)" $(ARGS)

soak: $(VENV)/.installed  ## workers under kills, freezes and connection kills; SOAK_ARGS=...
	DATABASE_URL="$(DB_URL)" $(PY) -m localdev.soak $(SOAK_ARGS)

lint: $(VENV)/.installed  ## ruff, and cfn-lint on template.yaml
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .
	$(VENV)/bin/cfn-lint template.yaml

format: $(VENV)/.installed
	$(VENV)/bin/ruff format . && $(VENV)/bin/ruff check --fix .

db-url: $(VENV)/.installed  ## print the database URL in use (starts the embedded server)
	@$(PY) -m localdev.embedded_pg url

db-stop: $(VENV)/.installed  ## stop the embedded server (its data stays in .pgdata/)
	$(PY) -m localdev.embedded_pg stop

clean: db-stop
	rm -rf $(VENV) .pgdata .pytest_cache .ruff_cache

$(VENV)/.installed: requirements.txt requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements-dev.txt
	touch $@

# Called by `sam build` (BuildMethod: makefile): the deployed package has src/'s packages and
# sql/ at its root, and the runtime requirements built for Lambda's arm64 Python 3.12.
# samconfig.toml builds in the source tree (build_in_source), so nothing else is copied.
# Lambda's Python 3.12 runs on Amazon Linux 2023 (glibc 2.34): manylinux_2_28 wheels fit.
LAMBDA_PLATFORMS ?= manylinux_2_28_aarch64 manylinux2014_aarch64
LAMBDA_PYTHON    ?= 3.12

build-QueueWorkerFunction: lambda-sources
	python3 -m pip install --quiet -r requirements.txt -t "$(ARTIFACTS_DIR)" \
		$(addprefix --platform ,$(LAMBDA_PLATFORMS)) --implementation cp \
		--python-version $(LAMBDA_PYTHON) --only-binary=:all: --upgrade

# The project's own part of the package (tested without network in make test).
lambda-sources:
	@test -n "$(ARTIFACTS_DIR)" || { echo "ARTIFACTS_DIR is not set" >&2; exit 2; }
	mkdir -p "$(ARTIFACTS_DIR)"
	cp -r src/handler src/queue_core sql "$(ARTIFACTS_DIR)/"
	find "$(ARTIFACTS_DIR)/handler" "$(ARTIFACTS_DIR)/queue_core" \
		-name __pycache__ -type d -prune -exec rm -rf {} +
