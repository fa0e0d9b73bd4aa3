"""Block-tridiagonal K-FAC (Martens & Grosse 2015, section 4.3) for chains of Linear layers.

- `algebra`: the math as pure functions (Sigma^-1 without Kronecker products, the chain
  solve Xi^T Lambda Xi, the pair coupling terms);
- `curvature`: the chain pairs' cross factors and decompositions, as a `Curvature`
  extension that KFACPreconditioner's jobs call;
- `frontend`: `TridiagPreconditioner` (what `KFAC(approx="tridiag")` builds) and
  `find_chains`.
"""
from .algebra import PairState, SigmaInverse, kronecker_difference_inverses, precondition_chain
from .curvature import ChainPair, TridiagonalCurvature
from .frontend import ELEMENTWISE, TridiagPreconditioner, find_chains

__all__ = ["ELEMENTWISE", "ChainPair", "PairState", "SigmaInverse", "TridiagPreconditioner",
           "TridiagonalCurvature", "find_chains", "kronecker_difference_inverses", "precondition_chain"]
