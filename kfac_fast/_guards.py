"""Memory and degenerate-shape checks of the op API that `_validate` leaves out.

In-place ops write their outputs while reading their inputs: an output that shares memory
with an input (`update_factor_(A, A, ...)`), with another output, or with itself (an
expanded, stride-0 view) would be read after it was written, or written twice. These
checks refuse such calls with a ValueError naming both arguments. They read host metadata
only (data pointers, sizes, strides): no device sync, one sort per call. Tensors without
storage (fake / meta tensors, and everything under torch.compile) are skipped.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

Tensor = torch.Tensor
Named = Sequence[tuple[str, Optional[Tensor]]]


def _extent(t: Tensor) -> Optional[tuple[int, int]]:
    """[first byte, one past the last byte) a view can touch; None without real storage."""
    n = t.numel()
    if n == 0 or t.device.type == "meta":
        return None
    try:
        start = t.data_ptr()
    except (RuntimeError, NotImplementedError):  # fake / functional tensors while tracing
        return None
    if start == 0:
        return None
    if t.is_contiguous():
        return start, start + n * t.element_size()
    last = sum((size - 1) * stride for size, stride in zip(t.shape, t.stride()) if size > 0)
    return start, start + (last + 1) * t.element_size()


def no_self_overlap(op: str, written: Named) -> None:
    """Each output must not write one memory location twice (stride-0 / expanded views)."""
    if torch.compiler.is_compiling():  # traced: no storage to inspect
        return
    for name, t in written:
        if t is not None and not t.is_contiguous() and t.numel() > 1 and torch._debug_has_internal_overlap(t) == 1:
            raise ValueError(f"{op}: {name} has overlapping memory (an expanded or stride-0 view, shape "
                             f"{tuple(t.shape)}, strides {t.stride()}): pass a tensor of its own "
                             "(e.g. .clone())")


def no_overlap(op: str, written: Named, read: Named = ()) -> None:
    """No output may share memory with another output or with an input (one sweep over the
    tensors' byte ranges sorted by start; a range check, so interleaved strided views of
    one buffer are refused too)."""
    if torch.compiler.is_compiling():  # traced: no storage to inspect
        return
    no_self_overlap(op, written)
    spans = []
    for is_written, items in ((True, written), (False, read)):
        for name, t in items:
            extent = None if t is None else _extent(t)
            if extent is not None:
                spans.append((extent[0], extent[1], is_written, name))
    if len(spans) < 2:
        return
    spans.sort(key=lambda s: s[0])
    w_end, w_name, r_end, r_name = -1, "", -1, ""
    for start, end, is_written, name in spans:
        if start < w_end:
            raise ValueError(f"{op}: {name} shares memory with {w_name}, which the op writes: "
                             "pass separate tensors (e.g. .clone())")
        if is_written and start < r_end:
            raise ValueError(f"{op}: {name} (written by the op) shares memory with {r_name}, which it "
                             "reads: pass separate tensors (e.g. .clone())")
        if is_written and end > w_end:
            w_end, w_name = end, name
        if not is_written and end > r_end:
            r_end, r_name = end, name


def named(name: str, tensors: Sequence[Optional[Tensor]]) -> list:
    """[(f"{name}[i]", t)] of a per-layer list."""
    return [(f"{name}[{i}]", t) for i, t in enumerate(tensors)]


def min_dim(op: str, name: str, t: Tensor, low: int = 1) -> None:
    if t.dim() < low:
        raise ValueError(f"{op}: {name} must have at least {low} dimension(s), got a {t.dim()}-dim tensor")


def nonzero_sizes(op: str, name: str, t: Tensor, dims: Sequence[int], what: str) -> None:
    """t's sizes at `dims` must be >= 1 (`what` names them, e.g. 'C, H and W')."""
    if any(t.shape[d] == 0 for d in dims):
        raise ValueError(f"{op}: {name} must have {what} >= 1, got shape {tuple(t.shape)}")


def nonempty_layers(op: str, dims: Sequence[tuple[int, int]]) -> None:
    """Every layer of an in-place preconditioner has d_out >= 1 and n_a >= 1."""
    for i, (d_out, n_a) in enumerate(dims):
        if d_out < 1 or n_a < 1:
            raise ValueError(f"{op}: layer {i} is empty (qg/g_inv[{i}] gives d_out={d_out}, qa/a_inv[{i}] "
                             f"gives n_a={n_a}): weight_grads[{i}] must have d_out >= 1 and d_in >= 1")


def inplace_grads(op: str, weights: Sequence[Tensor], biases: Sequence[Optional[Tensor]],
                  inputs: Sequence[Optional[Sequence[Tensor]]]) -> None:
    """The gradients an in-place preconditioner writes share memory with nothing it reads
    (the per-layer lists in `inputs`, named by position) nor with each other."""
    names = ("qa", "da", "qg", "dg") if len(inputs) == 4 else ("a_inv", "g_inv") if len(inputs) == 2 \
        else ("qa", "qg", "scales")
    read = [pair for name, items in zip(names, inputs) if items is not None for pair in named(name, items)]
    no_overlap(op, named("weight_grads", weights) + named("bias_grads", list(biases)), read)


def same_dtype(op: str, a_name: str, a: Sequence[Tensor], g_name: str, g: Sequence[Tensor]) -> None:
    """Each layer's A-side and G-side matrices share one dtype (the op computes in it)."""
    for i, (ta, tg) in enumerate(zip(a, g)):
        if ta.dtype != tg.dtype:
            raise TypeError(f"{op}: {a_name}[{i}] is {str(ta.dtype).replace('torch.', '')} but {g_name}[{i}] is "
                            f"{str(tg.dtype).replace('torch.', '')}: a layer's matrices must share one dtype")


def same_device(have: torch.device, where: torch.device) -> bool:
    """`have == where`, where a device without an index ("cuda") means the current one, as
    torch reads it when it allocates: cuda:0 is on "cuda" while cuda:0 is current."""
    if have == where:
        return True
    if where.index is not None or have.type != where.type or have.type == "cpu":
        return False
    module = getattr(torch, have.type, None)  # torch.cuda, torch.xpu, ...
    if module is None or not module.is_available():
        return False
    return have.index == module.current_device()
