"""Triton kernels of kfac_fast, shipped as `kfac_fast.kernels`.

One file per op family (`factor_update`, `conv_factor`, `precondition`) and one shared
launch helper module (`launch`). Importing this package needs Triton; the router
(`kfac_fast._dispatch`, through `kfac_fast.backends.triton`) imports it lazily and never
uses it when Triton is missing. Kernels never fall back: a call they cannot serve is
refused by their registration and served by another backend.
"""
