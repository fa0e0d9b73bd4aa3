"""The launch guard every Triton and CUDA launch of kfac_fast goes through.

`launch_on(fn, tensors)` checks that every tensor a kernel touches is on one device,
makes that device current for the launch (Triton launches on the current device and its
current stream; a tensor on cuda:1 while cuda:0 is current would otherwise be launched on
the wrong GPU) and yields that device's current stream, which is the stream the caller's
tensors are ordered on. The offset helpers say when a kernel needs 64-bit offsets
(`needs_index64`) and refuse, with a ValueError naming the argument, sizes a kernel
counts in 32 bits (`check_int32`).

This module imports torch only, never Triton, so `kfac_fast.backends.cuda` can use it on
a machine without Triton. The device guard and stream lookup are module attributes
(`_device_guard`, `_current_stream`) so CPU tests can replace them with mocks.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Mapping
from typing import Any, Optional

import torch

# Largest offset (in elements) a kernel computes in int32 arithmetic.
INT32_MAX = 2**31 - 1

_device_guard = torch.cuda.device
_current_stream = torch.cuda.current_stream


def max_offset(shape: Iterable[int], strides: Iterable[int]) -> int:
    """The largest element offset of a strided view (0 when it is empty)."""
    shape, strides = list(shape), list(strides)
    if any(s == 0 for s in shape):
        return 0
    return sum((s - 1) * abs(st) for s, st in zip(shape, strides))


def tensor_max_offset(t: torch.Tensor) -> int:
    return max_offset(t.shape, t.stride())


def needs_index64(*tensors: Optional[torch.Tensor], pad: int = 0) -> bool:
    """Whether some element offset of these tensors (plus `pad` elements of tile padding a
    kernel may form before masking) can pass int32."""
    return any(t is not None and tensor_max_offset(t) + pad >= INT32_MAX for t in tensors)


def square_needs_index64(n: int, stride: int, block: int) -> bool:
    """Whether the i*stride + j of an n x n matrix with row stride `stride`, over tiles of
    `block` rows padded past n, can pass int32 (the factor epilogue's offsets)."""
    padded = -(-max(n, 1) // block) * block
    return (padded - 1) * max(stride, 1) + (padded - 1) >= INT32_MAX


def offsets_fit(grads, qa, qg) -> Optional[str]:
    """None when every per-layer operand's offsets (grads, eigenbases, the m x n
    workspaces, plus a tile of padding) stay in int32, else the reason naming the layer."""
    pad = 256 * 256
    for i, (g, q_a, q_g) in enumerate(zip(grads, qa, qg)):
        m, n = q_g.shape[0], q_a.shape[0]
        sizes = {"grads": 0 if g is None else tensor_max_offset(g), "qa": tensor_max_offset(q_a),
                 "qg": tensor_max_offset(q_g), "Q_G^T dW_bar Q_A": m * n}
        for name, span in sizes.items():
            if span + pad >= INT32_MAX:
                return f"layer {i}: {name} spans {span} elements, past the int32 offsets of the grouped kernels"
    return None


def check_int32(fn: str, name: str, value: int, what: str = "elements") -> None:
    """ValueError naming `name` when a count a kernel keeps in int32 can pass it."""
    if value >= INT32_MAX:
        raise ValueError(f"{fn}: {name} spans {value} {what}, past the 2^31 - 1 this kernel counts in "
                         f"32 bits; split the call or use KFAC_FAST_BACKEND=torch")


def _flatten(tensors: Mapping[str, Any]) -> Iterator[tuple[str, torch.Tensor]]:
    for name, t in tensors.items():
        if t is None:
            continue
        if isinstance(t, (list, tuple)):
            for i, x in enumerate(t):
                if x is not None:
                    yield f"{name}[{i}]", x
        else:
            yield name, t


def common_device(fn: str, tensors: Mapping[str, Any]) -> torch.device:
    """The one device of every tensor in `tensors` (name -> tensor, list or None);
    ValueError naming the first tensor on another device."""
    first: Optional[tuple[str, torch.device]] = None
    for name, t in _flatten(tensors):
        dev = t.device
        if first is None:
            first = (name, dev)
        elif dev != first[1]:
            raise ValueError(f"{fn}: {name} is on {dev}, but {first[0]} is on {first[1]}; "
                             "every tensor of one call must be on one device")
    if first is None:
        raise ValueError(f"{fn}: no tensor to launch on")
    return first[1]


@contextlib.contextmanager
def launch_on(fn: str, tensors: Mapping[str, Any]) -> Iterator[Any]:
    """Checks one device for all `tensors`; on CUDA, makes it current for the block and
    yields its current stream (`.cuda_stream` is the handle `_C` takes); elsewhere yields
    None (the Triton interpreter runs CPU tensors)."""
    device = common_device(fn, tensors)
    if device.type != "cuda":
        yield None
        return
    with _device_guard(device):
        yield _current_stream(device)
