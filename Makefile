# smig-lab — run `make` for the list of targets. Targets that touch the network need root.
PY      := .venv/bin/python
PYTEST  := $(PY) -m pytest
TRIALS  ?= 5
SCENARIO ?= all

.DEFAULT_GOAL := help
.PHONY: help setup setup-vm test test-unit test-lab test-kernel lab experiment vm-experiment bench lint clean-captures

help: ## list the targets
	@echo "smig-lab targets (run as root, e.g. 'sudo make test'):"
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed -E 's/:.*## /\t/' | awk -F'\t' '{printf "  %-15s %s\n", $$1, $$2}'

setup: ## install Debian packages, build .venv, start Open vSwitch (idempotent)
	@bash scripts/setup.sh base

setup-vm: ## also install what the kernel-path VM needs (QEMU, distribution kernel)
	@bash scripts/setup.sh vm

test: setup ## the whole test suite: lint, unit, Mininet lab tests, kernel-path VM tests
	$(PY) -m ruff check .
	$(PYTEST) -m "not vm"
	$(MAKE) --no-print-directory test-kernel

test-unit: setup ## pure unit and in-process tests only (no root needed after setup)
	$(PYTEST) -m "not lab and not vm"

test-lab: setup ## Mininet lab tests only
	$(PYTEST) -m lab

test-kernel: setup-vm ## kernel-path tests in a distribution-kernel VM (virtme-ng, QEMU/TCG)
	@bash scripts/vm/run-tests.sh

lab: setup ## open the Mininet CLI with the M2M lab and its processes running
	$(PY) -m experiments.runner lab

experiment: setup ## run the handover experiments (TRIALS=, SCENARIO=)
	$(PY) -m experiments.experiment --trials "$(TRIALS)" --scenario "$(SCENARIO)"

bench: setup ## REGISTER/s and call set-ups/s: smig-lab proxy vs Kamailio, side by side
	$(PY) bench/run.py

vm-experiment: setup-vm ## the experiment in the kernel VM (VM_TRIALS=1): kernel ESP, OVS datapath, netem (TCG timings)
	SMIG_VM_MODE=experiment SMIG_VM_TRIALS=$(or $(VM_TRIALS),1) SMIG_VM_TIMEOUT=2400 SMIG_VM_MEMORY=4G bash scripts/vm/run-tests.sh

lint: setup ## ruff
	$(PY) -m ruff check .

clean-captures: ## delete run folders under captures/
	find captures -mindepth 1 -maxdepth 1 ! -name README.md -exec rm -rf {} +
