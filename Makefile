# The README's two commands: `make demo` (set up, run the main job) and `make test` (set up, run
# the suite). Both start with the idempotent set-up, so a fresh machine needs nothing else.
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup demo test lint doctest bench plot clean
setup:
	@bash scripts/setup.sh

demo: setup
	@$(VENV)/bin/cpkv demo

# The whole check CI runs: lint, the docstring examples (pure arithmetic and descriptions:
# no optional extras, no network), then the suite.
test: setup lint doctest
	@$(PY) -m pytest -q

lint: setup
	@$(VENV)/bin/ruff check cpkv tests benchmarks plots examples scripts

doctest: setup
	@$(PY) -m pytest -q --doctest-modules cpkv

bench: setup
	@$(VENV)/bin/cpkv bench kernels

plot: setup
	@$(VENV)/bin/cpkv plot

# Mutation testing (not part of `make test` or CI): hand-written mutants of the code that decides
# which bytes go where, each run against the tests that cover it; report in
# benchmarks/results/mutation.md. Under an hour on a 2-core machine.
.PHONY: mutate
mutate: setup
	@$(PY) scripts/mutate.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .hypothesis
