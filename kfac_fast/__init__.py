"""kfac_fast: fast K-FAC for PyTorch.

`kfac_fast.ops` is the functional backend API (see README); `KFACPreconditioner` is the
frontend. Importing never fails because the compiled module `_C`, CUDA or Triton is
missing: every op falls back to its torch reference, and `backend_info()` says which
implementation serves each op and why.
"""
__version__ = "0.1.0"

from . import ops  # noqa: E402,F401
from ._info import backend_info  # noqa: E402,F401
from .preconditioner import KFACPreconditioner  # noqa: E402,F401
from .optimizer import KFAC  # noqa: E402,F401
from .checkpoint import load_checkpoint, save_checkpoint  # noqa: E402,F401
