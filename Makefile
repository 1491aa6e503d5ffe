# The two commands of the README: `make train` and `make test`. Everything else hangs off them.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# CPU machines: torch 2.13.0 CPU build. GPU users: `make venv TORCH_INDEX=https://download.pytorch.org/whl/cu128`
# (any torch >= 2.4 with CUDA works; the lock pins the rest).
TORCH ?= torch==2.13.0
TORCH_INDEX ?=
EXTRAS ?= dev,assets,vision
OUT ?= runs/smoke
PORT ?= 29611
export TORCH_EXTENSIONS_DIR := $(CURDIR)/.torch_extensions
export OMP_NUM_THREADS ?= 1
export PYTHONUNBUFFERED := 1

.PHONY: venv train test test-all smoke study bench clean-venv system-deps docker-deps docker-lint docker-build docker-test

venv: $(STAMP)

$(STAMP): pyproject.toml requirements/lock.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX),)
	DS_BUILD_OPS=0 $(PY) -m pip install -q -c requirements/lock.txt -e ".[$(EXTRAS)]"
	touch $@

NPROC ?= 2
# --num_accelerators: on CPU the launcher otherwise starts a single process.
LAUNCH = $(VENV)/bin/deepspeed --num_accelerators $(NPROC) --master_port $(PORT) --module padnet_ds.cli

# The embedded default: 2 CPU ranks, deepspeed launcher, MiniLM upcycled to PAD-MoE on Rotten Tomatoes.
# Each run gets a fresh timestamped folder, so nothing written before is touched (TRAIN_OUT=runs/x ARGS=resume=true
# continues an interrupted run).
TRAIN_OUT ?= runs/default-$(shell date +%Y%m%d-%H%M%S)
train: $(STAMP)
	$(LAUNCH) train configs/default.yaml output_dir=$(TRAIN_OUT) $(ARGS)

smoke: $(STAMP)
	$(LAUNCH) train configs/smoke.yaml output_dir=$(OUT) $(ARGS)

# PAD's quality claim: dense vs fully dynamic MoE vs PAD at several ratios (+ random ablation), GLUE from a local glue_data.
PADNET_SHARED ?= ../shared
GLUE_DIR ?= $(PADNET_SHARED)/glue
TASKS ?= sst2,mrpc
RATIOS ?= 1.0,0.5,0.3
SEEDS ?= 1,2
STUDY_OUT ?= runs/study-$(shell date +%Y%m%d-%H%M%S)
study: $(STAMP)
	$(LAUNCH) study configs/study.yaml tasks=$(TASKS) ratios=$(RATIOS) seeds=$(SEEDS) out=$(STUDY_OUT) \
		data.glue_dir=$(GLUE_DIR) $(ARGS)

# Speed and memory ratios, measured side by side in one run; writes bench-results.json (see bench/README.md).
bench: $(STAMP)
	$(PY) -m bench.run_all $(ARGS)

# ruff (pyproject.toml's [tool.ruff]) first: a lint error fails the test command before pytest starts.
test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q $(ARGS)

test-all: $(STAMP) system-deps
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q -m "" $(ARGS)

# System packages: Open MPI (mpirun + mpi4py's libmpi) and pdsh for the launcher tests (Debian/Ubuntu, root or
# sudo; a no-op when installed). CI calls it before `make test`.
system-deps:
	scripts/install-system-deps.sh

# podman + runc + debootstrap for the image targets.
docker-deps:
	scripts/install-system-deps.sh docker

docker-lint:
	docker/lint.sh

# The CPU image padnet-ds:cpu (DOCKER_VARIANT=cuda: padnet-ds:cuda on nvidia/cuda:12.8.1-cudnn-devel-ubuntu24.04).
# Makes the python:3.11-slim base locally with debootstrap when no registry is reachable (cached).
DOCKER_VARIANT ?= cpu
docker-build: docker-deps
	docker/build.sh --variant $(DOCKER_VARIANT)

# Lint + build + 2-rank smoke training inside the image as the non-root user (not part of `make test`).
docker-test: docker-deps
	docker/test.sh

clean-venv:
	rm -rf $(VENV)
