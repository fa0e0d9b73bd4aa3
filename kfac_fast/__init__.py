"""kfac_fast: fast K-FAC for PyTorch.

`kfac_fast.ops` is the functional backend API (see README); `KFACPreconditioner` is the
frontend; `EigenAdam` is Adam in the eigenbasis of K-FAC's factors. Importing never fails
because the compiled module `_C`, CUDA or Triton is missing: every op falls back to its
torch reference, and `backend_info()` says which implementation serves each op and why.
"""
from . import ops
from ._info import backend_info
from .checkpoint import load_checkpoint, save_checkpoint
from .eigen_adam import EigenAdam
from .optimizer import KFAC
from .preconditioner import KFACPreconditioner

__version__ = "0.1.0"

__all__ = [
    "KFAC",
    "EigenAdam",
    "KFACPreconditioner",
    "__version__",
    "backend_info",
    "load_checkpoint",
    "ops",
    "save_checkpoint",
]
