"""Monte-Carlo Fisher: output gradients for targets sampled from the model.

The paper's Fisher takes g = d(-log p(y|x))/ds with y SAMPLED from the model's
predictive distribution, not the data's label (that would be the empirical Fisher).
`sampled_output_grad` returns d(sum over rows of -log p(y|output))/d output for one
fresh sample per row, computed in closed form (no loss graph is built):

| `loss` | predictive distribution | gradient per row |
|---|---|---|
| "cross_entropy" | softmax over the LAST dim | softmax(z) - onehot(y) |
| "bce_with_logits" | independent Bernoulli(sigmoid(z)) | sigmoid(z) - y |
| "gaussian" (alias "mse") | N(z, variance I) | (z - y) / variance = -eps / sqrt(variance) |

The loss is a sum over rows, so the frontend uses S = 1 for these gradients whatever
the user's own `loss_average`. Sampling is done on the device without host syncs
(categorical samples by the Gumbel-max trick), reproducible with a `generator`.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from .schedules import require_number

LOSSES = ("cross_entropy", "bce_with_logits", "gaussian")
_ALIASES = {"ce": "cross_entropy", "cross_entropy": "cross_entropy",
            "bce_with_logits": "bce_with_logits", "binary_cross_entropy_with_logits": "bce_with_logits",
            "gaussian": "gaussian", "mse": "gaussian"}


def canonical_loss(loss: str) -> str:
    """The canonical name of an MC-Fisher loss, or a ValueError naming `loss`."""
    if not isinstance(loss, str) or loss.lower() not in _ALIASES:
        raise ValueError(f"loss must be one of {LOSSES} (or 'mse' for 'gaussian'), got {loss!r}")
    return _ALIASES[loss.lower()]


def _uniform(shape, like: torch.Tensor, generator: Optional[torch.Generator]) -> torch.Tensor:
    u = torch.rand(shape, dtype=torch.float32, device=like.device, generator=generator)
    # log(0) would give an infinite Gumbel sample; the smallest normal keeps it finite
    return u.clamp_(min=torch.finfo(torch.float32).tiny)


def sampled_output_grad(output: torch.Tensor, loss: str = "cross_entropy", *,
                        generator: Optional[torch.Generator] = None,
                        variance: float = 1.0) -> torch.Tensor:
    """Gradient of sum_rows -log p(y | output) w.r.t. `output`, y sampled from the model.

    Args:
        output: the model's output (logits for the classification losses, the mean for
            "gaussian"); classes on the last dim for "cross_entropy".
        loss: "cross_entropy", "bce_with_logits" or "gaussian" ("mse").
        generator: optional torch.Generator on `output`'s device.
        variance: the Gaussian's variance (1.0 matches a loss 0.5 * ||y - z||^2).

    Returns:
        A tensor shaped and typed like `output` (computed in float32 or better).
    """
    loss = canonical_loss(loss)
    if not isinstance(output, torch.Tensor) or not output.is_floating_point():
        raise TypeError("output must be a floating-point tensor")
    z = output.detach()
    work = z.float() if z.element_size() < 4 else z
    if loss == "cross_entropy":
        if z.dim() == 0 or z.shape[-1] < 1:
            raise ValueError(f"output must have a class dim (last), got shape {tuple(z.shape)}")
        logp = torch.log_softmax(work, dim=-1)
        gumbel = -torch.log(-torch.log(_uniform(z.shape, z, generator)))
        y = torch.argmax(logp + gumbel.to(logp.dtype), dim=-1, keepdim=True)
        grad = logp.exp()
        grad.scatter_add_(-1, y, torch.full_like(y, -1, dtype=grad.dtype))
    elif loss == "bce_with_logits":
        p = torch.sigmoid(work)
        y = (_uniform(z.shape, z, generator).to(p.dtype) < p).to(p.dtype)
        grad = p - y
    else:
        require_number("variance", variance)
        eps = torch.randn(z.shape, dtype=work.dtype, device=z.device, generator=generator)
        grad = eps.mul_(-1.0 / math.sqrt(variance))
    return grad.to(output.dtype)
