# Ember: the two set-up commands (see README.md).
PYTHON ?= python3
PIP := $(PYTHON) -m pip

.PHONY: install install-test serve test

# NOTE: torch==2.13.0 installs a CPU build on these machines; an unpinned torch
# would pull several GB of CUDA wheels.
install:
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e .
	ember download

install-test: install
	$(PIP) install -q -e ".[test]"

serve: install
	ember serve

test: install-test
	$(PYTHON) -m pytest -q
