"""The small reconstruction problem KFAC's lr and metrics tests share: random float64
batches in [0, 1) and the paper's summed-BCE closure (loss, outputs) over them."""
from __future__ import annotations

import torch
import torch.nn.functional as F

DT = torch.float64


def random_batches(n: int, seed: int = 2) -> list:
    """n batches of 16 rows of 6 uniform features (the model's inputs and targets)."""
    torch.manual_seed(seed)
    return [torch.rand(16, 6, dtype=DT) for _ in range(n)]


def bce_closure(model, x):
    """KFAC's closure on batch x: per-example summed BCE of model(x) against x, and the outputs."""
    def closure():
        out = model(x)
        return F.binary_cross_entropy_with_logits(out, x, reduction="sum") / len(x), out
    return closure
