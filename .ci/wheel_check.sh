#!/usr/bin/env bash
# CI step: the sdist builds and the wheel ships every module. From the files git sees
# (tracked plus untracked-not-ignored, as a fresh clone would have them) build an sdist,
# check that it holds every one of those files, unpack it in a clean directory and build a
# wheel from it there (isolated build environment), install that into a new venv holding
# only torch, numpy and triton (no --system-site-packages: that could hide a file left out
# of the wheel), then, from a directory outside the source tree, import every module of
# kfac_fast and check that the compiled `_C` and `py.typed` are there.
#
# The sdist is made in a temporary copy of the tree, so nothing (egg-info, build/) is
# written into the checkout.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=${PY:-python3}
TORCH_PIN=${TORCH_PIN:-torch==2.13.0}
TMP=$(mktemp -d "${TMPDIR:-/tmp}/kfac_wheel_check.XXXXXX")
trap 'rm -rf "$TMP"' EXIT
start=$SECONDS

echo "wheel_check: copying the tree to $TMP/src"
mkdir -p "$TMP/src"
git ls-files -z --cached --others --exclude-standard \
    | while IFS= read -r -d '' f; do [ -e "$f" ] && printf '%s\0' "$f"; done \
    | tar -c --null -T - -f - | tar -x -C "$TMP/src" -f -

echo "wheel_check: clean venv with $TORCH_PIN, numpy, triton"
"$PY" -m venv "$TMP/venv"
VPY="$TMP/venv/bin/python"
"$VPY" -m pip install -q "$TORCH_PIN" numpy "triton>=3.6"

echo "wheel_check: building the sdist"
# The sdist hook of the setuptools the project builds with, run from the copy; only that
# venv gets setuptools, and the wheel below is still built in pip's isolated environment.
"$PY" -m venv "$TMP/sdist-venv"
"$TMP/sdist-venv/bin/python" -m pip install -q "setuptools>=77"
(cd "$TMP/src" && "$TMP/sdist-venv/bin/python" -c \
    "import sys; from setuptools import build_meta; print(build_meta.build_sdist(sys.argv[1]))" \
    "$TMP/sdist" >"$TMP/sdist.log" 2>&1) || { cat "$TMP/sdist.log"; exit 1; }
sdist=$(ls "$TMP"/sdist/kfac_fast-*.tar.gz)
echo "wheel_check: $(basename "$sdist")"
# Every file of the tree (.gitignore aside) must be in the sdist: a build or a test that
# needs a file the sdist lacks would fail only for users of the sdist.
missing=$(comm -13 <(tar -tzf "$sdist" | sed 's|^[^/]*/||' | sort) \
                   <(cd "$TMP/src" && find . -type f | sed 's|^\./||' | grep -vx '.gitignore' | sort))
if [ -n "$missing" ]; then
    echo "wheel_check: FAILED: the sdist lacks"; echo "$missing" | sed 's/^/  /'; exit 1
fi
mkdir -p "$TMP/unpacked"
tar -xzf "$sdist" -C "$TMP/unpacked"

echo "wheel_check: building the wheel from the sdist (isolated build environment)"
"$VPY" -m pip wheel -q --no-deps -w "$TMP/dist" "$TMP"/unpacked/kfac_fast-*/
wheel=$(ls "$TMP"/dist/kfac_fast-*.whl)
echo "wheel_check: $(basename "$wheel")"
"$VPY" -m pip install -q --no-deps "$wheel"

mkdir -p "$TMP/elsewhere"
cd "$TMP/elsewhere"
"$VPY" - "$ROOT" <<'PY'
"""Import every module the source tree has, from the installed wheel."""
import importlib
import pathlib
import sys

root = pathlib.Path(sys.argv[1])
import kfac_fast  # noqa: E402

installed = pathlib.Path(kfac_fast.__file__).resolve().parent
if root.resolve() in installed.parents or installed == root.resolve() / "kfac_fast":
    sys.exit(f"wheel_check: kfac_fast was imported from the source tree ({installed})")

# The expected module list comes from the source tree, not from the wheel: a file left
# out of the wheel must fail here.
expected = []
for top, name in ((root / "kfac_fast", "kfac_fast"), (root / "kernels", "kfac_fast.kernels")):
    for path in sorted(top.rglob("*.py")):
        rel = path.relative_to(top).with_suffix("")
        parts = [p for p in rel.parts if p != "__init__"]
        if "__pycache__" in rel.parts or (top == root / "kfac_fast" and parts[:1] == ["kernels"]):
            continue
        if parts[-1:] == ["__main__"]:  # importing it would run it (python -m kfac_fast.demo)
            continue
        expected.append(".".join([name, *parts]))

failed = []
for module in expected:
    try:
        importlib.import_module(module)
    except Exception as exc:  # report every failure, not only the first
        failed.append(f"{module}: {type(exc).__name__}: {exc}")

from kfac_fast import _C  # noqa: E402

print("wheel_check: kfac_fast._C", _C.build_info())
if not (installed / "py.typed").is_file():
    failed.append("kfac_fast/py.typed is not in the installed package")
if failed:
    sys.exit("wheel_check: FAILED\n  " + "\n  ".join(failed))
print(f"wheel_check: imported {len(expected)} modules from {installed}")
PY
echo "wheel_check: passed in $((SECONDS - start)) s"
