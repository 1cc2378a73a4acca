# The README's two commands: `make demo` (set up, run the main job) and `make test` (set up, run
# the suite). Both start with the idempotent set-up, so a fresh machine needs nothing else.
VENV ?= .venv
PY := $(VENV)/bin/python
# The vLLM lane (scripts/setup_vllm.sh): vLLM's CPU build in its own venv, for tests/integrations.
VLLM_VENV ?= .venv-vllm
VLLM_PY := $(VLLM_VENV)/bin/python

.PHONY: setup setup-vllm demo test test-fast test-vllm lint doctest bench plot clean
setup:
	@bash scripts/setup.sh

setup-vllm:
	@CPKV_VLLM_VENV=$(VLLM_VENV) bash scripts/setup_vllm.sh

demo: setup
	@$(VENV)/bin/cpkv demo

# The whole check CI runs: lint, the docstring examples (pure arithmetic and descriptions:
# no optional extras, no network), the suite, then the vLLM lane's tests (real vLLM engines on
# the CPU; skipped, visibly, where the lane is not installed, e.g. on a CUDA machine).
test: setup lint doctest
	@$(PY) -m pytest -q --ignore=tests/integrations
	@$(MAKE) --no-print-directory test-vllm

# The quick lane while working: the kernels, pool layout, parallel arithmetic, wire protocol and
# in-process transfers, without the `slow` and `mp` (multi-process) tests (pyproject.toml);
# under a minute on a 2-core machine. Not a substitute for `make test`, which runs them all.
test-fast: setup
	@$(PY) -m pytest -q -m "not slow and not mp" --ignore=tests/integrations

test-vllm: setup-vllm
	@if [ -x $(VLLM_PY) ]; then $(VLLM_PY) -m pytest -q tests/integrations; \
	else $(PY) -m pytest -q -rs tests/integrations; fi

lint: setup
	@$(VENV)/bin/ruff check cpkv tests benchmarks plots examples scripts

# cpkv/integrations/vllm.py imports vLLM (only in the vLLM lane): its docstrings are not run here.
doctest: setup
	@$(PY) -m pytest -q --doctest-modules cpkv --ignore=cpkv/integrations/vllm.py

bench: setup
	@$(VENV)/bin/cpkv bench kernels

plot: setup
	@$(VENV)/bin/cpkv plot

# Mutation testing (not part of `make test` or CI): hand-written mutants of the code that decides
# which bytes go where, each run against the tests that cover it; report in
# benchmarks/results/mutation.md. Under an hour on a 2-core machine.
.PHONY: mutate
mutate: setup setup-vllm
	@$(PY) scripts/mutate.py

clean:
	rm -rf $(VENV) $(VLLM_VENV) build *.egg-info .pytest_cache .hypothesis
