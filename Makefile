# AggBox: the front door. `make` lists the targets; nothing needs activating first,
# every tool is called from .venv/bin/.

VENV        := .venv
PYTHON      := $(VENV)/bin/python
AGGBOX      := $(VENV)/bin/aggbox
EXPERIMENTS := $(sort $(wildcard experiments/*.yaml))
# `make experiment FULL=1` runs the full parameter grids instead of the quick ones.
RUN_FLAGS   := $(if $(filter 1 yes true,$(FULL)),--full)

.DEFAULT_GOAL := help
# Steps share .venv and the kernel; running them side by side (make -j) would only race.
.NOTPARALLEL:
.PHONY: help setup test test-unit test-kernel lint experiment doctor clean clean-testbeds \
	docker-up docker-down image bpf-check test-docker test-ansible test-long clean-cloud lock notebook

help: ## list the targets
	@echo "AggBox: make <target>"
	@awk -F':.*## ' '/^[a-z-]+:.*## / {printf "  %-15s %s\n", $$1, $$2}' $(MAKEFILE_LIST)
	@echo "Start with 'sudo make experiment' or 'sudo make test'; see README.md."

# AGGBOX_TORCH=auto|cpu|pypi|no: where torch (gloo baseline, training) comes from; see
# scripts/setup.sh (default: PyTorch's CPU index when it answers, else none).
setup: ## install packages, kernel headers link and .venv (fast when already done)
	@bash scripts/setup.sh

# Targets that need no root still get a venv: setup runs when it is missing or stale.
$(AGGBOX): pyproject.toml requirements.lock
	@bash scripts/setup.sh
	@touch $@

# pytest exits 5 when it collects nothing; make fails on it like on any non-zero code.
test: setup lint test-unit test-kernel ## lint, unit tests and kernel tests (needs root)

test-unit: $(AGGBOX) ## unit tests (no root needed)
	$(PYTHON) -m pytest tests/unit

test-kernel: setup ## kernel tests: real eBPF in network namespaces (needs root; not 'long')
	$(PYTHON) -m pytest -m "not long" --durations=20 tests/kernel

test-long: setup ## the kernel tests too slow for make test (e.g. training in containers)
	$(PYTHON) -m pytest -m long tests/kernel

# ansible-lint looks for ansible-playbook and the collections on PATH: the venv's first.
lint: $(AGGBOX) ## ruff, shellcheck, yamllint and ansible-lint (production profile)
	$(VENV)/bin/ruff check aggbox tests playbooks/files
	@command -v shellcheck >/dev/null || { echo "lint: no shellcheck (sudo make setup installs it)"; exit 1; }
	shellcheck scripts/*.sh docker/*.sh docker/bpf-check/*.sh .ci/run
	$(VENV)/bin/yamllint --strict playbooks .yamllint .ansible-lint
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(VENV)/bin/ansible-lint --profile production playbooks/

# pip-compile keeps the pins already in requirements.lock unless a change in pyproject.toml
# needs another version (UPGRADE=1: newest versions of everything).
lock: $(AGGBOX) ## regenerate requirements.lock (pinned, hashed) from pyproject.toml
	CUSTOM_COMPILE_COMMAND="make lock" $(VENV)/bin/pip-compile --extra dev --generate-hashes \
		--strip-extras --no-emit-index-url --no-emit-find-links \
		$(if $(filter 1 yes true,$(UPGRADE)),--upgrade) -o requirements.lock pyproject.toml

# The notebook is committed with its outputs; this redraws them from the runs in results/
# (no timing metadata: an unchanged run gives an unchanged file).
notebook: $(AGGBOX) ## re-execute results/analysis.ipynb in place (commit it afterwards)
	$(PYTHON) -c "import nbformat; from nbclient import NotebookClient; \
		p = 'results/analysis.ipynb'; nb = nbformat.read(p, as_version=4); \
		NotebookClient(nb, timeout=600, kernel_name='python3', record_timing=False).execute(); nbformat.write(nb, p)"

experiment: setup ## run every experiments/*.yaml (quick; FULL=1 for the full grids)
	@test -n "$(EXPERIMENTS)" || { echo "no experiments/*.yaml to run"; exit 1; }
	@failed=""; \
	for exp in $(EXPERIMENTS); do \
		echo "== $$exp"; \
		$(AGGBOX) run $$exp $(RUN_FLAGS) || failed="$$failed $$exp"; \
		latest=$$(ls -td results/$$(basename $$exp .yaml)/*/ 2>/dev/null | head -n 1); \
		if [ -n "$$latest" ]; then echo "   results in $$latest"; fi; \
	done; \
	$(AGGBOX) report >/dev/null || failed="$$failed report"; \
	echo "Results: results/<experiment>/<run-id>/ (samples, summary.csv, meta.json, figures *.png/*.pdf)"; \
	echo "Report:  results/REPORT.md"; \
	if [ -n "$$failed" ]; then echo "FAILED:$$failed"; exit 1; fi

doctor: $(AGGBOX) ## check kernel features, privileges, BCC and headers
	$(AGGBOX) doctor

clean-testbeds: $(AGGBOX) ## remove namespaces/containers left behind by interrupted runs
	$(AGGBOX) testbed down --all
	@$(PYTHON) -c 'from aggbox.testbed.docker import down_all_docker as d; c, n = d(); \
		print(f"removed {len(c)} containers, {len(n)} networks")'

docker-up: ## start the Docker engine for the docker testbed (installs docker.io; idempotent)
	@bash docker/engine.sh up

docker-down: ## stop the Docker engine that docker-up started (images are kept)
	@bash docker/engine.sh down

image: docker-up ## build the aggbox image (toolchain, checked bpf/ programs, the package)
	@bash docker/build.sh

bpf-check: ## compile every bpf/*.c with clang -target bpf (what `make image` checks)
	@bash docker/bpf-check/check.sh

test-docker: setup ## the docker backend tests only (builds the image; slow)
	$(PYTHON) -m pytest -m docker tests/kernel

test-ansible: setup ## the ansible-over-SSH tests only (local stand-in hosts; slow)
	$(PYTHON) -m pytest -m ansible tests/kernel

clean-cloud: $(AGGBOX) ## teardown.yml on the hosts of INVENTORY=... (uninstalls aggbox too)
	@test -n "$(INVENTORY)" || { echo "usage: make clean-cloud INVENTORY=path/to/inventory"; exit 2; }
	$(VENV)/bin/ansible-playbook -i "$(INVENTORY)" playbooks/teardown.yml -e aggbox_uninstall=true

clean: ## remove .venv, stamps and caches (results/ is kept)
	rm -rf $(VENV) .stamps .pytest_cache .ruff_cache build
	find . -path ./.git -prune -o \( -name __pycache__ -o -name '*.egg-info' \) -prune \
		-exec rm -rf {} +
