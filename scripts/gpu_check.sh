#!/usr/bin/env bash
# The GPU check, run on a lent GPU machine (H100/H200, torch 2.11, Triton 3.6) from the repo root:
# builds the extension for the card, runs the CUDA tests, then each op's correctness-and-timing
# script, and prints their tables last. Budget: well inside 5 minutes.
#   bash scripts/gpu_check.sh            (full logs go to $OUT, or ./gpu_check_out)
set -uo pipefail
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
export PYTHONUNBUFFERED=1
OUT=${OUT:-gpu_check_out}
mkdir -p "$OUT"
PY=${PY:-python3}
status=0
step() { echo; echo "=== $* ($(date +%T))"; }

if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  # Competitors absent from the GPU image (pytorch-msssim, kornia), carried as wheels.
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi

step "build (sm_90 only)"
start=$(date +%s)
TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=16 \
  $PY -m pip install -q --no-build-isolation --no-deps -e . >"$OUT/build.log" 2>&1 || { tail -40 "$OUT/build.log"; exit 1; }
echo "built in $(( $(date +%s) - start )) s"
$PY -m epban info | tee "$OUT/info.txt"
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv,noheader

step "CUDA tests"
timeout 180 $PY -m pytest -q -m cuda tests -p no:cacheprovider 2>&1 | tee "$OUT/cuda_tests.log" | tail -15
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

for check in ssim_gpu_check axial_gpu_check pban_gpu_check; do
  [ -f "scripts/$check.py" ] || continue
  step "$check"
  args=""
  [ "$check" = pban_gpu_check ] && args="--budget 60"
  timeout 100 $PY "scripts/$check.py" $args >"$OUT/$check.md" 2>&1 || { status=1; echo "FAILED (exit $?)"; }
done

step "tables"
for check in ssim_gpu_check axial_gpu_check pban_gpu_check; do
  [ -f "$OUT/$check.md" ] && { echo "--- $check"; tail -60 "$OUT/$check.md"; }
done
exit $status
