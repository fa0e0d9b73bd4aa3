"""KFACPreconditioner, split by job.

- `kfac`: the class (constructor, `step`) composed of the jobs below;
- `args`: the constructor's argument checks and kfac-pytorch's keywords (a TypeError
  naming ours);
- `registration`: which modules become layers (`skip_layers`, `extra_kinds`, size limits);
- `capture`: the layers' hooks, row masks and the MC Fisher's backward;
- `factors`: the running-average factor (and EKFAC scale) updates;
- `refresh`: eigendecompositions / damped inverses, with the solver fallbacks;
- `precondition`: the rewrite of `.grad` (fused, or out of place);
- `state`: state_dict / load_state_dict and memory accounting;
- `observe`: the per-step record `last_metrics` and the `kfac_fast` log lines;
- `extension`: the `Curvature` protocol for curvature beyond per-layer blocks
  (the block-tridiagonal variant plugs in there);
- `base`: the settings and state the jobs share.
"""
from .extension import Curvature, UpdateContext
from .kfac import FISHERS, LOSS_AVERAGES, METHODS, KFACPreconditioner

__all__ = ["FISHERS", "LOSS_AVERAGES", "METHODS", "Curvature", "KFACPreconditioner", "UpdateContext"]
