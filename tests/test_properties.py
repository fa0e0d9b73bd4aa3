"""Property-based checks of the op API: any argument either raises a clear
ValueError/TypeError or gives the float64 reference result; hard factor spectra never
give NaN from eigh, damped_inverse, preconditioning or the solver fallbacks."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kfac_fast import health, ops

SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
SCALARS = st.sampled_from([0.0, 1.0, -1.0, 0.5, 1e-30, 3e5, float("nan"), float("inf"), float("-inf")])
FACTOR_DTYPES = st.sampled_from([torch.float32, torch.float64])
INPUT_DTYPES = st.sampled_from([torch.float32, torch.float64, torch.float16, torch.bfloat16])


def tol(dtype):
    return {torch.float64: 1e-10, torch.float32: 1e-4}[dtype]


def close(got, want, dtype, scale):
    """Relative closeness, measured against the size of the terms that were summed."""
    err = (got.double() - want).abs().max().item() if want.numel() else 0.0
    assert err <= tol(dtype) * max(scale, 1e-300), (err, scale)


@st.composite
def factor_case(draw):
    d = draw(st.integers(0, 6))
    ones = draw(st.booleans())
    rows = draw(st.integers(0, 5))
    fdt, xdt = draw(FACTOR_DTYPES), draw(INPUT_DTYPES)
    g = torch.Generator().manual_seed(draw(st.integers(0, 2 ** 16)))
    x = torch.randn(d, rows, generator=g).to(xdt)
    if draw(st.booleans()):
        x = x.mT  # non-contiguous (rows, d)
    else:
        x = x.reshape(rows, d) if x.numel() else torch.zeros(rows, d, dtype=xdt)
    n = d + int(ones)
    factor = torch.randn(n, n, generator=g, dtype=fdt)
    factor = (factor + factor.mT).contiguous()
    return factor, x, ones, draw(SCALARS), draw(SCALARS)


@SETTINGS
@given(factor_case())
def test_update_factor_raises_or_matches_reference(case):
    factor, x, ones, beta, alpha = case
    old = factor.double().clone()  # .double() of a float64 tensor is the tensor itself
    if not (math.isfinite(beta) and math.isfinite(alpha)):
        with pytest.raises(ValueError, match="beta|alpha"):
            ops.update_factor_(factor, x, beta, alpha, append_ones=ones)
        assert torch.equal(factor.double(), old)  # nothing written before the error
        return
    ops.update_factor_(factor, x, beta, alpha, append_ones=ones)
    rows = x.to(factor.dtype).double()
    if ones:
        rows = torch.cat([rows, rows.new_ones(rows.shape[0], 1)], 1)
    want = beta * old + alpha * rows.mT @ rows
    scale = abs(beta) * old.abs().max().item() if old.numel() else 0.0
    scale += abs(alpha) * (rows.abs().max().item() ** 2 * max(rows.shape[0], 1) if rows.numel() else 0.0)
    close(factor, want, factor.dtype, scale)


@SETTINGS
@given(st.integers(1, 5), st.integers(0, 4), st.sampled_from([float("nan"), float("inf")]),
       st.sampled_from(["python", "tensor"]))
def test_zero_alpha_never_lets_nonfinite_rows_in(n, rows, bad, kind):
    factor = torch.eye(n)
    x = torch.full((rows, n), bad)
    alpha = 0.0 if kind == "python" else torch.zeros(())
    ops.update_factors_([factor], [x], [1.0], [alpha])
    assert torch.equal(factor, torch.eye(n))


@SETTINGS
@given(st.integers(1, 5), st.integers(1, 3), SCALARS, FACTOR_DTYPES)
def test_damped_inverse_raises_or_inverts(n, count, damping, dtype):
    g = torch.Generator().manual_seed(n * 7 + count)
    ms = []
    for _ in range(count):
        b = torch.randn(n, n, generator=g, dtype=torch.float64)
        ms.append((b @ b.mT / n).to(dtype))
    if not (math.isfinite(damping) and damping >= 0):
        with pytest.raises(ValueError, match="damping"):
            ops.damped_inverse(ms, damping)
        return
    if damping == 0 or damping < 1e-6:  # singular in fp32 up to rounding: only finiteness is promised
        damping = damping + 1e-3
    for m, inv in zip(ms, ops.damped_inverse(ms, damping)):
        want = torch.linalg.inv(m.double() + damping * torch.eye(n, dtype=torch.float64))
        cond = torch.linalg.cond(m.double() + damping * torch.eye(n, dtype=torch.float64)).item()
        close(inv, want, dtype, want.abs().max().item() * cond)


@SETTINGS
@given(st.integers(1, 4), st.integers(1, 4), st.booleans(), SCALARS, FACTOR_DTYPES)
def test_precondition_eigen_raises_or_matches_dense_oracle(d_in, d_out, bias, damping, dtype):
    g = torch.Generator().manual_seed(d_in * 31 + d_out)
    n_a = d_in + int(bias)
    a = torch.randn(n_a, n_a, generator=g, dtype=torch.float64)
    gg = torch.randn(d_out, d_out, generator=g, dtype=torch.float64)
    A, G = a @ a.mT, gg @ gg.mT
    da, qa = torch.linalg.eigh(A)
    dg, qg = torch.linalg.eigh(G)
    grad = torch.randn(d_out, n_a, generator=g, dtype=torch.float64)
    args = [[grad.to(dtype)], [qa.to(dtype)], [da.to(dtype)], [qg.to(dtype)], [dg.to(dtype)]]
    if not (math.isfinite(damping) and damping >= 0):
        with pytest.raises(ValueError, match="damping"):
            ops.precondition_eigen(*args, damping)
        return
    damping = max(damping, 1e-2)  # the dense oracle needs a well-posed solve
    if damping > 1e4:
        damping = 1e4
    (p,) = ops.precondition_eigen(*args, damping)
    K = torch.kron(A, G) + damping * torch.eye(n_a * d_out, dtype=torch.float64)
    want = torch.linalg.solve(K, grad.mT.reshape(-1)).reshape(n_a, d_out).mT
    close(p, want, dtype, want.abs().max().item() * torch.linalg.cond(K).item())


@SETTINGS
@given(st.sampled_from(["eigh", "damped_inverse", "precondition_eigen", "update_factor_"]),
       st.sampled_from(["int", "list", "3d", "wrong_n", "string", "bool_scalar", "device_scalar_shape"]))
def test_bad_arguments_raise_clear_errors(op, bad):
    m = torch.eye(3)
    cases = {
        "int": lambda: torch.eye(3, dtype=torch.int64),
        "list": lambda: [[1.0, 0.0], [0.0, 1.0]],
        "3d": lambda: torch.ones(2, 3, 3),
        "wrong_n": lambda: torch.ones(3, 2),
        "string": lambda: "matrix",
        "bool_scalar": lambda: True,
        "device_scalar_shape": lambda: torch.ones(2),
    }
    value = cases[bad]()
    with pytest.raises((ValueError, TypeError)) as info:
        if op == "eigh":
            ops.eigh([value] if bad not in ("bool_scalar", "device_scalar_shape") else value)
        elif op == "damped_inverse":
            ops.damped_inverse([m], value) if bad in ("bool_scalar", "device_scalar_shape", "string") \
                else ops.damped_inverse([value], 1e-3)
        elif op == "precondition_eigen":
            ops.precondition_eigen([torch.ones(3, 3)], [m], [torch.ones(3)], [m], [torch.ones(3)], value) \
                if bad in ("bool_scalar", "device_scalar_shape", "string") \
                else ops.precondition_eigen([value], [m], [torch.ones(3)], [m], [torch.ones(3)], 1e-3)
        else:
            ops.update_factor_(m.clone(), torch.ones(2, 3), value, 1.0) \
                if bad in ("bool_scalar", "device_scalar_shape", "string") \
                else ops.update_factor_(value, torch.ones(2, 3), 1.0, 1.0)
    assert op in str(info.value)  # the message names the op (and so where to look)


# ---------------------------------------------------------------------------------------
# factor spectra
# ---------------------------------------------------------------------------------------
@st.composite
def spectrum_case(draw):
    n = draw(st.integers(1, 12))
    rank = draw(st.integers(0, n))
    scale = 10.0 ** draw(st.integers(-30, 30))
    log_cond = draw(st.integers(0, 16))
    dtype = draw(FACTOR_DTYPES)
    g = torch.Generator().manual_seed(draw(st.integers(0, 2 ** 16)))
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    vals = torch.zeros(n, dtype=torch.float64)
    if rank:
        vals[:rank] = scale * torch.logspace(0, -log_cond, rank, dtype=torch.float64)
    m = (q * vals) @ q.mT
    return ((m + m.mT) / 2).to(dtype), scale


@settings(max_examples=60, deadline=None)
@given(spectrum_case())
def test_hard_spectra_never_give_nan(case):
    m, scale = case
    vals, vecs = ops.eigh([m])
    assert torch.isfinite(vals[0]).all() and torch.isfinite(vecs[0]).all()
    assert (vals[0] >= 0).all()
    n = m.shape[0]
    ortho = (vecs[0].double().mT @ vecs[0].double() - torch.eye(n, dtype=torch.float64)).norm().item()
    assert ortho <= 1e-3 * n
    damping = 1e-3
    inv = ops.damped_inverse([m], damping)[0]
    assert torch.isfinite(inv).all()
    grad = torch.ones(n, n, dtype=m.dtype)
    (p,) = ops.precondition_eigen([grad], vecs, vals, vecs, vals, damping)
    assert torch.isfinite(p).all()
    h = health.Health()
    hv, hq, _ = h.solve_eigh([m], [None])  # (vals, vecs, paths)
    assert torch.isfinite(hv[0]).all() and torch.isfinite(hq[0]).all()
    assert torch.isfinite(h.solve_inverse([m], [damping], [None])[0]).all()
