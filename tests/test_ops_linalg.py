"""eigh, damped_inverse, pi_damping: invariants, fallbacks, float64 oracles."""
import pytest
import torch

from kfac_fast import ops
from kfac_fast.backends import reference
from tests._oracle import assert_error_rule, f64, generator, random_orthogonal, random_spd


def _check_eigen(m, d, q, *, clamp=True):
    """Residual ||MQ - Q diag(d)||/||M|| and ||Q^T Q - I|| against a dtype-scaled bound."""
    n = m.shape[0]
    eps = torch.finfo(m.dtype).eps
    m64, d64, q64 = f64(m), f64(d), f64(q)
    assert d.dtype == m.dtype and q.dtype == m.dtype
    assert d.shape == (n,) and q.shape == (n, n)
    assert bool(torch.isfinite(d).all()) and bool(torch.isfinite(q).all())
    assert bool((d[1:] >= d[:-1]).all()), "eigenvalues must be ascending"
    if clamp:
        assert bool((d >= 0).all())
    resid = torch.linalg.matrix_norm(m64 @ q64 - q64 * d64) / torch.linalg.matrix_norm(m64).clamp(min=1e-300)
    orth = torch.linalg.matrix_norm(q64.mT @ q64 - torch.eye(n, dtype=torch.float64))
    # clamping moves a tiny negative eigenvalue to 0: the residual bound absorbs it
    assert float(resid) <= 50 * n * eps, f"residual {float(resid):.2e} for n={n}"
    assert float(orth) <= 50 * n * eps, f"orthogonality {float(orth):.2e} for n={n}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_eigh_mixed_sizes_invariants(dtype):
    gen = generator(1)
    sizes = [1, 3, 17, 3, 64, 17, 2]
    ms = [random_spd(n, dtype=dtype, gen=gen) for n in sizes]
    vals, vecs = ops.eigh(ms)
    assert len(vals) == len(vecs) == len(sizes)
    for m, d, q in zip(ms, vals, vecs):
        _check_eigen(m, d, q)
        expected = torch.linalg.eigvalsh(f64(m))
        assert_error_rule(d, expected, torch.linalg.eigvalsh(m.float()), "eigenvalues")


def test_eigh_rank_deficient_and_clamp():
    gen = generator(2)
    ms = [random_spd(n, rank=r, dtype=torch.float32, gen=gen) for n, r in ((17, 3), (33, 1), (5, 0))]
    vals, vecs = ops.eigh(ms)
    for m, d, q in zip(ms, vals, vecs):
        _check_eigen(m, d, q)
    raw, _ = ops.eigh(ms, clamp=False)
    for d_clamped, d_raw in zip(vals, raw):
        torch.testing.assert_close(d_clamped, d_raw.clamp(min=0))


def test_eigh_indefinite_without_clamp_keeps_negative_eigenvalues():
    gen = generator(3)
    m = random_spd(9, dtype=torch.float64, gen=gen) - 2.0 * torch.eye(9, dtype=torch.float64)
    d, q = ops.eigh([m], clamp=False)
    assert float(d[0][0]) < 0
    _check_eigen(m, d[0], q[0], clamp=False)


@pytest.mark.parametrize("failure", ["raise", "nan"])
def test_eigh_float64_retry(monkeypatch, failure):
    real = torch.linalg.eigh
    calls = []

    def flaky(a, *args, **kwargs):
        calls.append(a.dtype)
        if a.dtype == torch.float32:
            if failure == "raise":
                raise torch.linalg.LinAlgError("simulated fp32 failure")
            d, q = real(a, *args, **kwargs)
            return d, torch.full_like(q, float("nan"))
        return real(a, *args, **kwargs)

    monkeypatch.setattr(torch.linalg, "eigh", flaky)
    gen = generator(4)
    ms = [random_spd(n, dtype=torch.float32, gen=gen) for n in (4, 4, 7)]
    vals, vecs = ops.eigh(ms)
    assert torch.float64 in calls
    for m, d, q in zip(ms, vals, vecs):
        _check_eigen(m, d, q)


def test_eigh_nonfinite_input_raises():
    m = random_spd(4, dtype=torch.float32, gen=generator(5))
    m[1, 2] = m[2, 1] = float("nan")
    with pytest.raises((ValueError, RuntimeError), match="matrices"):
        ops.eigh([m])


def test_eigh_hard_spectrum_never_nan():
    # eigenvalues spread over 30 orders of magnitude, clustered pairs
    n = 40
    q = random_orthogonal(n, gen=generator(6))
    d = torch.logspace(-15, 15, n, dtype=torch.float64)
    d[::2] = d[1::2]
    m = (q * d) @ q.mT
    m = ((m + m.mT) / 2).float()
    vals, vecs = ops.eigh([m])
    assert bool(torch.isfinite(vals[0]).all()) and bool(torch.isfinite(vecs[0]).all())


def test_eigh_warm_refresh():
    gen = generator(7)
    ms = [random_spd(n, dtype=torch.float64, gen=gen) for n in (6, 11)]
    vals, vecs = ops.eigh(ms)
    # exact previous basis with permuted columns: accepted, re-sorted
    perm = [torch.randperm(q.shape[0], generator=gen) for q in vecs]
    prev = [q[:, p] for q, p in zip(vecs, perm)]
    d2, q2 = ops.eigh(ms, previous=prev, tol=1e-8)
    for m, d, q, d_ref in zip(ms, d2, q2, vals):
        _check_eigen(m, d, q)
        torch.testing.assert_close(d, d_ref)
    # a useless previous basis (and a None entry): full solve still meets tol
    bad = [random_orthogonal(6, gen=gen), None]
    d3, q3 = ops.eigh(ms, previous=bad, tol=1e-8)
    for m, d, q in zip(ms, d3, q3):
        _check_eigen(m, d, q)
        b = f64(q).mT @ f64(m) @ f64(q)
        off = b - torch.diag(torch.diagonal(b))
        assert float(torch.linalg.matrix_norm(off) / torch.linalg.matrix_norm(f64(m))) <= 1e-8


def test_eigh_return_paths():
    gen = generator(8)
    ms = [random_spd(n, dtype=torch.float64, gen=gen) for n in (6, 11, 4)]
    assert ops.EIGH_PATHS == ("kept", "refined", "full")
    full = ops.EIGH_PATHS.index("full")
    # a cold solve: every matrix "full", and the same results as without return_paths
    vals, vecs, paths = ops.eigh(ms, return_paths=True)
    assert paths.dtype == torch.int64 and paths.device.type == "cpu"
    assert paths.tolist() == [full] * 3
    for d, d_ref in zip(vals, ops.eigh(ms)[0]):
        torch.testing.assert_close(d, d_ref, rtol=0, atol=0)
    # warm: an exact basis is kept, a useless one or None is solved in full
    prev = [vecs[0], random_orthogonal(11, gen=gen), None]
    d2, q2, paths = ops.eigh(ms, previous=prev, tol=1e-8, return_paths=True)
    assert paths.tolist() == [ops.EIGH_PATHS.index("kept"), full, full]
    d_plain, _ = ops.eigh(ms, previous=prev, tol=1e-8)
    for m, d, q, d_ref in zip(ms, d2, q2, d_plain):
        _check_eigen(m, d, q)
        torch.testing.assert_close(d, d_ref, rtol=0, atol=0)
    assert ops.eigh([], return_paths=True)[2].tolist() == []
    with pytest.raises(TypeError, match="return_paths must be a bool"):
        ops.eigh(ms, return_paths=1)


@pytest.mark.parametrize("damping", [0.1, [1e-3, 0.5, 2.0, 1e-2]])
def test_damped_inverse_matches_float64(damping):
    gen = generator(8)
    ms = [random_spd(n, dtype=torch.float32, gen=gen) for n in (3, 17, 3, 1)]
    damps = damping if isinstance(damping, list) else [damping] * len(ms)
    out = ops.damped_inverse(ms, damping)
    for m, inv, lam in zip(ms, out, damps):
        eye = torch.eye(m.shape[0])
        expected = torch.linalg.inv(f64(m) + lam * eye.double())
        baseline = torch.linalg.inv(m + lam * eye)
        assert inv.dtype == torch.float32 and inv.shape == m.shape
        assert_error_rule(inv, expected, baseline)


def test_damped_inverse_singular_and_fallback(monkeypatch):
    gen = generator(9)
    ms = [random_spd(12, rank=2, dtype=torch.float32, gen=gen), random_spd(5, dtype=torch.float32, gen=gen)]
    ms[0] = ms[0] + 1e-7 * torch.randn(12, 12, generator=gen)  # slightly asymmetric
    out = ops.damped_inverse(ms, torch.tensor([1e-4, 1e-2]))
    for inv in out:
        assert bool(torch.isfinite(inv).all())
    # force the batched Cholesky to fail: the fallback chain must still give the inverse
    real = torch.linalg.cholesky_ex

    def failing(a, *args, **kwargs):
        chol, info = real(a, *args, **kwargs)
        return chol, torch.ones_like(info) if a.dim() == 3 else info

    monkeypatch.setattr(torch.linalg, "cholesky_ex", failing)
    m = random_spd(7, dtype=torch.float64, gen=gen)
    inv = ops.damped_inverse([m], 0.3)[0]
    torch.testing.assert_close(inv, torch.linalg.inv(m + 0.3 * torch.eye(7, dtype=torch.float64)))


def test_damped_inverse_eigh_last_resort(monkeypatch):
    real = torch.linalg.cholesky_ex
    monkeypatch.setattr(torch.linalg, "cholesky_ex",
                        lambda a, *args, **kw: (real(a)[0], torch.ones_like(real(a)[1])))
    m = random_spd(6, dtype=torch.float64, gen=generator(10))
    inv = ops.damped_inverse([m], 0.2)[0]
    torch.testing.assert_close(inv, torch.linalg.inv(m + 0.2 * torch.eye(6, dtype=torch.float64)))


def test_pi_damping_formula():
    gen = generator(11)
    a = random_spd(7, dtype=torch.float32, gen=gen) * 3
    g = random_spd(4, dtype=torch.float32, gen=gen)
    da, dg = ops.pi_damping(a, g, 0.01)
    pi = torch.sqrt((torch.trace(f64(a)) / 7) / (torch.trace(f64(g)) / 4))
    assert da.shape == () and da.dtype == torch.float32
    torch.testing.assert_close(f64(da), pi * 0.1)
    torch.testing.assert_close(f64(dg), 0.1 / pi)
    da2, dg2 = ops.pi_damping(a, g, torch.tensor(0.01))
    torch.testing.assert_close(da2, da)
    torch.testing.assert_close(dg2, dg)


@pytest.mark.parametrize("bad", ["zero", "negative", "nan"])
def test_pi_damping_unusable_trace_gives_pi_one(bad):
    a = random_spd(5, dtype=torch.float64, gen=generator(12))
    g = {"zero": torch.zeros(3, 3), "negative": -torch.eye(3),
         "nan": torch.full((3, 3), float("nan"))}[bad].double()
    da, dg = ops.pi_damping(a, g, 0.04)
    torch.testing.assert_close(da, torch.tensor(0.2, dtype=torch.float64))
    torch.testing.assert_close(dg, torch.tensor(0.2, dtype=torch.float64))


def test_reference_accepts_plain_numbers():
    # tests call reference directly on float64 copies with Python scalars
    m = random_spd(4, dtype=torch.float64, gen=generator(13))
    inv = reference.damped_inverse([m], 0.5)[0]
    torch.testing.assert_close(inv, torch.linalg.inv(m + 0.5 * torch.eye(4, dtype=torch.float64)))


@pytest.mark.parametrize("backend", ["reference", "cuda"])
def test_eigh_outputs_never_share_storage(backend):
    # torch's custom-op check refuses outputs that alias one another: seen on an H200, where
    # the CUDA backend returned views of one stack for a CNN's two same-sized factors. Its
    # torch path (n <= 32) runs on the CPU too, so the CPU can check the bucketing.
    from kfac_fast.backends import cuda

    gen = generator(12)
    mats = [random_spd(n, dtype=torch.float32, gen=gen) for n in (6, 6, 6, 9)]
    solve = reference.eigh if backend == "reference" else cuda._cold_eigh
    vals, vecs = solve(mats)
    storages = [t.untyped_storage().data_ptr() for t in (*vals, *vecs)]
    assert len(set(storages)) == len(storages)
    for m, d, q in zip(mats, vals, vecs):
        assert q.is_contiguous()
        torch.testing.assert_close(f64(q) * f64(d) @ f64(q).mT, f64(m), rtol=0, atol=1e-5)
