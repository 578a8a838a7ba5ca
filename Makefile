# Set-up and the two everyday commands. `make run` and `make test` create .venv on first use.
PYTHON ?= python3
VENV ?= .venv
# Pins torch to the CPU wheel these machines hold; empty it to keep the torch you installed.
TORCH_CONSTRAINT ?= constraints/torch-cpu.txt
EXTRAS ?= test

BIN := $(VENV)/bin
STAMP := $(VENV)/.daskdist-installed

.PHONY: setup run test lint bench clean slurm-up slurm-down

$(STAMP): pyproject.toml $(TORCH_CONSTRAINT)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet $(if $(TORCH_CONSTRAINT),-c $(TORCH_CONSTRAINT)) -e ".[$(EXTRAS)]"
	touch $@

setup: $(STAMP)

PIPELINE ?= pipelines/digits-mlp.yaml
CLUSTER ?= local

run: setup
	$(BIN)/daskdist run $(PIPELINE) --cluster $(CLUSTER) --overwrite

test: setup
	$(BIN)/ruff check daskdist tests benchmarks
	$(BIN)/python -m pytest

lint: setup
	$(BIN)/ruff check daskdist tests benchmarks

bench: setup
	$(BIN)/python benchmarks/bench_throughput.py
	$(BIN)/python benchmarks/bench_fit_start.py
	$(BIN)/python benchmarks/bench_diloco.py
	$(BIN)/python benchmarks/bench_zarr.py
	$(BIN)/python benchmarks/bench_strategies.py
	$(BIN)/python benchmarks/bench_pipeline.py
	$(BIN)/python benchmarks/bench_multihost.py
	$(BIN)/python benchmarks/cost_model.py

# A one-node Slurm cluster on this machine (needs root: installs Debian's slurmctld, slurmd,
# slurm-client and munge when missing, writes /etc/slurm/slurm.conf); then
# `daskdist run pipelines/digits-mlp.yaml --cluster slurm` submits its workers as batch jobs.
slurm-up: setup
	$(BIN)/python -m daskdist.testing.slurm up

slurm-down: setup
	$(BIN)/python -m daskdist.testing.slurm down

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache
