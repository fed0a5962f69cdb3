#!/usr/bin/env bash
# The GPU check, run on a lent GPU machine (H100/H200, torch 2.11, Triton 3.6) from the repo root:
# builds the extension for the card, runs the CUDA tests, then each op's correctness-and-timing
# script, and prints their tables last. The full check took 7.5 min on an H100 (2026-11-27); the
# quick modes are each meant to fit a 5-minute call (a lease is 15 min in all, start included):
#   GPU_CHECK_QUICK=loss bash scripts/dev/gpu_check.sh  (~4 min, no C++ build: the loss mode's Triton ops'
#       CUDA tests, the new ops alone against PyTorch's (benches/bench_loss_ops.py), the loss in
#       bf16 + graph with today's defaults at the four sizes, then with each loss-mode switch off
#       in turn, A/B in one run, the eager step with the fused ops' eager door and without and with
#       Triton's own launch path, and eager calls through both launch paths (benches/bench_launch.py))
#   GPU_CHECK_QUICK=axial bash scripts/dev/gpu_check.sh (~4-5 min, no C++ build: the axial attention's
#       CUDA tests, per-kernel profile and tile sweep, eager and CUDA-graph times)
#   GPU_CHECK_QUICK=ssim bash scripts/dev/gpu_check.sh  (~4-5 min: build, the SSIM CUDA tests, the SSIM check with
#       the backward kernels side by side: tiles, the strip kernel and its plan sweep)
#   GPU_CHECK_QUICK=ncu bash scripts/dev/gpu_check.sh  (~3 min: build, Nsight Compute on the SSIM kernels
#       (scripts/dev/ssim_ncu.py: issue slots, occupancy, stall reasons), the SSIM check's timings);
#       GPU_CHECK_QUICK=ncu-source: build, then the 4K backward kernels' stall samples per SASS line
#   GPU_CHECK_QUICK=1 bash scripts/dev/gpu_check.sh     (~4 min: build, SSIM check, loss profile, tiles)
#   bash scripts/dev/gpu_check.sh                       (everything; ~7.5 min; logs in $OUT or ./gpu_check_out)
set -uo pipefail
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
export PYTHONUNBUFFERED=1
OUT=${OUT:-gpu_check_out}
mkdir -p "$OUT"
PY=${PY:-python3}
status=0
step() { echo; echo "=== $* ($(date +%T))"; }
# The CUDA tests check on every launch that epban's fast launch path hands the GPU the kernel
# Triton itself would pick (epban.kernels.launch); the benchmarks time the fast path as shipped.
TESTENV="env EPBAN_TRITON_FAST_LAUNCH=verify"

if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  # Competitors absent from the GPU image (pytorch-msssim, kornia), carried as wheels.
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi

install_without_extension() {
  # The Triton kernels need no C++ build (the SSIM extension is not used by these modes).
  step "install without the C++ extension"
  EPBAN_BUILD_EXT=0 $PY -m pip install -q --no-build-isolation --no-deps -e . >"$OUT/build.log" 2>&1 \
    || { tail -40 "$OUT/build.log"; exit 1; }
}

if [ "${GPU_CHECK_QUICK:-}" = loss ]; then
  # Timeouts add up to 680 s; it took 3.2 min on an H100 (2026-11-27), before the eager and launch rows.
  install_without_extension
  step "CUDA tests: the loss mode's Triton ops (epilogues, residual-gradient sums, stem pool, input) and the loss mode"
  timeout 100 $TESTENV $PY -m pytest -q -p no:cacheprovider tests/test_bias_act.py tests/test_max_pool.py tests/test_fused_op.py \
    tests/test_normalise.py 2>&1 | tail -3
  [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
  timeout 100 $TESTENV $PY -m pytest -q -m cuda -p no:cacheprovider tests/test_loss_mode.py 2>&1 | tail -3
  [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
  step "the loss mode's new Triton ops alone against the PyTorch ops they replace"
  timeout 40 $PY benches/bench_loss_ops.py >"$OUT/loss_ops.md" 2>&1 || status=1
  step "loss, bf16 + graph: defaults at four sizes, then each unmeasured switch off (A/B in one run)"
  timeout 80 $PY benches/bench_pban_loss.py --sizes 16x256x256,1x512x512,1x1024x1024,1x2048x2048 \
    --variants "loss bf16 graph" >"$OUT/loss.md" 2>&1 || status=1
  ab=""
  for word in looped-attention separate-gates unfused-residual-grad unfused-stem-pool unfused-input cudnn-benchmark; do
    ab="$ab,loss bf16 graph $word"
  done
  all_off="loss bf16 graph looped-attention separate-gates unfused-residual-grad unfused-stem-pool unfused-input"
  timeout 90 $PY benches/bench_pban_loss.py --sizes 16x256x256 --variants "loss bf16 graph${ab},$all_off" \
    >>"$OUT/loss.md" 2>&1 || status=1
  timeout 50 $PY benches/bench_pban_loss.py --sizes 1x2048x2048 --variants "loss bf16 graph,$all_off" \
    >>"$OUT/loss.md" 2>&1 || status=1
  step "loss, bf16 eager (no graph): the fused ops' eager door and epban's launch path against their absence (host time)"
  timeout 70 $PY benches/bench_pban_loss.py --sizes 16x256x256,1x1024x1024 \
    --variants "loss bf16,loss bf16 dispatcher,loss bf16 triton-launch" >>"$OUT/loss.md" 2>&1 || status=1
  step "eager calls, Triton's launch path against epban's (alternating)"
  # its first rows compile the tiny network's float32 kernels, the last the loop kernels (~1 min)
  timeout 150 $PY benches/bench_launch.py >"$OUT/launch.md" 2>&1 || status=1
  step "tables"
  grep -E "^\| (stem|input)" "$OUT/loss_ops.md"
  grep -E "^\| [0-9]" "$OUT/loss.md"
  grep -E "^\| " "$OUT/launch.md"
  exit $status
fi

if [ "${GPU_CHECK_QUICK:-}" = axial ]; then
  install_without_extension
  step "axial CUDA tests"
  timeout 150 $TESTENV $PY -m pytest -q -m cuda -p no:cacheprovider tests/test_axial_attention.py 2>&1 \
    | tee "$OUT/axial_tests.log" | tail -8
  [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
  step "axial profile + tile sweep"
  timeout 150 $PY scripts/dev/axial_gpu_check.py --profile >"$OUT/axial_profile.md" 2>&1 || { status=1; echo FAILED; }
  step "tables"
  grep -v "^  " "$OUT/axial_profile.md" | tail -30
  exit $status
fi

step "build (sm_90 only)"
start=$(date +%s)
TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=16 \
  $PY -m pip install -q --no-build-isolation --no-deps -e . >"$OUT/build.log" 2>&1 || { tail -40 "$OUT/build.log"; exit 1; }
echo "built in $(( $(date +%s) - start )) s"
$PY -m epban info | tee "$OUT/info.txt"
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv,noheader

if [ "${GPU_CHECK_QUICK:-}" = ncu-source ]; then
  step "Nsight Compute: per-instruction stall samples of the 4K backward kernels (CSV in $OUT)"
  OUT=$OUT timeout 400 $PY scripts/dev/ssim_ncu.py --source || status=1
  exit $status
fi

if [ "${GPU_CHECK_QUICK:-}" = ncu ]; then
  step "Nsight Compute: the SSIM kernels (report in $OUT/ssim_ncu.txt)"
  OUT=$OUT timeout 250 $PY scripts/dev/ssim_ncu.py 2>&1 | tee "$OUT/ssim_ncu_summary.md"
  [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
  step "ssim_gpu_check"
  timeout 120 $PY scripts/dev/ssim_gpu_check.py >"$OUT/ssim_gpu_check.md" 2>&1 || { status=1; echo "FAILED"; }
  step "tables"
  grep -E "^(correctness|ssim_gpu_check)" "$OUT/ssim_gpu_check.md"
  grep -E "^\| [0-9].*fwd\+bwd \| epban" "$OUT/ssim_gpu_check.md"
  exit $status
fi

if [ "${GPU_CHECK_QUICK:-}" = ssim ]; then
  step "SSIM CUDA tests"
  timeout 150 $PY -m pytest -q -m cuda -p no:cacheprovider tests/test_ssim.py 2>&1 | tee "$OUT/ssim_tests.log" | tail -5
  [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
  step "ssim_gpu_check with the strip sweep"
  timeout 210 $PY scripts/dev/ssim_gpu_check.py --strip-sweep >"$OUT/ssim_gpu_check.md" 2>&1 || { status=1; echo "FAILED"; }
  step "tables"
  grep -v "^  " "$OUT/ssim_gpu_check.md" | tail -95
  exit $status
fi

if [ -n "${GPU_CHECK_QUICK:-}" ]; then
  # A short lease: the tests of the ops that changed last, the SSIM check, the loss's bf16
  # rows with each loss-mode switch off and on (A/B in one run), and the loss profile.
  step "CUDA tests (SSIM, bias_act, loss mode)"
  timeout 120 $TESTENV $PY -m pytest -q -p no:cacheprovider tests/test_bias_act.py tests/test_max_pool.py tests/test_normalise.py tests/test_fused_op.py 2>&1 | tail -3
  [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
  timeout 120 $TESTENV $PY -m pytest -q -m cuda -p no:cacheprovider tests/test_ssim.py tests/test_loss_mode.py 2>&1 | tail -3
  [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
  step "ssim_gpu_check"
  timeout 90 $PY scripts/dev/ssim_gpu_check.py >"$OUT/ssim_gpu_check.md" 2>&1 || { status=1; echo "FAILED"; }
  step "loss, bf16 + graph: fused epilogue x padded stem"
  sizes=16x256x256,1x512x512,1x1024x1024,1x2048x2048
  timeout 100 $PY benches/bench_pban_loss.py --sizes $sizes \
    --variants "loss bf16 graph,loss bf16 graph unfused-epilogue,loss fp32 graph" >"$OUT/loss_pad.md" 2>&1 || status=1
  EPBAN_LOSS_STEM_PAD=0 timeout 80 $PY benches/bench_pban_loss.py --sizes $sizes \
    --variants "loss bf16 graph,loss bf16 graph unfused-epilogue" >"$OUT/loss_nopad.md" 2>&1 || status=1
  step "loss profile"
  timeout 60 $PY scripts/dev/pban_gpu_check.py --profile >"$OUT/pban_profile.md" 2>&1 || status=1
  step "deformable conv pixel tiles"
  timeout 60 $PY scripts/dev/deform_tile_sweep.py --budget 35 >"$OUT/deform_tiles.md" 2>&1 || status=1
  step "tables"
  grep -E "^\| [0-9]" "$OUT/ssim_gpu_check.md" | grep "fwd+bwd"
  tail -3 "$OUT/ssim_gpu_check.md"
  echo "--- stem padded (default)"; grep -E "^\| [0-9]" "$OUT/loss_pad.md"
  echo "--- stem not padded"; grep -E "^\| [0-9]" "$OUT/loss_nopad.md"
  grep -A12 "^## loss mode bfloat16, 16x3x256x256" "$OUT/pban_profile.md"
  grep -E "^\| [0-9]" "$OUT/deform_tiles.md"
  exit $status
fi

step "CUDA tests"
timeout 180 $TESTENV $PY -m pytest -q -m cuda tests -p no:cacheprovider 2>&1 | tee "$OUT/cuda_tests.log" | tail -15
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1
timeout 60 $TESTENV $PY -m pytest -q -p no:cacheprovider tests/test_bias_act.py tests/test_max_pool.py tests/test_normalise.py tests/test_fused_op.py 2>&1 | tail -3  # on CUDA there
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

for check in ssim_gpu_check axial_gpu_check pban_gpu_check; do
  [ -f "scripts/dev/$check.py" ] || continue
  step "$check"
  args=""
  [ "$check" = pban_gpu_check ] && args="--budget 60"
  timeout 100 $PY "scripts/dev/$check.py" $args >"$OUT/$check.md" 2>&1 || { status=1; echo "FAILED (exit $?)"; }
done

step "tables"
for check in ssim_gpu_check axial_gpu_check pban_gpu_check; do
  [ -f "$OUT/$check.md" ] && { echo "--- $check"; tail -60 "$OUT/$check.md"; }
done
exit $status
