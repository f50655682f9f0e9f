#!/usr/bin/env bash
# The GPU check of the Triton kernels (softmax and linear attention), in one command (installs nothing):
#   1. the kernel tests on CUDA: pytest -m "triton_interpret or gpu" tests/kernels (incl. ring attention's flash
#      pieces on one rank: test_ring.py::test_ring_attention_triton_pieces_on_cuda), and the patch's CUDA paths
#      on models: tests/attention/test_patch_triton.py, tests/attention/test_cuda_paths.py (Quest's decode on
#      the block-sparse decode kernel, KV policies, sparse prefill on the Triton kernels, a bf16 model), and
#      tests/attention/test_compile.py (the custom ops under torch.compile; opcheck is in tests/kernels);
#      in parallel (pytest-xdist, 8 workers) where it is installed: compiling the kernels is most of the time
#   2. the benchmarks: kernels/bench_attention.py --quick (Triton vs torch SDPA, flash-attn if installed)
#   3. kernels/bench_linear.py --quick (Triton linear attention vs its PyTorch chunked form and softmax)
#   4. kernels/bench_sparse.py --quick (Triton block-sparse at 32k, 10% density, vs our dense Triton kernels),
#      in the time the first three left of 480 s (at most 120 s), so the whole check still fits one 10-minute call
# Logs and JSON go to $OUT (default ./out); the short tables are printed last. Sized to finish in
# under 10 minutes on one H100 (each step has its own time limit, 480 s in all, so a hang cannot eat the
# budget; a step cut short still leaves its log in $OUT).
#   OUT=/tmp/out bash kernels/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1  # a step cut short by its time limit still leaves what it printed
PY="${PYTHON:-$(command -v python3 || command -v python)}"  # the GPU image's python3 holds torch
OUT="${OUT:-./out}"
mkdir -p "$OUT"
unset TRITON_INTERPRET  # real GPU kernels
export TRITON_DEFAULT_FP_FUSION="${TRITON_DEFAULT_FP_FUSION:-1}"  # silences a triton>=3.9 warning; no effect before
start=$SECONDS

{
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
  "$PY" -c "import torch, triton; print('torch', torch.__version__, '| cuda', torch.version.cuda, '| triton', triton.__version__)"
  "$PY" -c "import flash_attn; print('flash-attn', flash_attn.__version__)" 2>/dev/null || echo "flash-attn not installed"
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

xdist=""
"$PY" -c "import xdist" 2>/dev/null && xdist="-n 8"
echo "== tests (limit 210 s) =="
timeout 210 "$PY" -m pytest -q $xdist -m "triton_interpret or gpu" tests/kernels tests/attention/test_patch_triton.py \
  tests/attention/test_cuda_paths.py tests/attention/test_compile.py -p no:cacheprovider -rfE \
  --junitxml="$OUT/tests.xml" > "$OUT/tests.log" 2>&1
tests_rc=$?
tail -n 15 "$OUT/tests.log"

echo "== benchmark (limit 120 s) =="
timeout 120 "$PY" kernels/bench_attention.py --quick --json "$OUT/bench.json" > "$OUT/bench.log" 2>&1
bench_rc=$?

echo "== linear attention benchmark (limit 120 s) =="
timeout 120 "$PY" kernels/bench_linear.py --quick --json "$OUT/bench_linear.json" > "$OUT/bench_linear.log" 2>&1
linear_rc=$?

left=$((480 - (SECONDS - start)))
[ "$left" -gt 120 ] && left=120
if [ "$left" -ge 40 ]; then
  echo "== sparse attention benchmark (limit $left s) =="
  timeout "$left" "$PY" kernels/bench_sparse.py --quick --json "$OUT/bench_sparse.json" > "$OUT/bench_sparse.log" 2>&1
  sparse_rc=$?
else
  echo "== sparse attention benchmark: skipped, $left s left (run: python kernels/bench_sparse.py --quick) =="
  echo "skipped: $left s left of the check's 480 s" > "$OUT/bench_sparse.log"
  sparse_rc=skipped
fi

echo
echo "== summary after $((SECONDS - start)) s: tests rc=$tests_rc, benchmark rc=$bench_rc, linear benchmark rc=$linear_rc, sparse benchmark rc=$sparse_rc =="
grep -E "passed|failed|error" "$OUT/tests.log" | tail -n 1
if [ "$bench_rc" -eq 0 ]; then
  grep -E "^(#|\|)" "$OUT/bench.log"
else
  tail -n 30 "$OUT/bench.log"
fi
if [ "$linear_rc" -eq 0 ]; then
  grep -E "^(#|\|)" "$OUT/bench_linear.log"
else
  tail -n 30 "$OUT/bench_linear.log"
fi
if [ "$sparse_rc" = 0 ]; then
  grep -E "^(#|\|)" "$OUT/bench_sparse.log"
else
  tail -n 30 "$OUT/bench_sparse.log"
fi
[ "$tests_rc" -eq 0 ] && [ "$bench_rc" -eq 0 ] && [ "$linear_rc" -eq 0 ] && { [ "$sparse_rc" = 0 ] || [ "$sparse_rc" = skipped ]; }
