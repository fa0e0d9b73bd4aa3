"""Triton kernels of kfac_fast, shipped as `kfac_fast.kernels`.

Importing this package needs Triton; `kfac_fast._dispatch` imports it lazily and falls
back to the torch reference when Triton is missing.
"""
