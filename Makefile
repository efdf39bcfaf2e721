# The two commands in the README: `make bench` (the main job) and `make test`.
# Both create .venv on first use; every pip call goes through constraints.txt.
PYTHON ?= python3
VENV   := .venv
PIP    := $(VENV)/bin/python -m pip --disable-pip-version-check
STAMP  := $(VENV)/.installed
# The install is redone when these change: the CUDA library and the C extension
# are built from csrc/ by setup.py.
NATIVE := CMakeLists.txt $(shell find csrc -type f 2>/dev/null)
SGLANG := $(VENV)/.sglang-installed

.PHONY: bench test install clean

$(STAMP): setup.py pyproject.toml constraints.txt $(NATIVE)
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q -c constraints.txt -e '.[test,bench,storage-cu13]'
	$(VENV)/bin/hicache-bench --version
	touch $@

# The tests run against the real SGLang (its memory pools, storage factory and
# plugin loader): the pinned CPU subset of it, without resolving its GPU
# dependencies (see the file's header).
$(SGLANG): $(STAMP) requirements-sglang-test.txt
	$(PIP) install -q --no-deps -c constraints.txt -r requirements-sglang-test.txt
	touch $@

install: $(STAMP) $(SGLANG)

bench: $(STAMP)
	$(VENV)/bin/hicache-bench

test: $(STAMP) $(SGLANG)
	$(VENV)/bin/python -m pytest -q
	bash .ci/triton_matrix.sh   # the Triton kernel compiled under every supported Triton

clean:
	rm -rf $(VENV) build *.egg-info
