# kiln — the two commands a newcomer needs are `make demo` and `make test` (see README.md).
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip

.PHONY: venv demo test test-unit test-tools lint format bench bench-quick images cluster cluster-down e2e-kind crd clean

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

## test: install the test tools (the Go-built cluster, Debian packages) and run the whole suite (a failed build fails it;
## without Go the integration and e2e tiers skip, and under CI=true the e2e tier fails instead)
## (the tools build and the venv install run side by side: on a fresh machine they are the first ~25 minutes)
test:
	@if ! command -v go >/dev/null; then \
	  echo "Go is not installed: the integration tests will skip (hack/install-test-tools.sh needs Go)"; \
	  $(MAKE) --no-print-directory venv && $(BIN)/pytest -m "not kind" tests; \
	else \
	  out="$$(mktemp)"; bash hack/install-test-tools.sh >"$$out" & tools=$$!; \
	  $(MAKE) --no-print-directory venv; venv_rc=$$?; wait $$tools; tools_rc=$$?; \
	  bin="$$(tail -n 1 "$$out")"; rm -f "$$out"; \
	  [ $$venv_rc = 0 ] && [ $$tools_rc = 0 ] && KILN_TEST_BIN="$$bin" $(BIN)/pytest -m "not kind" tests; \
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
	$(BIN)/python bench/serving_peers.py
	set -o pipefail; bin="$$(bash hack/install-test-tools.sh | tail -n 1)" && KILN_TEST_BIN="$$bin" $(BIN)/python bench/run.py

bench-quick: venv
	$(BIN)/python bench/serving_peers.py
	set -o pipefail; bin="$$(bash hack/install-test-tools.sh | tail -n 1)" && KILN_TEST_BIN="$$bin" $(BIN)/python bench/run.py --quick

## images: the five images from the Dockerfiles (Docker, else podman; KILN_IMAGES="operator trainer serving" picks some, IMAGES_EXPORT=DIR also writes OCI archives); see docs/images.md
images:
	bash hack/build-images.sh $(if $(IMAGES_EXPORT),--export $(IMAGES_EXPORT))

## cluster: a real single-node cluster on this machine (root, Linux; no Docker): control plane, containerd +
## kubelet + kube-proxy + CoreDNS, storage and kiln's images; its last line is the `export KUBECONFIG=...` to run
cluster: venv
	@set -o pipefail; bin="$$(bash hack/install-test-tools.sh | tail -n 1)" && KILN_TEST_BIN="$$bin" $(BIN)/python -m kiln_cluster up

## cluster-down: stop it and remove every process, bridge, rule, mount, cgroup and sysctl change it made
cluster-down: venv
	@bin="$$(ls -d $${XDG_CACHE_HOME:-$$HOME/.cache}/kiln/bin/k8s-* 2>/dev/null | head -n 1)"; KILN_TEST_BIN="$$bin" $(BIN)/python -m kiln_cluster down

e2e-kind: venv
	$(BIN)/pytest -m kind tests/e2e/test_kind.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
