# Two entry points: `make demo` (the main job) and `make test` (the test suite).
# Both create .venv on first use and install everything into it.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEVSTAMP := $(VENV)/.installed-dev

.PHONY: demo test install clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# CPU machines: install the CPU torch build first, so the unpinned `torch` requirement
	# does not pull a multi-GB CUDA build. Machines with an NVIDIA GPU keep their own.
	if ! command -v nvidia-smi >/dev/null 2>&1; then $(BIN)/python -m pip install -q torch==2.13.0; fi
	$(BIN)/python -m pip install -q -e .
	touch $(STAMP)

# The test suite's extras (pytest, the S3 test server, scikit-image) on top: `make demo` does
# not wait for them.
$(DEVSTAMP): $(STAMP)
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(DEVSTAMP)

install: $(DEVSTAMP)

demo: $(STAMP)
	$(BIN)/robustseg demo

test: $(DEVSTAMP)
	RAY_DATA_DISABLE_PROGRESS_BARS=1 $(BIN)/python -m pytest -q --durations=25 tests

clean:
	rm -rf $(VENV) .pytest_cache robustseg_work
