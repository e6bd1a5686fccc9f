# scancache: every target is idempotent. `make demo` and `make test` are all a new user needs.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch 2.13.0 is the CPU build this machine kind ships as a local wheel (a Keras backend).
TORCH ?= torch==2.13.0
SOURCE ?= demo-output/source
STORE ?= demo-output/store
PORT ?= 8000
BENCH_ARGS ?=
DEMO_ARGS ?=

.PHONY: setup demo test check bench preprocess serve docker-build clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e ".[all,dev]" "$(TORCH)"
	touch $@

demo: setup
	$(BIN)/python -m examples.demo --out demo-output $(DEMO_ARGS)

test: setup
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/python -m pytest -q -p no:cacheprovider tests

check: setup
	$(BIN)/ruff check service client loaders tests benchmarks examples
	$(BIN)/ruff format --check service client loaders tests benchmarks examples
	$(BIN)/mypy service client loaders examples

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
