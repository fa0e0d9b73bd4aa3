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

Per-example seeding (`seed=ExampleSeed(...)`, what `kfac_fast.KFAC` uses): instead of
one generator over the whole batch, each output entry's uniform is a counter-based hash
of (base seed, step, draw, GLOBAL example index, position inside the example), computed
on the device with integer ops (`_mix32`, a 32-bit integer finaliser; no host sync, no
generator state). An example's sample then depends only on its global index, not on how
the batch is split: rank r's shard, sampled with `offset` = the examples of lower ranks,
gets exactly the samples of those rows of the whole batch. Dim 0 indexes the examples.
"""
from __future__ import annotations

import dataclasses
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


_M32 = 0xFFFFFFFF


def _mix32(x: int) -> int:
    """A 32-bit integer hash of an int in [0, 2^32) (the 'lowbias32' finaliser:
    xorshift-multiply, two rounds); `_mix32_` is the same on a tensor."""
    x ^= x >> 16
    x = (x * 0x7FEB352D) & _M32
    x ^= x >> 15
    x = (x * 0x846CA68B) & _M32
    return x ^ (x >> 16)


def _mul32_(x: torch.Tensor, c: int, tmp: torch.Tensor) -> None:
    """x <- x * c mod 2^32 in place (x int64 in [0, 2^32)), in 48-bit partial products so
    that int64 arithmetic never overflows (the same bits on every device)."""
    torch.mul(x, c >> 16, out=tmp)
    tmp.bitwise_and_(0xFFFF).bitwise_left_shift_(16)
    x.mul_(c & 0xFFFF).add_(tmp).bitwise_and_(_M32)


def _mix32_(x: torch.Tensor) -> torch.Tensor:
    """`_mix32` of every entry of an int64 tensor of values in [0, 2^32), in place."""
    tmp = torch.empty_like(x)
    x.bitwise_xor_(x >> 16)
    _mul32_(x, 0x7FEB352D, tmp)
    x.bitwise_xor_(x >> 15)
    _mul32_(x, 0x846CA68B, tmp)
    return x.bitwise_xor_(x >> 16)


HASH_CHUNK = 2 ** 24  # entries `ExampleSeed.uniform` hashes at once (~400 MB of int64 temporaries)
_GOLDEN = 0x9E3779B9  # an odd constant: keeps 0 inputs away from the hash's fixed point 0


@dataclasses.dataclass(frozen=True)
class ExampleSeed:
    """Where one batch's MC samples come from, per example (see the module docstring).

    Args:
        seed: the base seed, an int in [0, 2^64).
        step: the optimiser step (a new sample every step), an int >= 0.
        offset: the global index of this batch's first example (the examples of the lower
            ranks; 0 single-process), an int >= 0.
        draw: which of several samples of the same step (`nth`), an int >= 0.
    """

    seed: int
    step: int = 0
    offset: int = 0
    draw: int = 0

    def __post_init__(self) -> None:
        for name in ("seed", "step", "offset", "draw"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < 2 ** 64:
                raise ValueError(f"ExampleSeed: {name} must be an int in [0, 2^64), got {v!r}")

    def nth(self, draw: int) -> ExampleSeed:
        """The same seed for the `draw`-th sample of the step (num_samples > 1)."""
        return dataclasses.replace(self, draw=draw)

    def _key(self, stream: int) -> int:
        """The host-side key of (seed, step, draw, stream): a chain of _mix32."""
        key = _GOLDEN
        for word in (self.seed, self.seed >> 32, self.step, self.step >> 32, self.draw, stream):
            key = _mix32(key ^ (word & _M32))
        return key

    def uniform(self, shape: tuple, device: torch.device, *, stream: int = 0) -> torch.Tensor:
        """float32 uniforms in (0, 1) of `shape` (dim 0: the examples), entry [n, ...] a
        hash of (seed, step, draw, stream, offset + n, the entry's position in the example);
        values (2k + 1) / 2^24, so never 0 or 1. No host sync."""
        shape = tuple(shape) if len(shape) else (1,)
        n, per = shape[0], math.prod(shape[1:])
        if self.offset + n > 2 ** 32 or per > 2 ** 32:
            raise ValueError(f"ExampleSeed: at most 2^32 examples of 2^32 entries each, got "
                             f"offset {self.offset} + {n} examples of {per}")
        key = self._key(stream)
        examples = _mix32_(torch.arange(self.offset, self.offset + n, dtype=torch.int64, device=device) ^ key)
        out = torch.empty((n, per), dtype=torch.float32, device=device)
        # blocks of at most HASH_CHUNK entries: the int64 temporaries (3 of them, 24 bytes
        # an entry) stay bounded; every entry is hashed alone, so the values do not
        # depend on the blocks
        cols = max(1, min(per, HASH_CHUNK))
        rows = max(1, HASH_CHUNK // cols)
        for c0 in range(0, per, cols):
            c1 = min(c0 + cols, per)
            positions = _mix32_(torch.arange(c0, c1, dtype=torch.int64, device=device)
                                .add_(_GOLDEN).bitwise_and_(_M32))
            for r0 in range(0, n, rows):
                h = _mix32_(examples[r0:r0 + rows, None] ^ positions[None, :])
                out[r0:r0 + rows, c0:c1] = ((h >> 9).to(torch.float32) * 2.0 + 1.0) * 2.0 ** -24
        return out.reshape(shape)


def _uniform(shape, like: torch.Tensor, generator: Optional[torch.Generator]) -> torch.Tensor:
    u = torch.rand(shape, dtype=torch.float32, device=like.device, generator=generator)
    # log(0) would give an infinite Gumbel sample; the smallest normal keeps it finite
    return u.clamp_(min=torch.finfo(torch.float32).tiny)


def _draw_uniform(shape, like: torch.Tensor, generator: Optional[torch.Generator],
                  seed: Optional[ExampleSeed], stream: int = 0) -> torch.Tensor:
    if seed is None:
        return _uniform(shape, like, generator)
    return seed.uniform(tuple(shape), like.device, stream=stream).reshape(shape)


def sampled_output_grad(output: torch.Tensor, loss: str = "cross_entropy", *,
                        generator: Optional[torch.Generator] = None,
                        variance: float = 1.0, seed: Optional[ExampleSeed] = None) -> torch.Tensor:
    """Gradient of sum_rows -log p(y | output) w.r.t. `output`, y sampled from the model.

    Args:
        output: the model's output (logits for the classification losses, the mean for
            "gaussian"); classes on the last dim for "cross_entropy".
        loss: "cross_entropy", "bce_with_logits" or "gaussian" ("mse").
        generator: optional torch.Generator on `output`'s device.
        variance: the Gaussian's variance (1.0 matches a loss 0.5 * ||y - z||^2).
        seed: an `ExampleSeed`: sample per example (dim 0) from the counter-based hash
            instead of a generator, so the samples do not depend on how the batch is split
            (not with `generator`). The Gaussian's normals then come by Box-Muller.

    Returns:
        A tensor shaped and typed like `output` (computed in float32 or better).
    """
    loss = canonical_loss(loss)
    if not isinstance(output, torch.Tensor) or not output.is_floating_point():
        raise TypeError("output must be a floating-point tensor")
    if seed is not None and not isinstance(seed, ExampleSeed):
        raise TypeError(f"seed must be a kfac_fast.fisher.ExampleSeed or None, got {type(seed).__name__}")
    if seed is not None and generator is not None:
        raise ValueError("pass either generator or seed (per-example sampling), not both")
    z = output.detach()
    work = z.float() if z.element_size() < 4 else z
    if loss == "cross_entropy":
        if z.dim() == 0 or z.shape[-1] < 1:
            raise ValueError(f"output must have a class dim (last), got shape {tuple(z.shape)}")
        logp = torch.log_softmax(work, dim=-1)
        gumbel = -torch.log(-torch.log(_draw_uniform(z.shape, z, generator, seed)))
        y = torch.argmax(logp + gumbel.to(logp.dtype), dim=-1, keepdim=True)
        grad = logp.exp()
        grad.scatter_add_(-1, y, torch.full_like(y, -1, dtype=grad.dtype))
    elif loss == "bce_with_logits":
        p = torch.sigmoid(work)
        y = (_draw_uniform(z.shape, z, generator, seed).to(p.dtype) < p).to(p.dtype)
        grad = p - y
    else:
        require_number("variance", variance)
        if seed is None:
            eps = torch.randn(z.shape, dtype=work.dtype, device=z.device, generator=generator)
        else:  # Box-Muller from two independent streams
            u1 = seed.uniform(tuple(z.shape), z.device, stream=1).to(work.dtype)
            u2 = seed.uniform(tuple(z.shape), z.device, stream=2).to(work.dtype)
            eps = torch.sqrt(-2.0 * torch.log(u1)) * torch.cos((2.0 * math.pi) * u2)
        grad = eps.mul_(-1.0 / math.sqrt(variance))
    return grad.to(output.dtype)
