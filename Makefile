# Development tasks. `make` lists them; `make test` needs only Python 3.11, Java 17 and Maven.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
BENCH_STAMP := $(VENV)/.bench-installed

.DEFAULT_GOAL := help
.PHONY: help install jars lint test test-unit demo bench clean distclean

help: ## list the targets
	@awk 'BEGIN {FS = ":.*## "} /^[a-z-]+:.*## / {printf "  %-10s %s\n", $$1, $$2}' $(MAKEFILE_LIST)

install: $(STAMP) ## create .venv and install the package with its dev extras

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -e '.[dev]'
	touch $@

jars: ## fetch the Kafka broker jars from Maven Central into .cache/kafka (once)
	$(PYTHON) scripts/localstack.py fetch-jars

lint: install ## ruff check, ruff format --check and mypy
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/mypy --strict scripts/localstack.py

# The ten-minute soak runs in a pytest of its own beside the rest of the suite; its output,
# with the table of every reliability scenario, follows the suite's.
test: install jars ## all tests, with a real Kafka broker and a real MLflow server
	@mkdir -p build
	@$(BIN)/pytest -m soak > build/soak-test.log 2>&1 & soak=$$!; \
	$(BIN)/pytest -m "not soak"; suite=$$?; \
	echo "--- waiting for the soak (tests/test_soak.py) ---"; \
	wait $$soak; soaked=$$?; cat build/soak-test.log; \
	test $$suite -eq 0 -a $$soaked -eq 0

test-unit: install ## tests that need no Kafka and no MLflow
	$(BIN)/pytest -m "not integration"

demo: install jars ## run examples/demo.py
	$(BIN)/python examples/demo.py

$(BENCH_STAMP): $(STAMP)
	$(BIN)/pip install -e '.[dev,bench]'
	touch $@

bench: $(BENCH_STAMP) jars ## benchmark the sink against MLflow's ceiling (BENCH_ARGS="--help")
	$(BIN)/python bench/bench.py $(BENCH_ARGS)

clean: ## remove caches and build output (keeps .venv and the Kafka jars)
	rm -rf build dist *.egg-info .pytest_cache .mypy_cache .ruff_cache
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -exec rm -rf {} +

distclean: clean ## also remove .venv and .cache (the Kafka jars)
	rm -rf $(VENV) .cache
