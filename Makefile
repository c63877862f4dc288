# The two commands: `make demo` (whole pipeline on the built-in synthetic data) and `make test`.
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
PY := $(VENV)/bin/python
DIHT := $(VENV)/bin/diht
PREFECT_PORT ?= 4200
MLFLOW_PORT ?= 5000
STATE := $(CURDIR)/.state

export HF_HUB_OFFLINE := 1
export DO_NOT_TRACK := true
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export MLFLOW_DISABLE_TELEMETRY := true
export DVC_NO_ANALYTICS := 1
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS := 120  # the ephemeral server on a busy 2-core machine
export PREFECT_HOME := $(STATE)/prefect
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)

.PHONY: install demo test test-fast serve worker run-full ui repro dvc-record check-baseline docker-check compose-up clean ablation ablation-quick ablation-dvc

# uv installs the same packages as pip from the same sources (tools/uv_install_args.py passes pip's configuration on)
# in seconds where pip's resolver takes minutes; pip itself where uv cannot be installed.
$(VENV)/.installed: pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PY) -m pip install --disable-pip-version-check -q uv==0.13.9 \
	  && $(PY) tools/uv_install_args.py --python $(PY) -q -e '.[dev]' \
	  || { echo "uv did not install the project: pip installs it"; \
	       $(PY) -m pip install --disable-pip-version-check -q -e '.[dev]'; }
	@touch $@

install: $(VENV)/.installed

demo: install
	@mkdir -p $(STATE)/prefect
	$(DIHT) run --params params.yaml --set mlflow.set_alias=true
	@$(MAKE) --no-print-directory dvc-record
	@echo
	@echo "Results:  metrics/*.json   plots/   models/model.pt   data/"
	@$(DIHT) summary --params params.yaml
	@echo "MLflow:   make ui   (or: .venv/bin/mlflow ui --backend-store-uri sqlite:///.state/mlflow.db --host 127.0.0.1) then open http://127.0.0.1:$(MLFLOW_PORT)"

# pytest-xdist: TEST_WORKERS processes, a test file each at a time (module fixtures built once), in collection order
# (the files with end-to-end tests first: tests/conftest.py); each worker's torch, OpenMP and BLAS on one thread, so
# the workers do not oversubscribe the cores.
TEST_WORKERS ?= 2
test: install
	@mkdir -p $(STATE)/prefect
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder

test-fast: install
	@mkdir -p $(STATE)/prefect
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder -m "not slow"

repro: install
	dvc repro

# Record the pipeline's outputs in dvc.lock, every stage, as `dvc repro` would have (the flow skips recaption when
# it is off; its no-op writes the outputs DVC expects), then check that `dvc repro` has nothing left to rerun.
dvc-record: install
	@$(PY) -c "from diht_core.config import load_params; raise SystemExit(load_params().recaption.enabled)" \
	  && $(PY) -m tasks.recaption --params params.yaml >/dev/null 2>&1 || true
	dvc commit -f -q
	@dvc status -q && echo "dvc: every stage recorded in dvc.lock (dvc repro has nothing to rerun)" \
	  || { dvc status; echo "dvc: dvc.lock does not match the outputs (above)"; exit 1; }

# The committed baseline (dvc.lock, metrics/) reproduced: the whole demo, then every output hash in dvc.lock and
# every metrics file compared with the commit (bit for bit; a CPU and a GPU do not train the same bits).
check-baseline: install
	@git ls-files --error-unmatch dvc.lock metrics/summary.json >/dev/null 2>&1 \
	  || { echo "check-baseline: no committed baseline (dvc.lock, metrics/summary.json) to compare with"; exit 1; }
	@$(MAKE) --no-print-directory demo
	@if git diff --quiet HEAD -- dvc.lock metrics; then echo "check-baseline: dvc.lock and metrics/ reproduced exactly"; \
	else git --no-pager diff --stat HEAD -- dvc.lock metrics; dvc metrics diff; \
	  echo "check-baseline: differs from the committed baseline (git diff HEAD -- dvc.lock metrics)"; exit 1; fi

PREFECT_API := http://127.0.0.1:$(PREFECT_PORT)/api

# Starts a Prefect server on 127.0.0.1:$(PREFECT_PORT) unless one answers there already (then reuses it);
# a server started here stops when the recipe ends.
define PREFECT_SERVER
mkdir -p $(STATE)/prefect; \
if ! curl -sf $(PREFECT_API)/health >/dev/null; then \
  prefect server start --host 127.0.0.1 --port $(PREFECT_PORT) > $(STATE)/prefect-server.log 2>&1 & echo $$! > $(STATE)/prefect-server.pid; \
  trap 'kill $$(cat $(STATE)/prefect-server.pid) 2>/dev/null' EXIT INT TERM; \
  for i in $$(seq 90); do curl -sf $(PREFECT_API)/health >/dev/null && break; sleep 1; done; \
fi; \
echo "Prefect server on http://127.0.0.1:$(PREFECT_PORT) (log: .state/prefect-server.log)"; \
echo "Run:  make run-full   (= PREFECT_API_URL=$(PREFECT_API) prefect deployment run diht/full)"
endef

# The deployments full, filter-only, eval-only, ablation served by one process (`diht serve`).
# In another shell: make run-full
serve: install
	@$(PREFECT_SERVER); \
	PREFECT_API_URL=$(PREFECT_API) $(DIHT) serve --params params.yaml

# Or the same deployments from prefect.yaml, run by a worker of the process pool diht-local.
worker: install
	@$(PREFECT_SERVER); \
	export PREFECT_API_URL=$(PREFECT_API) DIHT_PROJECT_DIR=$(CURDIR); \
	prefect work-pool create diht-local --type process --overwrite >/dev/null && \
	prefect --no-prompt deploy --all && \
	prefect worker start --pool diht-local

run-full:
	PREFECT_API_URL=$(PREFECT_API) prefect deployment run diht/full --watch

ui: install
	mlflow ui --backend-store-uri sqlite:///$(STATE)/mlflow.db --host 127.0.0.1 --port $(MLFLOW_PORT)

# Lint docker/ without a Docker daemon: hadolint on the Dockerfiles, compose.yaml against the compose-spec schema
# and its own references (tests/test_docker.py); plus `docker compose config` where Compose is installed.
docker-check: install
	$(PY) -m pytest -q -p no:cacheprovider tests/test_docker.py
	@if docker compose version >/dev/null 2>&1; then docker compose -f docker/compose.yaml config -q && echo "docker compose config: ok"; \
	else echo "docker compose: not installed here (checked against the compose-spec schema only)"; fi

# The stack of docker/compose.yaml: Postgres, MLflow server, Prefect server, a GPU worker.
compose-up:
	mkdir -p data models metrics plots datasets
	docker compose -p diht -f docker/compose.yaml up -d --build

# The ablation grid (flows/ablation.py; params.yaml: ablation): metrics/ablation.json, plots/ablation{,_effects}.png, MLflow.
ablation: install
	@mkdir -p $(STATE)/prefect
	$(PY) -m flows.ablation --params params.yaml

ablation-quick: install
	@mkdir -p $(STATE)/prefect
	$(PY) -m flows.ablation --params params.yaml --quick

# The same grid as DVC experiments: queue them, then `dvc queue start -j 1`; compare with `dvc exp show`.
ablation-dvc: install
	$(PY) -m flows.ablation --params params.yaml --dvc-queue

clean:
	rm -rf data models metrics plots .state/checkpoints
