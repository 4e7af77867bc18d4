# Ember: the two set-up commands (see README.md).
PYTHON ?= python3
PIP := $(PYTHON) -m pip
TEST_WORKERS ?= 2

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

# The tests run in two pytest-xdist workers, a module per worker at a time; the
# ones marked `serial` (they assert on wall-clock time) then run alone.
test: install-test
	$(PYTHON) -m pytest -q -n $(TEST_WORKERS) --dist loadfile -m "not serial"
	$(PYTHON) -m pytest -q -m serial
