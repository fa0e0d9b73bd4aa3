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
    assert "n <= 32" in row["cuda"] and "174674" in row["cuda"]
