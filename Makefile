# tierserve: `make up` runs the stack on this machine's CPU; `make test` runs the test suite.
# Both create .venv (Python 3.11) from the pinned lock on first use.
PYTHON ?= python3.11
VENV ?= .venv
PIP_FLAGS ?= -q --disable-pip-version-check
CONFIG ?= deploy/cpu.yaml
PYTEST_ARGS ?=

.PHONY: install system-deps up test test-unit bench clean

install: $(VENV)/.installed

$(VENV)/.installed: requirements/cpu.lock.txt pyproject.toml
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install $(PIP_FLAGS) --no-deps -r requirements/cpu.lock.txt 2>&1 | grep -v "^WARNING: Location" || true
	$(VENV)/bin/pip install $(PIP_FLAGS) --no-deps -e . 2>&1 | grep -v "^WARNING: Location" || true
	$(VENV)/bin/python -c "import vllm, ray.serve, FlagEmbedding, qdrant_client, serving, router"
	touch $@

system-deps:
	./deploy/system-deps.sh

up: install system-deps
	$(VENV)/bin/tierserve up --config $(CONFIG)

test: install system-deps
	$(VENV)/bin/python -m pytest tests $(PYTEST_ARGS)

test-unit: install
	$(VENV)/bin/python -m pytest tests/unit $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .tierserve .pytest_cache
