# Two entry points: `make demo` (the main job) and `make test` (the test suite).
# Both create .venv on first use and install everything into it.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test install clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	# --no-compile: pip would byte-compile every installed module (torch, ray, mlflow: tens of
	# thousands of files, ~20 s on 2 cores); Python compiles the modules a run imports, once.
	# CPU machines: install the CPU torch build first, so the unpinned `torch` requirement
	# does not pull a multi-GB CUDA build. Machines with an NVIDIA GPU keep their own.
	if ! command -v nvidia-smi >/dev/null 2>&1; then $(BIN)/python -m pip install -q --no-compile torch==2.13.0; fi
	$(BIN)/python -m pip install -q --no-compile -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/robustseg demo

test: $(STAMP)
	RAY_DATA_DISABLE_PROGRESS_BARS=1 $(BIN)/python -m pytest -q tests

clean:
	rm -rf $(VENV) .pytest_cache robustseg_work
