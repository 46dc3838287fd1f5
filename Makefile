# HuViDPO developer entry points. Every target works from a fresh clone.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# What `make install` installs: the hashed lock of the tests' dependencies (x86-64 Linux, CPython 3.11,
# torch's CPU build). LOCK= (empty) installs unlocked instead: TORCH_SPEC first, then the project's ranges
# (another platform, or a CUDA wheel on a GPU host).
LOCK ?= requirements/lock-dev.txt
TORCH_SPEC ?= torch==2.13.0
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_VERBOSITY := error
export DIFFUSERS_VERBOSITY := error

STAMP := $(VENV)/.installed

.PHONY: install lock test test-fast lint demo bench proto deploy-check store-policies clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

# The lock (every package pinned and hashed, with the services' `server` extra and the tools and doubles
# the tests use, `dev`), then the project alone, editable. Re-run only when pyproject.toml or the lock
# changes (or with `make -B install`).
$(STAMP): pyproject.toml $(LOCK) | $(BIN)/python
	if [ -n "$(LOCK)" ]; then \
	  $(BIN)/pip install --quiet --require-hashes -r "$(LOCK)" \
	  && $(BIN)/pip install --quiet --no-deps --no-build-isolation -e . ; \
	else \
	  $(BIN)/pip install --quiet "$(TORCH_SPEC)" && $(BIN)/pip install --quiet -e ".[server,dev]" ; \
	fi
	touch $(STAMP)

install: $(STAMP)

# Regenerate requirements/lock-*.txt after a change to pyproject.toml's dependencies (uv in build/uv;
# kept pins stay, UPGRADE=1 upgrades; CU126=1 adds the cu126 image's lock). See scripts/lock.sh.
lock:
	bash scripts/lock.sh

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
