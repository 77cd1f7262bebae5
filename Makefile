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

.PHONY: venv demo test test-all mmseg lint bench mutate clean

$(STAMP): setup.py pyproject.toml Makefile
	@test -x $(PY) || $(PYTHON) -m venv $(VENV) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q $(TORCH_PIN)
	$(PIP) install -q -e ".[dev]"
	@touch $(STAMP)

venv: $(STAMP)

# classification on the embedded digits (4 methods), then segmentation of the embedded digit scenes; one table
demo: $(STAMP)
	$(PY) tools/train.py --config configs/demo/*.yaml configs/demo-seg/*.yaml --restart

test: $(STAMP)
	$(PY) -m pytest -q $(PYTEST_ARGS)

test-all: $(STAMP)
	$(PY) -m pytest -q -m "slow or not slow" $(PYTEST_ARGS)

# the mmsegmentation integration (the mmseg extra is part of dev; this target reinstalls it and runs its tests)
mmseg: $(STAMP)
	$(PIP) install -q -e ".[mmseg]"
	$(PY) -m pytest -q -m mmseg tests/test_mmseg.py $(PYTEST_ARGS)

lint: $(STAMP)
	$(PY) -m ruff check visionpeft tools tests
	$(PY) -m ruff format --check visionpeft tools tests
	$(VENV)/bin/lint-imports

bench: $(STAMP)
	$(PY) tools/benchmark.py

# Mutation testing (docs/testing.md): not part of CI nor of `make test`. Configured in pyproject.toml [tool.mutmut];
# the mutants, the results and mutmut's cache live in mutants/ (git-ignored), so a second call resumes where the
# first stopped (a timed-out call loses no result). MUTATE_ONLY: mutant-name globs, e.g.
#   make mutate MUTATE_ONLY='visionpeft.methods.*'      (one package; visionpeft.model.* is model.py)
# MUTATE_BUDGET: wall-clock limit (timeout(1) syntax); MUTATE_JOBS: parallel workers.
MUTATE_ONLY ?=
MUTATE_BUDGET ?= 4h
MUTATE_JOBS ?= 2

mutate: $(STAMP)
	-env -u PYTHONPATH OMP_NUM_THREADS=1 timeout --signal=TERM --kill-after=60 $(MUTATE_BUDGET) \
		$(VENV)/bin/mutmut run --max-children $(MUTATE_JOBS) $(foreach m,$(MUTATE_ONLY),'$(m)')
	$(VENV)/bin/mutmut export-cicd-stats
	@cat mutants/mutmut-cicd-stats.json
	$(VENV)/bin/mutmut results

clean:
	rm -rf $(VENV) build *.egg-info mutants
