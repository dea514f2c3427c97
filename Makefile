# The README's two commands: `make demo` and `make test`. Each installs what it needs.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export XLA_PYTHON_CLIENT_PREALLOCATE ?= false

.PHONY: install test test-slow test-wheel demo app clean

$(BIN)/python:
	$(PY) -m venv $(VENV)

# torch first, as the CPU wheel, so nothing pulls a multi-GB CUDA build.
$(STAMP): $(BIN)/python requirements-test.txt pyproject.toml
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -r requirements-test.txt
	$(BIN)/pip install -q --no-deps -e . --config-settings editable_mode=compat
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q -n 2 --durations=15 tests

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m slow tests

# Builds the wheel and installs it into a fresh venv with only its declared dependencies.
test-wheel: $(STAMP)
	$(BIN)/python -m pytest -q -m wheel tests/test_wheel_install.py

demo: $(STAMP)
	$(BIN)/python -m ip2p_jax.demo

# The web UI with the demo model on http://127.0.0.1:7860 (more flags: make app APP_ARGS="--port 8000")
app: $(STAMP)
	$(BIN)/ip2p app $(APP_ARGS)

clean:
	rm -rf $(VENV)
