# lckd_kit: two commands do everything on a fresh machine.
#   make test   -- set up .venv and run the test suite (what CI runs)
#   make demo   -- set up .venv and run the LCKD-vs-baseline experiment on bundled/generated phantoms
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed-stamp

.PHONY: setup test test-e2e demo lab bench workshop-prep samples clean

$(PY):
	$(PYTHON) -m venv $(VENV)

# Re-install only when the project metadata changes; torch is installed (CPU wheel, pinned)
# only when it is not importable, so a second run does nothing.
$(STAMP): pyproject.toml | $(PY)
	@$(PY) -c "import torch" 2>/dev/null || $(PIP) install -q "torch==2.13.0"
	$(PIP) install -q -e ".[notebooks,dev]"
	@touch $(STAMP)

setup: $(STAMP)

test: setup
	$(PY) -m pytest -q

test-e2e: setup
	bash tests/e2e/run.sh

demo: setup
	$(PY) -m lckd_kit experiment --out outputs/demo

# JupyterLab on this machine only (127.0.0.1), behind the login token it prints; as root (containers,
# cloud VMs) Jupyter refuses to start without --allow-root, so it is passed then and only then.
lab: setup
	$(VENV)/bin/jupyter lab notebooks/ --ip=127.0.0.1 $$(if [ "$$(id -u)" = 0 ]; then echo --allow-root; fi)

bench: setup
	$(PY) benchmarks/run.py

workshop-prep: setup
	$(PY) -m lckd_kit workshop-prep

clean:
	rm -rf outputs .cache .pytest_cache
