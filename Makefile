# One command sets up and runs the demo (make demo), one runs the tests (make test).
# Both create .venv on first use and re-install when pyproject.toml changes.

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.mmcrf-installed
PIP_FLAGS ?= --only-binary :all:

.PHONY: install demo test test-slow test-realdata test-browser test-dicom test-deploy lint bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install $(PIP_FLAGS) -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(BIN)/mmcrf demo --output demo_output --progress

lint: install
	$(BIN)/ruff check .

test: lint
	$(BIN)/python -m pytest -m "not slow and not realdata and not browser and not dciodvfy and not deploy"

# The long end-to-end tests (whole bundles trained and run, the demo, multi-process and Slurm
# launches): about six minutes more on two cores.
test-slow: install
	$(BIN)/python -m pytest -m "slow and not realdata and not browser and not dciodvfy and not deploy"

# The tests on the real data beside the checkout (../shared/data): about a minute more.
test-realdata: install
	$(BIN)/python -m pytest -m realdata

# The HTML report in a real browser: installs Debian's chromium when missing (needs root).
test-browser: install
	command -v chromium >/dev/null || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium)
	$(BIN)/python -m pytest -m browser

# The DICOM the project writes, checked by dciodvfy: installs Debian's dicom3tools when missing
# (needs root).
test-dicom: install
	command -v dciodvfy >/dev/null || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dicom3tools)
	$(BIN)/python -m pytest -m dciodvfy

# The MONAI Deploy application, run by Holoscan on this machine: installs the deploy extra.
test-deploy: install
	$(BIN)/python -m pip install $(PIP_FLAGS) -e ".[dev,deploy]"
	$(BIN)/python -m pytest -m deploy

bench: install
	$(BIN)/python benchmarks/bench_crf.py

clean:
	rm -rf $(VENV) demo_output .pytest_cache .ruff_cache *.egg-info
