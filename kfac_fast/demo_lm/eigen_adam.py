"""The demo's "K-FAC eigen-Adam" row: `kfac_fast.EigenAdam` (moved to kfac_fast/eigen_adam.py)."""
from ..eigen_adam import EigenAdam

__all__ = ["EigenAdam"]
