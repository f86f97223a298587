# Two commands do all set-up on a fresh machine: `make run` and `make test`.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PIP := $(BIN)/pip --disable-pip-version-check -q

.PHONY: run test install proto clean

$(BIN)/python:
	$(shell command -v $(PY) >/dev/null 2>&1 && echo $(PY) || echo python3) -m venv $(VENV)

$(STAMP): $(BIN)/python requirements.txt requirements-nodeps.txt pyproject.toml
	$(PIP) install torch==2.13.0
	$(PIP) install -r requirements.txt
	$(PIP) install --no-deps -r requirements-nodeps.txt
	$(PIP) install --no-deps --no-build-isolation -e .
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(BIN)/privinf launch --protocol mpc --model minilm --variant exact \
		--input "Private inference keeps both the prompt and the model secret." --report run-report.json

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -x tests

proto: $(STAMP)
	$(BIN)/python -m protocols.net.wire.regenerate
	$(BIN)/python -m he_kernels.regenerate

clean:
	rm -rf $(VENV) run-report.json
