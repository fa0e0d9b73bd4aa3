#!/usr/bin/env bash
# One prepared run for a lent GPU (H200 image: Python 3.12, torch 2.11 cu130, triton 3.6,
# nvcc 13, no network). Builds `_C` for sm_90 only, runs the GPU tests, the sanitizer
# check of the Jacobi kernel and the benchmarks; writes JSON, logs and a short table under
# $OUT (or ./gpu_out). Aim: under 8 minutes in all.
#
#   bash bench/gpu_check.sh [all|build|tests|issue17|sanitize|compile|eigh|triton|refresh|step|e2e|integrations|optimizer]
#   (default: all)
#
# Run as one `device.run` call with a timeout that leaves room for a rerun of one part.
set -uo pipefail
cd "$(dirname "$0")/.."
PART="${1:-all}"
OUT="${OUT:-$PWD/gpu_out}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1
SUMMARY="$OUT/summary.txt"
: > "$SUMMARY"

log() { echo "== $*" | tee -a "$SUMMARY"; }
want() { [ "$PART" = all ] || [ "$PART" = "$1" ]; }

# Step bodies run under `timeout` so one hung part cannot eat the whole lease.
run_part() {  # name seconds command...
  local name=$1 secs=$2; shift 2
  local t0=$(date +%s)
  timeout "$secs" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  log "$name: rc=$rc in $(( $(date +%s) - t0 ))s (log: $name.log)"
  tail -n 15 "$OUT/$name.log" | sed 's/^/   /' | tee -a "$SUMMARY" >/dev/null
  return $rc
}

log "$(date -u +%FT%TZ) $(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null)"
log "$($PY -c 'import torch, triton; print("torch", torch.__version__, "cuda", torch.version.cuda, "triton", triton.__version__)')"

# Every part needs `_C`, and each device machine starts bare: always build (sm_90 only).
KFAC_FAST_CUDA=1 KFAC_FAST_CUDA_ARCHS=90 run_part build 300 \
  $PY -m pip install --no-build-isolation --no-deps -e . || { cat "$SUMMARY"; exit 1; }
$PY -c "import kfac_fast; print(kfac_fast.backend_info())" > "$OUT/backend_info.txt" 2>&1
[ "$PART" = build ] && { cat "$SUMMARY"; exit 0; }

if want tests; then
  run_part tests 240 $PY -m pytest -q -m gpu tests -x --timeout=120 -p no:cacheprovider
  # tests/triton (marked interpret, so not selected above) on the GPU itself: the kernels
  # against the reference, e.g. the KL clip with a NaN layer beside finite ones
  run_part triton_tests 180 $PY -m pytest -q tests/triton -x --timeout=120 -p no:cacheprovider
fi

# Issue 17's GPU-only checks, first on their own so their result is easy to find: the
# Jacobi kernel on NaN batches, whole non-refresh steps under
# torch.cuda.set_sync_debug_mode("error"), a launch on cuda:1 (skips on one GPU), and the
# factor epilogue at n = 46341 (int64 offsets; ~9 GB).
if want issue17; then
  run_part issue17 240 $PY -m pytest -q tests/test_gpu_checks.py -rs -p no:cacheprovider
fi

# The compile table (registers, spills, HGMMA per K-step) of every shipped config for
# sm_90 under the image's Triton, at n = d and d + 1 with strides not multiples of 16.
if want compile; then
  run_part compile 240 $PY bench/kernel_report.py --compile --json "$OUT/compile.json"
fi

if want sanitize && [ -f bench/sanitize_jacobi.py ]; then
  run_part racecheck 120 compute-sanitizer --tool racecheck $PY bench/sanitize_jacobi.py
  run_part memcheck 120 compute-sanitizer --tool memcheck $PY bench/sanitize_jacobi.py
fi

bench() {  # name file
  [ -f "$2" ] || { log "$1: $2 missing, skipped"; return; }
  run_part "$1" 240 $PY -m pytest -q "$2" -p no:cacheprovider --benchmark-only \
    --benchmark-json="$OUT/$1.json" --benchmark-columns=min,median,max \
    --benchmark-group-by=group --benchmark-min-rounds=5 --benchmark-max-time=0.5
}
want eigh && bench eigh bench/bench_eigh.py
want triton && bench triton bench/bench_triton.py
want refresh && bench refresh bench/bench_warm_eigh.py
want step && bench step bench/bench_step.py
want e2e && bench e2e bench/bench_e2e.py
want integrations && bench integrations bench/bench_integrations.py
# kfac_fast.KFAC's per-step split (the demo row's settings, then the paper's defaults)
if want optimizer; then
  run_part optimizer-demo 120 $PY bench/bench_optimizer.py --device cuda --settings demo --steps 40
  run_part optimizer-paper 120 $PY bench/bench_optimizer.py --device cuda --steps 40
fi

echo; echo "==== summary ===="; cat "$SUMMARY"
