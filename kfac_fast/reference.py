"""TEMPORARY shim (house refactor): the torch reference lives in `kfac_fast.backends.reference`.

Kept only while `kfac_fast.preconditioner` still imports `record_warm_paths` from here;
deleted once it reads the paths from `ops.eigh(..., return_paths=True)`.
"""
from .backends._common import record_warm_paths  # noqa: F401
from .backends.reference import *  # noqa: F401,F403
