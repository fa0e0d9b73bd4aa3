"""TEMPORARY shim (house refactor): the warm refresh lives in `kfac_fast.backends.warm_eigh`;
path names for callers are `kfac_fast.ops.EIGH_PATHS`. Deleted once nothing imports it."""
from .backends.warm_eigh import *  # noqa: F401,F403
