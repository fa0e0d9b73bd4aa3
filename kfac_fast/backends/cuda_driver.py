"""Whether this machine can run `kfac_fast._C`'s CUDA code at all (the cuda backend's
`missing()`): the module must be built with CUDA, and the installed driver must support
the CUDA runtime `_C` links statically (`build_info()['cuda_runtime_major']`, 13 today).
On an older driver every launch would fail, so the backend is reported missing, with the
reason, and `auto` dispatch sends eigh and precondition_eigen to the other backends.

The driver is asked through `_C.cuda_driver_version()` (cudaDriverGetVersion, which needs
no GPU: 0 without a driver). Tests replace `driver_version` to mock it.
"""
from __future__ import annotations

import importlib
from typing import Optional


def driver_version(lib) -> Optional[int]:
    """cudaDriverGetVersion's value (1000*major + 10*minor; 0: no driver; -1: the query
    failed), or None for a `_C` built before the query existed."""
    query = getattr(lib, "cuda_driver_version", None)
    return None if query is None else int(query())


def driver_problem(lib) -> Optional[str]:
    """Why the installed driver cannot run `_C`'s CUDA runtime (None when it can, or when
    no driver is installed: then no CUDA tensor exists to launch on)."""
    need = int(lib.build_info().get("cuda_runtime_major", 0))
    version = driver_version(lib)
    if version is None or version == 0 or need == 0:
        return None
    if version < 0:
        return "the CUDA driver version could not be queried (cudaDriverGetVersion failed)"
    major, minor = version // 1000, version % 1000 // 10
    if major < need:
        return (f"the CUDA driver supports CUDA {major}.{minor}, but kfac_fast._C links the CUDA {need} "
                f"runtime statically and needs a driver for CUDA {need} or newer; torch serves these ops")
    return None


def missing() -> Optional[str]:
    """Why this machine has no cuda backend (None when `_C` was built with CUDA and the
    driver can run it)."""
    try:
        lib = importlib.import_module("kfac_fast._C")
        if not lib.build_info()["cuda"]:
            return "kfac_fast._C was built without CUDA (no nvcc at build time, or KFAC_FAST_CUDA=0)"
    except Exception as exc:  # ImportError, or a module built for another Python/ABI
        return f"kfac_fast._C is not importable ({type(exc).__name__}: {exc})"
    return driver_problem(lib)
