# kiln — the two commands a newcomer needs are `make demo` and `make test` (see README.md).
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip

.PHONY: venv demo test test-unit test-tools lint format bench bench-quick images e2e-kind crd clean

## venv: a virtual environment with kiln and every extra installed (editable)
$(BIN)/kiln: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet -e ".[all]"
	touch $@
venv: $(BIN)/kiln

## demo: set up, then train -> compile -> serve -> query the digits example on this machine
demo: venv
	$(BIN)/python deploy/demo.py deploy/examples/digits-cnn.yaml

## test: install the test tools (control-plane binaries, helm) and run the whole suite (a failed build fails it; without Go the integration tests skip)
test: venv
	@if ! command -v go >/dev/null; then \
	  echo "Go is not installed: the integration tests will skip (hack/install-test-tools.sh needs Go)"; \
	  $(BIN)/pytest tests; \
	else \
	  set -o pipefail; bin="$$(bash hack/install-test-tools.sh | tail -n 1)" && KILN_TEST_BIN="$$bin" $(BIN)/pytest tests; \
	fi

test-unit: venv
	$(BIN)/pytest tests/unit

test-tools:
	bash hack/install-test-tools.sh

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

format: venv
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

## crd: regenerate the committed CRD from kiln.api
crd: venv
	$(BIN)/kiln crd > charts/kiln/crds/trainingjob.yaml

bench: venv
	set -o pipefail; bin="$$(bash hack/install-test-tools.sh | tail -n 1)" && KILN_TEST_BIN="$$bin" $(BIN)/python bench/run.py

bench-quick: venv
	set -o pipefail; bin="$$(bash hack/install-test-tools.sh | tail -n 1)" && KILN_TEST_BIN="$$bin" $(BIN)/python bench/run.py --quick

images:
	docker build -f operator/Dockerfile -t kiln-operator:0.1.0 .
	docker build -f trainer/Dockerfile -t kiln-trainer:0.1.0 .
	docker build -f trainer/Dockerfile.gpu -t kiln-trainer-gpu:0.1.0 .
	docker build -f serving/Dockerfile -t kiln-serving:0.1.0 .
	docker build -f serving/Dockerfile.gpu -t kiln-serving-gpu:0.1.0 .

e2e-kind:
	bash deploy/kind/e2e.sh

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
