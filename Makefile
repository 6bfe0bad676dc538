# fraud-mlops: `make run` (train on the real data, promote, serve) and `make test` (what CI runs).
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
LINT_VENV ?= .venv-lint
CHECKOV_VERSION := 3.3.30
LINT_STAMP := $(LINT_VENV)/.checkov-$(CHECKOV_VERSION)
DATA    ?= data/creditcard.csv
HOST    ?= 127.0.0.1
PORT    ?= 8000
export FRAUD_MLOPS_STORE ?= registry
# Jupyter refuses to start as root (as in a container) unless told to
LAB_AS_ROOT = $(if $(filter 0,$(shell id -u)),--allow-root)

.PHONY: help install data train promote serve run test test-fast lint lint-tools lab bench bench-scale bench-quality demo-loop clean

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed -E 's/:.*## /\t/' | expand -t 16

$(STAMP): setup.py settings.ini
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP) ## create .venv with the package (editable) and the dev tools

data: install ## fetch and verify the full dataset into $(DATA)
	$(BIN)/fraud-mlops fetch-data --dest $(DATA)

train: data ## train a candidate on the full data into $(FRAUD_MLOPS_STORE)
	$(BIN)/fraud-mlops train --data $(DATA)

promote: install ## promote the newest candidate if it beats the champion (rejected: the champion stays, not an error)
	$(BIN)/fraud-mlops promote || test $$? -eq 3

serve: install ## serve the champion on http://$(HOST):$(PORT)
	@echo "try: curl -s -X POST http://$(HOST):$(PORT)/predict -H 'Content-Type: application/json' -d @data/example_request.json"
	$(BIN)/fraud-mlops serve --host $(HOST) --port $(PORT)

run: ## the main job: set up, fetch the real data, train on all of it, promote, serve
	$(MAKE) train
	$(MAKE) promote
	$(MAKE) serve

test: install ## notebook tests (nbdev_test) and integration tests (pytest)
	FRAUD_MLOPS_STORE=$$(mktemp -d) FRAUD_MLOPS_CACHE_DIR=$$(mktemp -d) FRAUD_MLOPS_KEY_DIR=$$(mktemp -d)/keys $(BIN)/nbdev_test --n_workers 2
	$(BIN)/pytest -q tests; rc=$$?; \
	  if [ $$rc -eq 5 ]; then echo "pytest collected no tests: that is a failure here"; exit 1; fi; exit $$rc

test-fast: install ## the inner loop: pytest without the tests marked slow or network (pytest.ini), a few minutes on 2 cores
	$(BIN)/pytest -q -m "not slow and not network" tests; rc=$$?; \
	  if [ $$rc -eq 5 ]; then echo "pytest collected no tests: that is a failure here"; exit 1; fi; exit $$rc

lint: install lint-tools ## actionlint (with shellcheck), hadolint, cfn-lint and checkov on the workflow, Dockerfiles and stack
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/actionlint .github/workflows/ci-cd.yml
	$(BIN)/hadolint --failure-threshold info Dockerfile-inference Dockerfile-training
	$(BIN)/cfn-lint .aws/cloudformation.yml --include-checks I
	$(LINT_VENV)/bin/checkov --quiet --compact --skip-download --framework cloudformation --file .aws/cloudformation.yml

lint-tools: $(LINT_STAMP) ## checkov in its own virtualenv $(LINT_VENV): its many pins stay out of .venv

$(LINT_STAMP):
	rm -rf $(LINT_VENV)
	$(PY) -m venv $(LINT_VENV)
	$(LINT_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(LINT_VENV)/bin/python -m pip install --quiet 'checkov==$(CHECKOV_VERSION)'
	touch $@

bench: install ## load-test the API on 127.0.0.1 against the seed's way of serving and a no-model ceiling (needs wrk); peak RSS of the largest batch and of hostile bodies
	$(BIN)/python bench/serve_bench.py $(if $(MODEL),--model $(MODEL))

bench-scale: install ## file scoring at 1x, 4x and 16x the full data (rows replicated), in-process and on a 2-worker LocalCluster: rows/s, peak RSS
	$(BIN)/python bench/scale_bench.py

bench-quality: install ## detection quality on later data: the default against the seed's recipe at several time cuts (CUTS=s,s,...)
	$(BIN)/python bench/quality_bench.py --data $(DATA) $(if $(CUTS),--cuts $(CUTS))

demo-loop: data ## the loop on real data, checked: train on day 1, serve, replay day 2 with ids, late labels, monitor, a shifted replay's drift (a few minutes)
	$(BIN)/python bench/demo_loop.py --data $(DATA)

lab: install ## JupyterLab on nbs/ with the package installed in editable mode
	$(BIN)/jupyter lab --notebook-dir=nbs $(LAB_AS_ROOT)

clean: ## remove the virtualenvs and generated outputs (keeps the registry, the data and the signing keys)
	rm -rf $(VENV) .venv-lint runs build *.egg-info .pytest_cache
