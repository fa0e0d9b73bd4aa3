"""The compiled module builds, imports and reports what it was built with."""
import shutil

import pytest

import kfac_fast


def test_c_imports_and_build_info_keys():
    from kfac_fast import _C

    info = _C.build_info()
    assert set(info) >= {"cuda", "cuda_archs", "cuda_compiler", "cuda_runtime_major", "cxx_compiler"}
    assert isinstance(info["cuda"], bool)
    if info["cuda"]:
        assert info["cuda_runtime_major"] >= 11 and info["cuda_archs"]
    else:
        assert info["cuda_runtime_major"] == 0 and info["cuda_archs"] == ""


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not on PATH")
def test_cuda_sources_compiled_when_nvcc_present():
    # CI has nvcc but no GPU: this is what proves the .cu files compiled there.
    from kfac_fast import _C

    assert _C.build_info()["cuda"] is True
    for name in ("jacobi_eigh_cuda", "eigen_scale_cuda", "jacobi_cuda_plan"):
        assert hasattr(_C, name), name


def test_host_core_always_built():
    from kfac_fast import _C
    from kfac_fast.backends import cuda as _cuda

    assert _C.JACOBI_MAX_N == _cuda.EIGH_JACOBI_MAX_N
    assert hasattr(_C, "jacobi_eigh_host") and hasattr(_C, "jacobi_plan")


def test_backend_info_mentions_cuda():
    text = str(kfac_fast.backend_info())
    assert "cuda" in text
    import torch

    from kfac_fast._dispatch import describe

    row = describe(torch.device("cpu"))["eigh"]
    assert "n <= 32" in row["cuda"] and "H200" in row["cuda"]


def _setup_function(name):
    """A top-level function of setup.py, without running setup() (which importing would)."""
    import ast
    import pathlib

    source = (pathlib.Path(__file__).resolve().parents[1] / "setup.py").read_text()
    tree = ast.parse(source)
    keep = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))
            or (isinstance(n, ast.FunctionDef) and n.name == name)
            or (isinstance(n, ast.Assign) and any(getattr(t, "id", "") == "_CACHED_PATHS" for t in n.targets))]
    keep = [n for n in keep if not (isinstance(n, ast.ImportFrom) and n.module and n.module.startswith("setuptools"))]
    namespace: dict = {}
    exec(compile(ast.Module(body=keep, type_ignores=[]), "setup.py", "exec"), namespace)
    return namespace[name]


def _fake_cache(build_temp, make_program, generator="Ninja"):
    (build_temp / "CMakeFiles").mkdir(parents=True)
    (build_temp / "CMakeFiles" / "cmake.check_cache").write_text("x")
    (build_temp / "CMakeCache.txt").write_text(
        "# This is the CMakeCache file.\n//Path to a program.\n"
        f"CMAKE_MAKE_PROGRAM:FILEPATH={make_program}\nCMAKE_GENERATOR:INTERNAL={generator}\n"
        f"CMAKE_COMMAND:INTERNAL={shutil.which('sh')}\n")


def test_rebuild_drops_cache_of_deleted_build_environment(tmp_path):
    # Issue 21: a second non-editable build failed because CMakeCache.txt kept the ninja
    # of pip's first (deleted) isolated build environment.
    drop = _setup_function("drop_stale_cmake_cache")
    gone = tmp_path / "pip-build-env-deleted" / "overlay" / "bin" / "ninja"
    stale = tmp_path / "stale"
    _fake_cache(stale, gone)
    assert drop(stale, "Ninja") is True
    assert not (stale / "CMakeCache.txt").exists() and not (stale / "CMakeFiles").exists()
    assert drop(stale, "Ninja") is False  # nothing left to drop

    live = tmp_path / "live"
    _fake_cache(live, shutil.which("sh"))  # a program that exists: the cache is kept
    assert drop(live, "Ninja") is False and (live / "CMakeCache.txt").is_file()
    assert drop(live, "Unix Makefiles") is True  # another generator: cmake would refuse the cache
    assert not (live / "CMakeCache.txt").exists()


def test_sdist_manifest_covers_the_tree():
    # Issue 21: the sdist lacked CMakeLists.txt, csrc/, tests support files, docs and
    # examples. Every file git tracks must match MANIFEST.in (the build-only .gitignore aside).
    import fnmatch
    import pathlib
    import subprocess

    root = pathlib.Path(__file__).resolve().parents[1]
    try:
        tracked = subprocess.run(["git", "ls-files"], cwd=root, capture_output=True, text=True,
                                 check=True).stdout.split()
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout (an sdist): nothing to compare MANIFEST.in with")
    includes, dirs = set(), []
    for line in (root / "MANIFEST.in").read_text().splitlines():
        words = line.split("#")[0].split()
        if words[:1] == ["include"]:
            includes.update(words[1:])
        elif words[:1] == ["recursive-include"]:
            dirs.append((words[1], words[2:]))
    missing = [f for f in tracked if f not in includes and f != ".gitignore"
               and not any(f.startswith(d + "/") and any(fnmatch.fnmatch(f.rsplit("/", 1)[-1], p) for p in pats)
                           for d, pats in dirs)]
    assert missing == []
    assert {"LICENSE", "CMakeLists.txt"} <= includes
