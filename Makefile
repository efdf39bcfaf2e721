# The two commands in the README: `make bench` (the main job) and `make test`.
# Both create .venv on first use; every pip call goes through constraints.txt.
PYTHON ?= python3
VENV   := .venv
PIP    := $(VENV)/bin/python -m pip --disable-pip-version-check
STAMP  := $(VENV)/.installed

.PHONY: bench test install clean

$(STAMP): setup.py pyproject.toml constraints.txt
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q -c constraints.txt -e '.[test,bench,storage]'
	touch $@

install: $(STAMP)

bench: $(STAMP)
	$(VENV)/bin/hicache-bench

test: $(STAMP)
	$(VENV)/bin/python -m pytest -q
	bash .ci/triton_matrix.sh   # the Triton kernel compiled under every supported Triton

clean:
	rm -rf $(VENV) build *.egg-info
