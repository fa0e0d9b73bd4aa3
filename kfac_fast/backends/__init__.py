"""The implementations behind `kfac_fast.ops`, one module per backend.

Importing this package (`kfac_fast.ops` does) registers every backend's rows
with `kfac_fast._dispatch`: `reference` ("torch": every op, every device; the test
oracle), `cublas` (the factor updates as torch GEMMs on CUDA tensors), `triton` (the
Triton kernels of `kfac_fast.kernels`) and `cuda` (the kernels of `kfac_fast._C`).
Registering imports neither Triton nor `_C`. Adding a backend is one module here that
calls `_dispatch.register_backend` and `_dispatch.register`, plus its import below.
"""
# Importing registers. The reference first: its rows cover every op in OP_NAMES order,
# which is the order backend_info() lists the ops in.
# isort: off
from . import reference  # noqa: F401
from . import cublas, triton, cuda  # noqa: F401
# isort: on
