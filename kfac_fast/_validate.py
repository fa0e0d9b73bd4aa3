"""Argument checks of `kfac_fast.ops`: each error names the op and the argument.

ValueError for values, shapes, lengths and devices; TypeError for types and dtypes. Each
`check_<op>` validates one public call and returns its custom op's arguments normalised
(see `kfac_fast.ops`): scalars as 0-dim tensors, per-layer scalars as 1-D tensors, bias
lists as present tensors plus `has_bias` flags, int pairs as lists.
"""
from __future__ import annotations

import math
import numbers
from typing import Any, Optional

import torch

from ._guards import same_device

Tensor = torch.Tensor

FACTOR_DTYPES = (torch.float32, torch.float64)
INPUT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


# ---- one argument ----------------------------------------------------------------------
def tensor(op: str, name: str, value: Any) -> Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(value).__name__}")
    return value


def dtype(op: str, name: str, t: Tensor, allowed: tuple) -> None:
    if t.dtype not in allowed:
        names = ", ".join(str(d).replace("torch.", "") for d in allowed)
        raise TypeError(f"{op}: {name} must have dtype {names}; got {str(t.dtype).replace('torch.', '')}")


def square(op: str, name: str, t: Any, *, dtypes: tuple = FACTOR_DTYPES, contiguous: bool = False) -> int:
    """Check a (n, n) float tensor (contiguous when asked) and return n."""
    tensor(op, name, t)
    if t.dim() != 2 or t.shape[0] != t.shape[1]:
        raise ValueError(f"{op}: {name} must be a square matrix (n, n), got shape {tuple(t.shape)}")
    dtype(op, name, t, dtypes)
    if contiguous and not t.is_contiguous():
        raise ValueError(f"{op}: {name} must be contiguous")
    return t.shape[0]


def shape(op: str, name: str, t: Tensor, want: tuple, why: str = "") -> None:
    if tuple(t.shape) != tuple(want):
        extra = f" ({why})" if why else ""
        raise ValueError(f"{op}: {name} must have shape {tuple(want)}{extra}, got {tuple(t.shape)}")


def device(op: str, name: str, t: Tensor, where: torch.device) -> None:
    if not same_device(t.device, where):
        raise ValueError(f"{op}: {name} is on {t.device} but the other tensors are on {where}")


def precision(op: str, value: Any) -> Optional[str]:
    """The ops' keyword-only `precision`: None or "ieee"/"fp32" (IEEE fp32), or "tf32"."""
    if value is not None and value not in ("ieee", "fp32", "tf32"):
        raise ValueError(f"{op}: precision must be None, 'ieee', 'fp32' or 'tf32', got {value!r}")
    return value


def flag(op: str, name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{op}: {name} must be a bool, got {type(value).__name__}")
    return value


def tensor_list(op: str, name: str, value: Any, length: Optional[int] = None, *, optional: bool = False) -> list:
    """A list from a sequence of tensors (None entries only when optional)."""
    if isinstance(value, torch.Tensor) or not isinstance(value, (list, tuple)):
        raise TypeError(f"{op}: {name} must be a list of tensors, got {type(value).__name__}")
    items = list(value)
    if length is not None and len(items) != length:
        raise ValueError(f"{op}: {name} must have {length} entries (one per layer), got {len(items)}")
    for i, t in enumerate(items):
        if t is None and optional:
            continue
        tensor(op, f"{name}[{i}]", t)
    return items


def nonempty(op: str, name: str, items: list) -> None:
    if not items:
        raise ValueError(f"{op}: {name} must not be empty (nu needs a device)")


def number(op: str, name: str, value: float, kind: str) -> None:
    """A finite value, >= 0 for kind "nonneg", > 0 for "positive"."""
    if not math.isfinite(value):
        raise ValueError(f"{op}: {name} must be finite, got {value}")
    if kind == "nonneg" and value < 0:
        raise ValueError(f"{op}: {name} must be >= 0, got {value}")
    if kind == "positive" and value <= 0:
        raise ValueError(f"{op}: {name} must be > 0, got {value}")


def _scalar_tensor_ok(op: str, name: str, value: Tensor, where: torch.device) -> None:
    if not value.is_floating_point():
        raise TypeError(f"{op}: {name} must be a floating tensor, got {value.dtype}")
    if value.device.type != "cpu" and not same_device(value.device, where):
        raise ValueError(f"{op}: {name} is on {value.device}; scalars must be on cpu or {where}")


def scalar(op: str, name: str, value: Any, where: torch.device, kind: str = "finite") -> Tensor:
    """A 0-dim tensor from a Python number (checked) or a 0-dim float tensor on CPU or `where` (unread: a sync)."""
    if isinstance(value, torch.Tensor):
        if value.dim() != 0:
            raise ValueError(f"{op}: {name} must be a Python number or a 0-dim tensor, got shape {tuple(value.shape)}")
        _scalar_tensor_ok(op, name, value, where)
        return value
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{op}: {name} must be a Python number or a 0-dim tensor, got {type(value).__name__}")
    value = float(value)
    number(op, name, value, kind)
    return torch.tensor(value, dtype=torch.float64)


def per_layer(op: str, name: str, value: Any, n: int, where: torch.device, kind: str = "finite") -> Tensor:
    """A contiguous 1-D tensor of length n from one scalar, n scalars, or a 1-D tensor."""
    if isinstance(value, torch.Tensor) and value.dim() == 1:
        if value.shape[0] != n:
            raise ValueError(f"{op}: {name} must have {n} entries (one per layer), got {value.shape[0]}")
        _scalar_tensor_ok(op, name, value, where)
        return value.contiguous()
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise ValueError(f"{op}: {name} must have {n} entries (one per layer), got {len(value)}")
        items = [scalar(op, f"{name}[{i}]", v, where, kind) for i, v in enumerate(value)]
        if not any(isinstance(v, torch.Tensor) for v in value):
            return torch.tensor([float(v) for v in value], dtype=torch.float64)
        target = next((t.device for t in items if t.device.type != "cpu"), torch.device("cpu"))
        return torch.stack([t.to(dtype=torch.float64) if t.device == target else  # no pageable copy (a sync)
                            torch.full((), float(t), dtype=torch.float64, device=target) for t in items])
    return scalar(op, name, value, where, kind).reshape(1).expand(n).contiguous()


def bools(op: str, name: str, value: Any, n: int) -> list:
    if isinstance(value, bool):
        return [value] * n
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, bool) for v in value):
        raise TypeError(f"{op}: {name} must be a bool or a list of {n} bools, got {value!r}")
    if len(value) != n:
        raise ValueError(f"{op}: {name} must have {n} entries (one per layer), got {len(value)}")
    return list(value)


def as_pair(value: Any) -> tuple[int, int]:
    """(a, b) from an int or a pair of ints already checked by `pair` (or by nn.Conv2d)."""
    return (int(value), int(value)) if isinstance(value, int) else (int(value[0]), int(value[1]))


def pair(op: str, name: str, value: Any) -> list:
    """[a, b] from an int or a pair of ints (bools refused)."""
    if isinstance(value, bool):
        raise TypeError(f"{op}: {name} must be an int or a pair of ints, got {value!r}")
    if isinstance(value, int):
        return [value, value]
    if isinstance(value, (list, tuple)) and len(value) == 2 and all(
            isinstance(v, int) and not isinstance(v, bool) for v in value):
        return [int(value[0]), int(value[1])]
    raise TypeError(f"{op}: {name} must be an int or a pair of ints, got {value!r}")


# ---- one op: check_<op> returns its custom op's arguments ----------------------------
def _last_dim(op: str, name: str, x: Tensor, n: int, ones: bool, factor: str, *, full_shape: bool) -> None:
    """x's last dim must be n - ones (n: the size of `factor`)."""
    if x.dim() < 1 or x.shape[-1] + int(ones) != n:
        got = tuple(x.shape) if full_shape else (x.shape[-1] if x.dim() else "a 0-dim tensor")
        raise ValueError(f"{op}: {name} must have last dim {n - int(ones)} ({factor} is {n}x{n} with "
                         f"append_ones={ones}), got {'shape ' if full_shape else ''}{got}")


def check_update_factor_(factor: Any, x: Any, beta: Any, alpha: Any, append_ones: Any) -> tuple:
    op = "update_factor_"
    n = square(op, "factor", factor, contiguous=True)
    tensor(op, "x", x)
    dtype(op, "x", x, INPUT_DTYPES)
    device(op, "x", x, factor.device)
    flag(op, "append_ones", append_ones)
    _last_dim(op, "x", x, n, append_ones, "factor", full_shape=False)
    return (factor, x, scalar(op, "beta", beta, factor.device), scalar(op, "alpha", alpha, factor.device),
            append_ones)


def check_update_factors_(factors: Any, xs: Any, betas: Any, alphas: Any, append_ones: Any) -> Optional[tuple]:
    """The custom op's arguments, or None when there is no layer."""
    op = "update_factors_"
    factors = tensor_list(op, "factors", factors)
    n = len(factors)
    xs = tensor_list(op, "xs", xs, n)
    ones = bools(op, "append_ones", append_ones, n)
    if n == 0:
        return None
    where = factors[0].device
    for i, (f, x) in enumerate(zip(factors, xs)):
        size = square(op, f"factors[{i}]", f, contiguous=True)
        device(op, f"factors[{i}]", f, where)
        dtype(op, f"xs[{i}]", x, INPUT_DTYPES)
        device(op, f"xs[{i}]", x, where)
        _last_dim(op, f"xs[{i}]", x, size, ones[i], f"factors[{i}]", full_shape=True)
    return factors, xs, per_layer(op, "betas", betas, n, where), per_layer(op, "alphas", alphas, n, where), ones


def check_conv_input_factor_(factor: Any, x: Any, beta: Any, alpha: Any, kernel_size: Any, stride: Any,
                             padding: Any, dilation: Any, append_ones: Any) -> tuple:
    op = "conv_input_factor_"
    n = square(op, "factor", factor, contiguous=True)
    tensor(op, "x", x)
    if x.dim() != 4:
        raise ValueError(f"{op}: x must be 4-D (N, C, H, W), got shape {tuple(x.shape)}")
    dtype(op, "x", x, INPUT_DTYPES)
    device(op, "x", x, factor.device)
    flag(op, "append_ones", append_ones)
    k, s = pair(op, "kernel_size", kernel_size), pair(op, "stride", stride)
    p, d = pair(op, "padding", padding), pair(op, "dilation", dilation)
    for name, v, low in (("kernel_size", k, 1), ("stride", s, 1), ("padding", p, 0), ("dilation", d, 1)):
        if min(v) < low:
            raise ValueError(f"{op}: {name} must be >= {low}, got {tuple(v)}")
    for axis, size in ((0, x.shape[2]), (1, x.shape[3])):
        if size + 2 * p[axis] < d[axis] * (k[axis] - 1) + 1:
            raise ValueError(f"{op}: kernel_size {tuple(k)} (dilation {tuple(d)}) does not fit the padded "
                             f"input of x with shape {tuple(x.shape)} and padding {tuple(p)}")
    expected = x.shape[1] * k[0] * k[1] + int(append_ones)
    if expected != n:
        raise ValueError(f"{op}: factor must be {expected}x{expected} (C*kh*kw = {x.shape[1]}*{k[0]}*{k[1]}"
                         f" with append_ones={append_ones}), got {n}x{n}")
    return (factor, x, scalar(op, "beta", beta, factor.device), scalar(op, "alpha", alpha, factor.device),
            k, s, p, d, append_ones)


def check_eigh(matrices: Any, previous: Any, tol: Any, clamp: Any, return_paths: Any) -> tuple:
    """(matrices, previous list (empty for None), tol as float or None, clamp)."""
    op = "eigh"
    matrices = tensor_list(op, "matrices", matrices)
    n = len(matrices)
    prev = [] if previous is None else tensor_list(op, "previous", previous, n, optional=True)
    if tol is not None:
        if isinstance(tol, bool) or not isinstance(tol, numbers.Real):
            raise TypeError(f"{op}: tol must be a float or None, got {type(tol).__name__}")
        number(op, "tol", float(tol), "nonneg")
        tol = float(tol)
    flag(op, "clamp", clamp)
    flag(op, "return_paths", return_paths)
    for i, m in enumerate(matrices):
        size = square(op, f"matrices[{i}]", m)
        device(op, f"matrices[{i}]", m, matrices[0].device)
        if prev and prev[i] is not None:
            dtype(op, f"previous[{i}]", prev[i], FACTOR_DTYPES)
            shape(op, f"previous[{i}]", prev[i], (size, size), f"matrices[{i}] is {size}x{size}")
            device(op, f"previous[{i}]", prev[i], matrices[0].device)
    return matrices, prev, tol, clamp


def matrices_on_one_device(op: str, name: str, matrices: Any, *, dtypes: tuple = FACTOR_DTYPES,
                           required: bool = False) -> list:
    """A list of square matrices on the device of the first (at least one when required)."""
    matrices = tensor_list(op, name, matrices)
    if required and not matrices:
        raise ValueError(f"{op}: {name} must not be empty")
    for i, m in enumerate(matrices):
        square(op, f"{name}[{i}]", m, dtypes=dtypes)
        device(op, f"{name}[{i}]", m, matrices[0].device)
    return matrices


def layer_bases(op: str, n: int, qa: Any, da: Any, qg: Any, dg: Any, where: torch.device) -> tuple:
    """Per-layer eigenbases (da, dg may be None); returns the lists and [(d_out, n_a)]."""
    qa, qg = tensor_list(op, "qa", qa, n), tensor_list(op, "qg", qg, n)
    da = None if da is None else tensor_list(op, "da", da, n)
    dg = None if dg is None else tensor_list(op, "dg", dg, n)
    dims = []
    for i in range(n):
        n_a, d_out = square(op, f"qa[{i}]", qa[i]), square(op, f"qg[{i}]", qg[i])
        device(op, f"qa[{i}]", qa[i], where)
        device(op, f"qg[{i}]", qg[i], where)
        for name, vec, size in (("da", da, n_a), ("dg", dg, d_out)):
            if vec is not None:
                dtype(op, f"{name}[{i}]", vec[i], FACTOR_DTYPES)
                shape(op, f"{name}[{i}]", vec[i], (size,))
                device(op, f"{name}[{i}]", vec[i], where)
        dims.append((d_out, n_a))
    return qa, da, qg, dg, dims


def layer_inverses(op: str, n: int, a_inv: Any, g_inv: Any, where: torch.device) -> tuple:
    a_inv, g_inv = tensor_list(op, "a_inv", a_inv, n), tensor_list(op, "g_inv", g_inv, n)
    dims = []
    for i in range(n):
        n_a, d_out = square(op, f"a_inv[{i}]", a_inv[i]), square(op, f"g_inv[{i}]", g_inv[i])
        device(op, f"a_inv[{i}]", a_inv[i], where)
        device(op, f"g_inv[{i}]", g_inv[i], where)
        dims.append((d_out, n_a))
    return a_inv, g_inv, dims


def layer_scales(op: str, scales: Any, dims: list, where: torch.device) -> list:
    scales = tensor_list(op, "scales", scales, len(dims))
    for i, (s, want) in enumerate(zip(scales, dims)):
        dtype(op, f"scales[{i}]", s, FACTOR_DTYPES)
        shape(op, f"scales[{i}]", s, want, "(d_out, n_a) of qg[i], qa[i]")
        device(op, f"scales[{i}]", s, where)
    return scales


def grads(op: str, items: list, dims: list, where: torch.device, name: str = "grads") -> None:
    for i, (g, want) in enumerate(zip(items, dims)):
        dtype(op, f"{name}[{i}]", g, INPUT_DTYPES)
        shape(op, f"{name}[{i}]", g, want, "(d_out, n_a) of the layer's factors")
        device(op, f"{name}[{i}]", g, where)


def inplace_grads(op: str, weight_grads: list, bias_grads: Any, dims: list, where: torch.device) -> tuple:
    """Weight/bias grads against (d_out, n_a); (weight_grads, present biases, has_bias): no None in a mutated list."""
    bias = tensor_list(op, "bias_grads", bias_grads, len(weight_grads), optional=True)
    for i, (w, (d_out, n_a)) in enumerate(zip(weight_grads, dims)):
        dtype(op, f"weight_grads[{i}]", w, INPUT_DTYPES)
        device(op, f"weight_grads[{i}]", w, where)
        if w.dim() < 2 or w.shape[0] != d_out:
            raise ValueError(f"{op}: weight_grads[{i}] must have shape (d_out={d_out}, ...), got {tuple(w.shape)}")
        d_in, has = w[0].numel(), bias[i] is not None
        if d_in + int(has) != n_a:
            raise ValueError(f"{op}: weight_grads[{i}] has d_in={d_in} and bias_grads[{i}] is "
                             f"{'set' if has else 'None'}, so the A-side matrices must be "
                             f"{d_in + int(has)}x{d_in + int(has)}; they are {n_a}x{n_a}")
        if has:
            dtype(op, f"bias_grads[{i}]", bias[i], INPUT_DTYPES)
            shape(op, f"bias_grads[{i}]", bias[i], (d_out,))
            device(op, f"bias_grads[{i}]", bias[i], where)
    return weight_grads, [b for b in bias if b is not None], [b is not None for b in bias]


def kl_args(op: str, lr: Any, kl_clip: Any, where: torch.device) -> tuple:
    """(lr, kl_clip) as 0-dim tensors or None; lr is required with kl_clip."""
    if kl_clip is None:
        return (None if lr is None else scalar(op, "lr", lr, where, "positive")), None
    if lr is None:
        raise ValueError(f"{op}: lr is required when kl_clip is given")
    return scalar(op, "lr", lr, where, "positive"), scalar(op, "kl_clip", kl_clip, where, "positive")


def check_ekfac_scales_(scales: Any, xs: Any, gs: Any, qa: Any, qg: Any, beta: Any, alpha: Any) -> Optional[tuple]:
    """The custom op's arguments, or None when there is no layer."""
    op = "ekfac_scales_"
    scales = tensor_list(op, "scales", scales)
    n = len(scales)
    xs, gs = tensor_list(op, "xs", xs, n), tensor_list(op, "gs", gs, n)
    if n == 0:
        return None
    where = scales[0].device
    qa, _, qg, _, dims = layer_bases(op, n, qa, None, qg, None, where)
    layer_scales(op, scales, dims, where)
    for i, ((d_out, n_a), x, g) in enumerate(zip(dims, xs, gs)):
        for name, t in (("xs", x), ("gs", g)):
            dtype(op, f"{name}[{i}]", t, INPUT_DTYPES)
            device(op, f"{name}[{i}]", t, where)
            if t.dim() not in (2, 3):
                raise ValueError(f"{op}: {name}[{i}] must be (N, d) or (N, L, d), got shape {tuple(t.shape)}")
        if x.dim() != g.dim() or x.shape[:-1] != g.shape[:-1]:
            raise ValueError(f"{op}: gs[{i}] must have the leading dims of xs[{i}] {tuple(x.shape[:-1])}, "
                             f"got {tuple(g.shape[:-1])}")
        if g.shape[-1] != d_out:
            raise ValueError(f"{op}: gs[{i}] must have last dim {d_out} (qg[{i}] is {d_out}x{d_out}), "
                             f"got {g.shape[-1]}")
        if n_a not in (x.shape[-1], x.shape[-1] + 1):
            raise ValueError(f"{op}: qa[{i}] is {n_a}x{n_a}, so xs[{i}] must have last dim {n_a} or {n_a - 1}, "
                             f"got {x.shape[-1]}")
    return scales, xs, gs, qa, qg, per_layer(op, "beta", beta, n, where), per_layer(op, "alpha", alpha, n, where)


def check_kl_clip_scale(grad_list: Any, precond_grads: Any, lr: Any, kl_clip: Any) -> tuple:
    op = "kl_clip_scale"
    grad_list = tensor_list(op, "grads", grad_list)
    nonempty(op, "grads", grad_list)
    precond = tensor_list(op, "precond_grads", precond_grads, len(grad_list))
    where = grad_list[0].device
    for i, (g, p) in enumerate(zip(grad_list, precond)):
        dtype(op, f"grads[{i}]", g, INPUT_DTYPES)
        dtype(op, f"precond_grads[{i}]", p, INPUT_DTYPES)
        device(op, f"grads[{i}]", g, where)
        device(op, f"precond_grads[{i}]", p, where)
        shape(op, f"precond_grads[{i}]", p, tuple(g.shape), f"the shape of grads[{i}]")
    lr_t, kl_t = scalar(op, "lr", lr, where, "positive"), scalar(op, "kl_clip", kl_clip, where, "positive")
    return grad_list, precond, lr_t, kl_t


def check_unpack_triangles_(factors: Any, flat: Any) -> tuple:
    op = "unpack_triangles_"
    factors = matrices_on_one_device(op, "factors", factors, dtypes=INPUT_DTYPES, required=True)
    tensor(op, "flat", flat)
    dtype(op, "flat", flat, INPUT_DTYPES)
    device(op, "flat", flat, factors[0].device)
    total = sum(f.shape[0] * (f.shape[0] + 1) // 2 for f in factors)
    if flat.dim() != 1 or flat.shape[0] != total:
        raise ValueError(f"{op}: flat must be 1-D with {total} entries (sum n(n+1)/2 of the factors), "
                         f"got shape {tuple(flat.shape)}")
    return factors, flat
