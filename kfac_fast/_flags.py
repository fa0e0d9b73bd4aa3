"""torch's fp32 matmul precision as the ops' `precision=` keyword sets it.

Below the op API (the kernels, the backends and the frontends may all import it): the
keyword's meaning (`allow_tf32_of`), a block that sets torch's own flag for torch GEMMs
(`matmul_precision`), and whether torch.mm takes `out_dtype` (`mm_has_out_dtype`).
"""
from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from typing import Optional

import torch


def allow_tf32_of(precision: Optional[str], allow_tf32: bool = False) -> bool:
    """The kernels' TF32 flag from a `precision` argument ("tf32"; "ieee" or "fp32": IEEE
    fp32; None keeps `allow_tf32`). The ops' keyword-only `precision=` arrives here."""
    if precision is None:
        return bool(allow_tf32)
    if precision not in ("tf32", "ieee", "fp32"):
        raise ValueError(f"precision must be 'tf32', 'ieee' or 'fp32', got {precision!r}")
    return precision == "tf32"


@contextlib.contextmanager
def matmul_precision(precision: Optional[str]) -> Iterator[None]:
    """torch's fp32 matmul precision inside the block: "tf32" allows TF32, "ieee"/"fp32"
    forbids it, None leaves torch's setting alone.

    Through the API the user set it with: torch >= 2.9 refuses to read the legacy
    `allow_tf32` once `fp32_precision` was set ("mix of the legacy and new APIs"), and
    setting the new one makes the user's later legacy reads fail, so each is restored
    through itself.
    """
    if precision is None:
        yield
        return
    tf32 = allow_tf32_of(precision)
    flags = torch.backends.cuda.matmul
    try:
        before, legacy = flags.allow_tf32, True
    except RuntimeError:  # the user chose torch's new API
        before, legacy = flags.fp32_precision, False
    if legacy:
        flags.allow_tf32 = tf32
    else:
        flags.fp32_precision = "tf32" if tf32 else "ieee"
    try:
        yield
    finally:
        if legacy:
            flags.allow_tf32 = before
        else:
            flags.fp32_precision = before


@functools.lru_cache(maxsize=None)
def mm_has_out_dtype(device_type: str) -> bool:
    """Whether torch.mm takes out_dtype for 16-bit operands on this device type (torch
    >= 2.8 on CUDA; CPU torch has no such kernel). Asked once per device type."""
    try:
        a = torch.ones(2, 2, dtype=torch.bfloat16, device=device_type)
        torch.mm(a, a, out_dtype=torch.float32)
    except (TypeError, NotImplementedError, RuntimeError):
        return False
    return True
