#!/usr/bin/env bash
# The GPU check, run from the repository root on a machine with a CUDA GPU. It builds the
# extension for the card, runs the CUDA tests, times the ops and the loss side by side and
# prints the tables last; each mode is meant to finish well inside 5 minutes.
#   bash scripts/dev/gpu_check.sh                       build, CUDA tests, SSIM check, loss (bf16/fp32 + graph)
#   GPU_CHECK_QUICK=ssim bash scripts/dev/gpu_check.sh  build, SSIM CUDA tests, SSIM backward kernels side by side
#   GPU_CHECK_QUICK=axial bash scripts/dev/gpu_check.sh no C++ build: attention CUDA tests, profile, tile sweep
#   GPU_CHECK_QUICK=loss bash scripts/dev/gpu_check.sh  no C++ build: the loss mode's ops and tests, the loss with
#                                                       each loss-mode option off in turn (A/B in one run)
#   GPU_CHECK_QUICK=ncu bash scripts/dev/gpu_check.sh   build, Nsight Compute on the SSIM kernels
# Logs and tables go to $OUT (default ./gpu_check_out).
set -uo pipefail
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
export PYTHONUNBUFFERED=1
OUT=${OUT:-gpu_check_out}
mkdir -p "$OUT"
PY=${PY:-python3}
MODE=${GPU_CHECK_QUICK:-}
status=0
step() { echo; echo "=== $* ($(date +%T))"; }
run_tests() {  # run_tests TIMEOUT LOGNAME PYTEST-ARGS...
  local t=$1 log=$2; shift 2
  timeout "$t" $PY -m pytest -q -p no:cacheprovider "$@" 2>&1 | tee "$OUT/$log" | tail -4
  [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
}

if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  # Peers absent from the GPU image (pytorch-msssim, kornia), carried as wheels.
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi

start=$(date +%s)
if [ "$MODE" = axial ] || [ "$MODE" = loss ]; then
  step "install without the C++ extension (these modes use the Triton kernels only)"
  EPBAN_BUILD_EXT=0 $PY -m pip install -q --no-build-isolation --no-deps -e . >"$OUT/build.log" 2>&1 \
    || { tail -40 "$OUT/build.log"; exit 1; }
else
  step "build (sm_90 unless TORCH_CUDA_ARCH_LIST is set)"
  TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=16 \
    $PY -m pip install -q --no-build-isolation --no-deps -e . >"$OUT/build.log" 2>&1 || { tail -40 "$OUT/build.log"; exit 1; }
fi
echo "installed in $(( $(date +%s) - start )) s"
$PY -m epban info | tee "$OUT/info.txt"
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv,noheader

case "$MODE" in
ssim)
  step "SSIM CUDA tests"
  run_tests 150 ssim_tests.log -m cuda tests/test_ssim.py
  step "SSIM: the backward kernels side by side, with the strip plan sweep"
  timeout 210 $PY scripts/dev/ssim_gpu_check.py --strip-sweep >"$OUT/ssim_gpu_check.md" 2>&1 || { status=1; echo FAILED; }
  step "tables"
  grep -v "^  " "$OUT/ssim_gpu_check.md" | tail -95
  ;;
axial)
  step "axial attention CUDA tests"
  run_tests 150 axial_tests.log -m cuda tests/test_axial_attention.py
  step "axial attention profile and tile sweep"
  timeout 150 $PY scripts/dev/axial_gpu_check.py --profile >"$OUT/axial_profile.md" 2>&1 || { status=1; echo FAILED; }
  step "tables"
  grep -v "^  " "$OUT/axial_profile.md" | tail -30
  ;;
loss)
  step "CUDA tests: the loss mode's Triton ops and the loss mode"
  run_tests 100 loss_op_tests.log tests/test_bias_act.py tests/test_max_pool.py tests/test_normalise.py
  run_tests 100 loss_mode_tests.log -m cuda tests/test_loss_mode.py
  step "the stem pool and the input normalisation against the PyTorch ops they replace"
  timeout 40 $PY benches/bench_loss_ops.py >"$OUT/loss_ops.md" 2>&1 || status=1
  step "loss, bf16 + graph: defaults at four sizes, then each option off in turn at 16x3x256x256"
  timeout 80 $PY benches/bench_pban_loss.py --sizes 16x256x256,1x512x512,1x1024x1024,1x2048x2048 \
    --variants "loss bf16 graph" >"$OUT/loss.md" 2>&1 || status=1
  ab="loss bf16 graph"
  for word in separate-gates unfused-residual-grad unfused-stem-pool unfused-input unpadded-stem unfused-epilogue; do
    ab="$ab,loss bf16 graph $word"
  done
  timeout 120 $PY benches/bench_pban_loss.py --sizes 16x256x256 --variants "$ab" >>"$OUT/loss.md" 2>&1 || status=1
  step "tables"
  grep -E "^\| (stem|input)" "$OUT/loss_ops.md"
  grep -E "^\| [0-9]" "$OUT/loss.md"
  ;;
ncu)
  step "Nsight Compute: the SSIM kernels (report in $OUT/ssim_ncu.txt)"
  OUT=$OUT timeout 250 $PY scripts/dev/ssim_ncu.py 2>&1 | tee "$OUT/ssim_ncu_summary.md"
  [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
  ;;
*)
  step "CUDA tests (every test marked cuda, and the Triton ops' tests on the GPU)"
  run_tests 180 cuda_tests.log -m cuda tests
  run_tests 60 triton_op_tests.log tests/test_bias_act.py tests/test_max_pool.py tests/test_normalise.py
  step "SSIM check: correctness from poisoned allocations, fwd+bwd against the peers"
  timeout 90 $PY scripts/dev/ssim_gpu_check.py >"$OUT/ssim_gpu_check.md" 2>&1 || { status=1; echo FAILED; }
  step "loss, bf16 and fp32 + graph, at four sizes and 4K"
  timeout 120 $PY benches/bench_pban_loss.py --sizes 16x256x256,1x512x512,1x1024x1024,1x2048x2048,1x2160x3840 \
    --variants "loss bf16 graph,loss fp32 graph" >"$OUT/loss.md" 2>&1 || status=1
  step "tables"
  grep -E "^\| [0-9]" "$OUT/ssim_gpu_check.md" | grep "fwd+bwd"
  grep -E "^\| [0-9]" "$OUT/loss.md"
  ;;
esac
echo "gpu_check: total $(( $(date +%s) - start )) s, status $status"
exit $status
