# Two commands set everything up on a fresh machine with Python 3.11:
#   make demo   creates .venv, installs visionpeft with its extras, runs the main job on the embedded data
#   make test   same set-up, then runs the test suite
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed
# torch is pinned to the release cached on the build machines (a newer one is never required)
TORCH_PIN ?= torch==2.14.1 torchvision==0.29.1
PYTEST_ARGS ?=

.PHONY: venv demo test test-all lint bench clean

$(STAMP): setup.py pyproject.toml Makefile
	@test -x $(PY) || $(PYTHON) -m venv $(VENV) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q $(TORCH_PIN)
	$(PIP) install -q -e ".[dev]"
	@touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(PY) tools/train.py --config configs/demo/*.yaml --restart

test: $(STAMP)
	$(PY) -m pytest -q $(PYTEST_ARGS)

test-all: $(STAMP)
	$(PY) -m pytest -q -m "slow or not slow" $(PYTEST_ARGS)

lint: $(STAMP)
	$(PY) -m ruff check visionpeft tools tests
	$(PY) -m ruff format --check visionpeft tools tests
	$(VENV)/bin/lint-imports

bench: $(STAMP)
	$(PY) tools/benchmark.py

clean:
	rm -rf $(VENV) build *.egg-info
