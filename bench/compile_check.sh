#!/usr/bin/env bash
# The honest compile check (issue 17, defect 8): every shipped Triton config compiled
# ahead of time for sm_90 at realistic sizes (n = d, n = d + 1 and odd d: strides that are
# not multiples of 16), under several Triton versions, with registers, spills, HGMMA count
# and instructions per K-step (bench/kernel_report.py --compile). No GPU needed.
#
#   bash bench/compile_check.sh [VERSION ...]     (default: 3.6.0 3.8.0, then the pinned one)
#
# Each extra version is a scratch install (`pip install --target`, a pure download, cached
# under $BUILD_DIR, default build/compile_check) put in front of the project's venv on
# PYTHONPATH, so torch and kfac_fast come from the venv and only Triton changes. Not part
# of `make test` (it needs the network once, then the cache); `.ci/run` runs it after
# `make test`. Exit status 1 when any version spills or cannot be installed; every table
# is kept under $BUILD_DIR.
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
BUILD="${BUILD_DIR:-build/compile_check}"
mkdir -p "$BUILD"
VERSIONS=("$@")
[ ${#VERSIONS[@]} -eq 0 ] && VERSIONS=(3.6.0 3.8.0)
rc=0
check() {  # label, then env assignments for the run
  local label=$1; shift
  echo "== Triton $label"
  env "$@" "$PY" bench/kernel_report.py --compile --json "$BUILD/compile-$label.json" \
    | tee "$BUILD/compile-$label.txt"
  [ "${PIPESTATUS[0]}" -eq 0 ] || rc=1
}
for v in "${VERSIONS[@]}"; do
  dir="$BUILD/triton-$v"
  if [ ! -f "$dir/.done" ]; then
    for attempt in 1 2; do  # one retry: a registry hiccup should not fail CI
      rm -rf "$dir"
      "$PY" -m pip install -q --no-deps --target "$dir" --cache-dir "$BUILD/pip-cache" "triton==$v" \
        && touch "$dir/.done" && break
    done
    [ -f "$dir/.done" ] || { echo "== Triton $v: install failed"; rc=1; continue; }
  fi
  check "$v" PYTHONPATH="$PWD/$dir"
done
check "pinned-$("$PY" -c 'import triton; print(triton.__version__)')"
exit $rc
