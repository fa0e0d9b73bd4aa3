"""The Jacobi eigensolver core (csrc/jacobi_core.h) run on the host through `_C`: the same
code the CUDA kernel runs, tested without a GPU against LAPACK."""
import numpy as np
import pytest

from kfac_fast import _C

SIZES = [1, 2, 3, 17, 32, 64, 65, 128]


def _orthogonal(rng, n):
    q, r = np.linalg.qr(rng.standard_normal((n, n)))
    return q * np.sign(np.diag(r))


def _case(kind, n, rng):
    if kind == "spd":
        x = rng.standard_normal((n, n + 3))
        a = x @ x.T / n
    elif kind == "rank_deficient":  # fewer rows than the dimension, as a factor of few samples
        x = rng.standard_normal((n, max(1, n // 3)))
        a = x @ x.T
    elif kind == "repeated":
        q = _orthogonal(rng, n)
        d = np.repeat([0.5, 2.0, 3.0], -(-n // 3))[:n]
        a = (q * d) @ q.T
    elif kind == "cond1e8":
        q = _orthogonal(rng, n)
        a = (q * np.logspace(-8, 0, n)) @ q.T
    else:
        raise ValueError(kind)
    a = (a + a.T) / 2
    # fp32 inputs, as the factors are: both solvers see the same rounded matrix
    return a.astype(np.float32).astype(np.float64)


def _residual(a, d, q):
    return np.linalg.norm(a @ q - q * d) / np.linalg.norm(a)


@pytest.mark.parametrize("kind", ["spd", "rank_deficient", "repeated", "cond1e8"])
@pytest.mark.parametrize("n", SIZES)
def test_matches_lapack_invariants(kind, n):
    rng = np.random.default_rng(1000 * n + len(kind))
    a = _case(kind, n, rng)
    d, q, converged, sweeps = _C.jacobi_eigh_host(a[None])
    d, q = d[0], q[0]
    assert converged[0] and 0 <= sweeps[0] <= _C.JACOBI_MAX_SWEEPS
    d32, q32 = np.linalg.eigh(a.astype(np.float32))
    lapack_res = _residual(a, d32.astype(np.float64), q32.astype(np.float64))
    assert _residual(a, d, q) <= max(2 * lapack_res, 1e-5)
    assert np.linalg.norm(q.T @ q - np.eye(n)) <= 1e-6
    assert np.all(np.diff(d) >= 0)
    ref = np.linalg.eigvalsh(a)
    assert np.max(np.abs(d - ref)) <= 1e-12 * max(1.0, np.max(np.abs(ref))) * n


def test_batch_and_float32_input():
    rng = np.random.default_rng(7)
    mats = np.stack([_case("spd", 33, rng) for _ in range(3)]).astype(np.float32)
    d, q, converged, _ = _C.jacobi_eigh_host(mats)
    assert d.shape == (3, 33) and q.shape == (3, 33, 33) and converged.all()
    for k in range(3):
        assert _residual(mats[k].astype(np.float64), d[k], q[k]) < 1e-12


def test_symmetrises_input():
    rng = np.random.default_rng(3)
    a = _case("spd", 9, rng)
    skew = rng.standard_normal((9, 9)) * 1e-3
    d, _, _, _ = _C.jacobi_eigh_host((a + skew - skew.T)[None])
    np.testing.assert_allclose(d[0], np.linalg.eigvalsh(a), rtol=0, atol=1e-12)


def test_diagonal_needs_no_sweep_and_nan_never_converges():
    d, q, converged, sweeps = _C.jacobi_eigh_host(np.diag([3.0, 1.0, 2.0])[None])
    assert converged[0] and sweeps[0] == 0
    np.testing.assert_array_equal(d[0], [1.0, 2.0, 3.0])
    np.testing.assert_array_equal(np.abs(q[0]), np.eye(3)[:, [1, 2, 0]])
    bad = np.eye(4)
    bad[1, 2] = bad[2, 1] = np.nan
    _, _, converged, _ = _C.jacobi_eigh_host(bad[None])
    assert not converged[0]  # the caller retries such matrices with torch


def test_max_sweeps_reports_unconverged():
    a = _case("spd", 40, np.random.default_rng(5))
    _, _, converged, sweeps = _C.jacobi_eigh_host(a[None], max_sweeps=1)
    assert not converged[0] and sweeps[0] == 1


@pytest.mark.parametrize("bad", [np.zeros((2, 3, 4)), np.zeros((1, 129, 129)), np.zeros((1, 0, 0))])
def test_rejects_bad_shapes(bad):
    with pytest.raises(ValueError, match="jacobi_eigh_host"):
        _C.jacobi_eigh_host(bad)


def test_plan_fits_sm80_and_sm90_for_every_size():
    # Opt-in dynamic shared memory per block: sm_80 163 KiB, sm_90 227 KiB.
    for limit in (163 * 1024, 227 * 1024):
        for n in range(1, _C.JACOBI_MAX_N + 1):
            plan = _C.jacobi_plan(n, limit)
            assert plan["fits"] and plan["smem_bytes"] <= limit, (n, limit, plan)
            assert plan["threads"] % 32 == 0 and 64 <= plan["threads"] <= 512
            assert (plan["workspace_doubles"] == 0) == plan["vt_in_smem"]
    assert not _C.jacobi_plan(128, 100 * 1024)["fits"]


# ---------------------------------------------------------------------------------------
# Non-finite inputs (issue 17, defect 2). The host build fills its scratch with garbage
# (a NaN for doubles, an index far outside [0, n) for ints), as shared memory is on the
# GPU: a perm slot the eigenvalue order never writes makes jacobi_eigh_host raise.
# ---------------------------------------------------------------------------------------
def _nan_cases(rng, n):
    spd = _case("spd", n, rng)
    diag_nan = spd.copy()
    diag_nan[n // 2, n // 2] = np.nan
    all_nan = np.full((n, n), np.nan)
    inf = spd.copy()
    inf[0, -1] = inf[-1, 0] = np.inf
    return {"nan_diagonal": diag_nan, "all_nan": all_nan, "inf_offdiagonal": inf}


@pytest.mark.parametrize("n", [1, 3, 17, 65, 128])
@pytest.mark.parametrize("kind", ["nan_diagonal", "all_nan", "inf_offdiagonal"])
def test_non_finite_input_is_reported_and_order_stays_a_permutation(kind, n):
    rng = np.random.default_rng(n)
    bad = _nan_cases(rng, n)[kind]
    good = _case("spd", n, rng)
    d, q, converged, sweeps, status = _C.jacobi_eigh_host(np.stack([good, bad, good]), with_status=True)
    assert list(status) == [1, -1, 1] and list(converged) == [True, False, True]
    assert sweeps[1] == 0  # stops before any rotation
    # The finite neighbours in the same batch are untouched by the bad matrix.
    np.testing.assert_allclose(d[0], np.linalg.eigvalsh(good), rtol=0, atol=1e-10 * n)
    np.testing.assert_array_equal(d[0], d[2])


def test_nan_diagonal_orders_nan_last_and_keeps_every_column():
    a = np.diag([3.0, np.nan, 1.0, np.nan, 2.0])
    d, q, _, _, status = _C.jacobi_eigh_host(a[None], with_status=True)
    assert status[0] == -1
    np.testing.assert_array_equal(d[0, :3], [1.0, 2.0, 3.0])
    assert np.isnan(d[0, 3:]).all()
    # No rotation ran: the eigenvectors are the identity's columns in the order above,
    # NaN indices by position (1 before 3): each column exactly once.
    np.testing.assert_array_equal(q[0], np.eye(5)[:, [2, 4, 0, 1, 3]])


def test_status_of_finite_unconverged_is_zero():
    a = _case("spd", 40, np.random.default_rng(5))
    _, _, converged, _, status = _C.jacobi_eigh_host(a[None], max_sweeps=1, with_status=True)
    assert not converged[0] and status[0] == 0
