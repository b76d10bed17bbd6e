# speedloop: `make demo` runs the main job, `make test` the CPU test suite.
# Both create .venv at the repository root and install what is missing.
# `make gpu-check` uses the Python already on a GPU machine and installs nothing.

VENV    := .venv
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.installed
SYSPY   ?= python3

.PHONY: demo test gpu-check lint

$(STAMP): pyproject.toml
	test -x $(PY) || $(SYSPY) -m venv $(VENV)
	@# Without a CUDA GPU, take the CPU wheel of torch first so nothing pulls a CUDA build.
	if ! nvidia-smi -L >/dev/null 2>&1; then \
	    $(PY) -m pip install -q torch==2.13.0 triton==3.7.1; fi
	$(PY) -c 'import tomllib; p = tomllib.load(open("pyproject.toml", "rb"))["project"]; \
	    print("\n".join(p["dependencies"] + p["optional-dependencies"]["dev"]))' \
	    > $(VENV)/requirements.txt
	$(PY) -m pip install -q -r $(VENV)/requirements.txt
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m data prepare embedded
	$(PY) train.py --preset cpu-tiny --out runs/demo/result.json

test: $(STAMP)
	$(PY) -m pytest -q -m "not gpu" tests

gpu-check:
	$(SYSPY) -m pytest -q -m gpu tests
	$(SYSPY) -m bench.gpu_check

lint: $(STAMP)
	$(PY) -m ruff check .
