# One-command set-up: `make test` creates .venv, installs ldct-cli and runs the suite.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# torch 2.13.0 is installed first and on its own: that pin takes the local CPU wheel,
# and then the package's `torch>=2.3` is already satisfied (no CUDA downloads).
TORCH := torch==2.13.0

.PHONY: install test test-fast bench demo clean

$(BIN)/ldct: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH)
	$(BIN)/python -m pip install -q -e '.[dev]'
	@touch $@

install: $(BIN)/ldct

test: install
	$(BIN)/python -m pytest -q

test-fast: install
	$(BIN)/python -m pytest -q -m "not slow and not realdata"

# A phantom study, its simulated quarter dose, every bundled model, scored (demo-out/).
demo: install
	LDCT=$(BIN)/ldct PYTHON=$(BIN)/python bash tools/demo.sh

bench: install
	$(BIN)/python -m benchmarks.bench_denoise --out bench-out
	$(BIN)/python -m benchmarks.bench_train --out bench-out

clean:
	rm -rf $(VENV) bench-out demo-out *.egg-info
