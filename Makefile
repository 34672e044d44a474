# The front door. Every target that needs a database uses DATABASE_URL when it is set,
# and otherwise starts (or reuses) the embedded PostgreSQL server in .pgdata/.

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
export PYTHONPATH := $(CURDIR)/src:$(CURDIR)

# Evaluated by the shell when a recipe runs, so the server starts only when needed.
DB_URL = $$($(PY) -m localdev.embedded_pg url)

.PHONY: run test soak lint format db-url db-stop clean

run: $(VENV)/.installed  ## migrate, enqueue a demo workload, run 8 workers, check the order
	DATABASE_URL="$(DB_URL)" $(PY) -m localdev.demo

test: $(VENV)/.installed  ## the test suite, on a real PostgreSQL
	DATABASE_URL="$(DB_URL)" $(PY) -m pytest $(PYTEST_ARGS)

soak: $(VENV)/.installed  ## workers under kills, freezes and connection kills; SOAK_ARGS=...
	DATABASE_URL="$(DB_URL)" $(PY) -m localdev.soak $(SOAK_ARGS)

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

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
build-QueueWorkerFunction:
	cp -r src/handler src/queue_core sql "$(ARTIFACTS_DIR)/"
	python3 -m pip install --quiet -r requirements.txt -t "$(ARTIFACTS_DIR)" \
		--platform manylinux2014_aarch64 --implementation cp --python-version 3.12 \
		--only-binary=:all:
