# scancache: every target is idempotent. `make demo` and `make test` are all a new user needs.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch 2.13.0 is the CPU build this machine kind ships as a local wheel (the optional torch
# backend, from the torch extra). TensorFlow, the default backend, comes with the loaders extra.
TORCH ?= torch==2.13.0
SOURCE ?= demo-output/source
STORE ?= demo-output/store
PORT ?= 8000
BENCH_ARGS ?=
DEMO_ARGS ?=

.PHONY: setup demo test test-torch check bench preprocess serve docker-build clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e ".[all,dev]" "$(TORCH)"
	touch $@

demo: setup
	$(BIN)/python -m examples.demo --out demo-output $(DEMO_ARGS)

# The suite runs under TensorFlow (Keras' default backend).
test: setup
	PATH="$(abspath $(BIN)):$$PATH" KERAS_BACKEND=tensorflow $(BIN)/python -m pytest -q -p no:cacheprovider tests

# The loader, training and inference tests again under the torch backend.
TORCH_TESTS ?= tests/test_loaders.py tests/test_inference.py tests/test_custom_loader.py \
	tests/test_loader_fast_paths.py tests/test_training_scale.py tests/test_training.py \
	tests/test_torch_inference.py
# (The TensorFlow-only tests, backend choice and MirroredStrategy, ran in `make test`.)
test-torch: setup
	PATH="$(abspath $(BIN)):$$PATH" KERAS_BACKEND=torch $(BIN)/python -m pytest -q -p no:cacheprovider \
		-k "not default_backend and not mirrored" $(TORCH_TESTS)

check: setup
	$(BIN)/ruff check service client store loaders tests benchmarks examples
	$(BIN)/ruff format --check service client store loaders tests benchmarks examples
	$(BIN)/mypy service client store loaders examples

bench: setup
	$(BIN)/python -m benchmarks.run $(BENCH_ARGS)

preprocess: setup
	test -d $(SOURCE) || $(BIN)/scancache sample-data $(SOURCE)
	$(BIN)/scancache preprocess $(SOURCE) $(STORE)

serve: setup
	$(BIN)/scancache serve $(STORE) --port $(PORT)

docker-build:
	docker build -f docker/Dockerfile -t scancache:latest .

clean:
	rm -rf demo-output bench-output .pytest_cache .mypy_cache .ruff_cache
