# HuViDPO developer entry points. Every target works from a fresh clone.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_SPEC ?= torch==2.13.0
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_VERBOSITY := error
export DIFFUSERS_VERBOSITY := error

STAMP := $(VENV)/.installed

.PHONY: install test test-fast lint demo bench proto deploy-check store-policies clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

# torch first (a CPU wheel here; a CUDA wheel on a GPU host), then the project, which accepts it, with the
# services' dependencies (the `server` extra) and the tools and doubles the tests use (`dev`).
# Re-run only when pyproject.toml changes (or with `make -B install`).
$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/pip install --quiet -e ".[server,dev]"
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy huvidpo services

# The whole loop on the embedded default (local store in out/demo/store, local executor); see demo/__main__.py
# for --store s3 / --executor kubernetes. Writes out/demo/{video.mp4,metrics.png,summary.json}.
demo: $(STAMP)
	$(BIN)/python -m demo --out out/demo

bench: $(STAMP)
	$(BIN)/python bench/run_all.py --out bench/RESULTS.md

proto: $(STAMP)
	$(BIN)/python -m services.inference.protogen

# Render every kustomization (kubectl v1.35), validate it (kubernetes-validate --strict), promtool
# check/test the monitoring files, hadolint the Dockerfile. Needs Debian's prometheus (promtool).
deploy-check: $(STAMP)
	$(BIN)/python deploy/tools/check.py

# The per-component store policies (deploy/base/store-policies/, deploy/README.md's table), generated
# from services/common/store/policies.py; a test fails when the committed ones are stale.
store-policies: $(STAMP)
	$(BIN)/python -m services.common.store.policies --write

clean:
	rm -rf out build dist *.egg-info .pytest_cache .mypy_cache .ruff_cache
