# The two commands in the README: `make bench` (the main job) and `make test`.
# Both create .venv on first use; every pip call goes through constraints.txt.
PYTHON ?= python3
VENV   := .venv
PIP    := $(VENV)/bin/python -m pip --disable-pip-version-check
STAMP  := $(VENV)/.installed
# The install is redone when these change: the CUDA library and the C extension
# are built from csrc/ by setup.py.
NATIVE := CMakeLists.txt $(shell find csrc -type f 2>/dev/null)

.PHONY: bench test install clean

$(STAMP): setup.py pyproject.toml constraints.txt $(NATIVE)
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q -c constraints.txt -e '.[test,bench,storage-cu13]'
	$(VENV)/bin/hicache-bench --version
	touch $@

install: $(STAMP)

bench: $(STAMP)
	$(VENV)/bin/hicache-bench

test: $(STAMP)
	$(VENV)/bin/python -m pytest -q

clean:
	rm -rf $(VENV) build *.egg-info
