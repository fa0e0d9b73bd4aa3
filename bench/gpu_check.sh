#!/usr/bin/env bash
# One prepared run for a lent GPU (H200 image: Python 3.12, torch 2.11 cu130, triton 3.6,
# nvcc 13, no network). Builds `_C` for sm_90 only, runs the GPU tests, the sanitizer
# check of the Jacobi kernel and the benchmarks; writes JSON, logs and a short table under
# $OUT (or ./gpu_out). Aim: under 8 minutes in all.
#
#   bash bench/gpu_check.sh [all|build|tests|issue17|profile|sanitize|compile|eigh|triton|refresh|step|e2e|e2e19|attention|integrations|optimizer]
#   (default: all)
#
# Run as one `device.run` call with a timeout that leaves room for a rerun of one part.
# GPU_CHECK_BUDGET=<seconds> caps the whole run: each part gets what is left of it (parts
# that would start with under 15 s left are skipped), so the summary and $OUT always come
# back inside the call's limit. Parts run most important first. KFAC_PYTORCH_WHEEL=<path>
# installs that wheel (--no-deps, no index) for the integrations benchmark.
set -uo pipefail
cd "$(dirname "$0")/.."
PART="${1:-all}"
OUT="${OUT:-$PWD/gpu_out}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1
SUMMARY="$OUT/summary.txt"
: > "$SUMMARY"
DEADLINE=$(( $(date +%s) + ${GPU_CHECK_BUDGET:-100000} ))

log() { echo "== $*" | tee -a "$SUMMARY"; }
want() { [ "$PART" = all ] || [[ ",$PART," == *",$1,"* ]]; }  # PART: all, or parts joined by commas

# Step bodies run under `timeout` so one hung part cannot eat the whole lease.
run_part() {  # name seconds command...
  local name=$1 secs=$2; shift 2
  local t0=$(date +%s)
  local left=$(( DEADLINE - t0 ))
  if [ "$left" -lt 15 ]; then log "$name: skipped, ${left}s of GPU_CHECK_BUDGET left"; return 124; fi
  [ "$secs" -gt "$left" ] && secs=$left
  timeout "$secs" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  log "$name: rc=$rc in $(( $(date +%s) - t0 ))s (log: $name.log)"
  tail -n 15 "$OUT/$name.log" | sed 's/^/   /' | tee -a "$SUMMARY" >/dev/null
  return $rc
}

log "$(date -u +%FT%TZ) $(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null)"
log "$($PY -c 'import torch, triton; print("torch", torch.__version__, "cuda", torch.version.cuda, "triton", triton.__version__)')"

# Every part needs `_C`, and each device machine starts bare: always build (sm_90 only).
# In place (setup.py build_ext) if the editable install refuses the image's setuptools.
KFAC_FAST_CUDA=1 KFAC_FAST_CUDA_ARCHS=90 run_part build 180 \
  $PY -m pip install --no-build-isolation --no-deps -e . \
  || KFAC_FAST_CUDA=1 KFAC_FAST_CUDA_ARCHS=90 run_part build-inplace 180 \
       $PY setup.py build_ext --inplace || { cat "$SUMMARY"; exit 1; }
if [ -n "${KFAC_PYTORCH_WHEEL:-}" ]; then
  $PY -m pip install -q --no-index --no-deps "$KFAC_PYTORCH_WHEEL" >> "$OUT/build.log" 2>&1 \
    && log "kfac-pytorch installed from $KFAC_PYTORCH_WHEEL" || log "kfac-pytorch wheel did not install"
fi
$PY -c "import kfac_fast; print(kfac_fast.backend_info())" > "$OUT/backend_info.txt" 2>&1
[ "$PART" = build ] && { cat "$SUMMARY"; exit 0; }

# Issue 17's GPU-only checks, first on their own so their result is easy to find: the
# Jacobi kernel on NaN batches, whole non-refresh steps under
# torch.cuda.set_sync_debug_mode("error"), a launch on cuda:1 (skips on one GPU), and the
# factor epilogue at n = 46341 (int64 offsets; ~9 GB).
if want issue17; then
  run_part issue17 120 $PY -m pytest -q tests/test_gpu_checks.py -rs -p no:cacheprovider
fi

# No -x: one failure must not hide the others; each test has its own timeout.
if want tests; then
  run_part tests 150 $PY -m pytest -q -m gpu tests --ignore=tests/test_gpu_checks.py \
    --timeout=90 -rfEs -p no:cacheprovider
  # tests/triton (marked interpret, so not selected above) on the GPU itself: the kernels
  # against the reference, e.g. the KL clip with a NaN layer beside finite ones
  run_part triton_tests 120 $PY -m pytest -q tests/triton --timeout=90 -rfE -p no:cacheprovider
  # the cublas backend's contract tests (not marked gpu: they run on CPU tensors in CI)
  run_part cublas_tests 60 $PY -m pytest -q tests/test_backend_cublas.py --timeout=60 -rfE -p no:cacheprovider
fi

# Where a training step's time goes (torch.profiler): kfac_fast against the unfused K-FAC.
if want profile; then
  run_part profile 90 $PY bench/profile_step.py --out "$OUT/profile"
fi

if want sanitize && [ -f bench/sanitize_jacobi.py ]; then
  run_part memcheck 90 compute-sanitizer --tool memcheck $PY bench/sanitize_jacobi.py
fi

bench() {  # name file seconds
  [ -f "$2" ] || { log "$1: $2 missing, skipped"; return; }
  run_part "$1" "${3:-90}" $PY -m pytest -q "$2" -p no:cacheprovider --benchmark-only \
    --benchmark-json="$OUT/$1.json" --benchmark-columns=min,median,max \
    --benchmark-group-by=group --benchmark-min-rounds=5 --benchmark-max-time=0.5
}
want eigh && bench eigh bench/bench_eigh.py 75
want triton && bench triton bench/bench_triton.py 90
want step && bench step bench/bench_step.py 75
want e2e && bench e2e bench/bench_e2e.py 75
# issue 19's GPU target: an amortised K-FAC step (factors every 10, refresh every 100) and
# EigenAdam against AdamW on gpt_small, bf16, per-step means over whole 100-step rounds
if want e2e19; then
  run_part e2e19 120 $PY bench/bench_e2e.py --size gpt_small --rounds 2 --variants adamw,kfac_amortised,eigen_adam
fi
# The math attention kernel KFAC's graph-bearing forward uses, against the fused default
if want attention; then
  run_part attention 60 $PY bench/bench_attention_kernel.py --device cuda --rounds 30
fi
# kfac_fast.KFAC's per-step split (the demo row's settings, then the paper's defaults)
if want optimizer; then
  run_part optimizer-demo 60 $PY bench/bench_optimizer.py --device cuda --settings demo --steps 40
  run_part optimizer-paper 60 $PY bench/bench_optimizer.py --device cuda --steps 40
fi
want refresh && bench refresh bench/bench_warm_eigh.py 60
want integrations && bench integrations bench/bench_integrations.py 75
if want sanitize && [ -f bench/sanitize_jacobi.py ]; then
  run_part racecheck 90 compute-sanitizer --tool racecheck $PY bench/sanitize_jacobi.py
fi

# The compile table (registers, spills, HGMMA per K-step) of every shipped config for
# sm_90 under the image's Triton, at n = d and d + 1 with strides not multiples of 16.
# Last: bench/compile_check.sh makes the same table without a GPU.
if want compile; then
  run_part compile 120 $PY bench/kernel_report.py --compile --json "$OUT/compile.json"
fi

echo; echo "==== summary ===="; cat "$SUMMARY"
