# Two commands do all set-up on a fresh machine: `make run` and `make test`.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PIP := $(BIN)/pip --disable-pip-version-check -q

.PHONY: run test install native proto clean

# The compiled FSS kernels (protocols/mpc/fss_native.py says which and why): each
# protocols/mpc/native/NAME.c becomes libNAME.so, built offline with the system C compiler; without
# one the numpy path is used and this prints one line saying so.
NATIVE_DIR := protocols/mpc/native
NATIVE_LIB := $(patsubst $(NATIVE_DIR)/%.c,$(NATIVE_DIR)/lib%.so,$(wildcard $(NATIVE_DIR)/*.c))
NATIVE_CFLAGS := -O3 -Wall -fPIC -shared -pthread -fno-strict-aliasing

$(BIN)/python:
	$(shell command -v $(PY) >/dev/null 2>&1 && echo $(PY) || echo python3) -m venv $(VENV)

$(STAMP): $(BIN)/python requirements.txt requirements-nodeps.txt pyproject.toml
	$(PIP) install torch==2.13.0
	$(PIP) install -r requirements.txt
	$(PIP) install --no-deps -r requirements-nodeps.txt
	$(PIP) install --no-deps --no-build-isolation -e .
	touch $(STAMP)

$(NATIVE_DIR)/lib%.so: $(NATIVE_DIR)/%.c $(wildcard $(NATIVE_DIR)/*.h)
	@if command -v $(CC) >/dev/null 2>&1 && $(CC) $(NATIVE_CFLAGS) -o $@.tmp $<; then mv $@.tmp $@; \
	else rm -f $@.tmp; echo "privinf: could not compile $< with '$(CC)'; this kernel uses the numpy path (slower)"; fi

native: $(NATIVE_LIB)

install: $(STAMP) $(NATIVE_LIB)

run: $(STAMP) $(NATIVE_LIB)
	$(BIN)/privinf launch --protocol mpc --model minilm --variant exact \
		--input "Private inference keeps both the prompt and the model secret." --report run-report.json

test: $(STAMP) $(NATIVE_LIB)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -x tests

proto: $(STAMP)
	$(BIN)/python -m protocols.net.wire.regenerate
	$(BIN)/python -m he_kernels.regenerate

clean:
	rm -rf $(VENV) run-report.json $(NATIVE_LIB)
