# The two set-up commands of the README: `make demo` and `make test`.
# torch is installed first and pinned here (and only here) so that pip never resolves an unpinned torch,
# which would download the CUDA build.
PYTHON ?= python3
VENV ?= .venv
TORCH_VERSION ?= 2.13.0
BIN := $(VENV)/bin

.PHONY: install demo test bench clean

$(BIN)/.detkit-installed: pyproject.toml Makefile
	@echo "creating the virtual environment $(VENV) with $(PYTHON) ..."
	$(PYTHON) -m venv $(VENV)
	@echo "installing torch $(TORCH_VERSION) into $(VENV) (pinned; a large download the first time) ..."
	$(BIN)/pip install -q --disable-pip-version-check torch==$(TORCH_VERSION)
	@echo "installing detkit (editable) with its test tools, '.[dev]', into $(VENV) ..."
	$(BIN)/pip install -q --disable-pip-version-check -e '.[dev]'
	touch $@
	@echo "done: $(VENV) is ready (detkit: $(BIN)/detkit)"

install: $(BIN)/.detkit-installed

demo: install
	$(BIN)/detkit demo

test: install
	$(BIN)/python -m pytest -q tests

bench: install
	$(BIN)/python benchmarks/data_pipeline.py
	$(BIN)/python benchmarks/retinanet.py

clean:
	rm -rf $(VENV) runs datasets
