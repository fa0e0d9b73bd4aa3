"""The CUDA kernels of `_C` (through kfac_fast.backends.cuda) against LAPACK and the reference ops.

GPU only: every test skips without CUDA, and nothing here touches CUDA at import time.
"""
import math

import numpy as np
import pytest
import torch

from kfac_fast.backends import reference

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

SIZES = [1, 2, 3, 17, 32, 33, 64, 65, 96, 128]
KINDS = ["spd", "rank_deficient", "repeated", "cond1e8"]


@pytest.fixture(scope="module")
def cuda():
    from kfac_fast import _C
    from kfac_fast.backends import cuda as _cuda

    if not _C.build_info()["cuda"]:
        pytest.skip("kfac_fast._C was built without CUDA")
    return _cuda


def _case(kind, n, gen):
    if kind == "spd":
        x = torch.randn(n, n + 3, dtype=torch.float64, generator=gen)
        a = x @ x.T / n
    elif kind == "rank_deficient":
        x = torch.randn(n, max(1, n // 3), dtype=torch.float64, generator=gen)
        a = x @ x.T
    else:
        q, _ = torch.linalg.qr(torch.randn(n, n, dtype=torch.float64, generator=gen))
        d = (torch.tensor([0.5, 2.0, 3.0], dtype=torch.float64).repeat(n)[:n] if kind == "repeated"
             else torch.logspace(-8, 0, n, dtype=torch.float64))
        a = (q * d) @ q.T
    return (a + a.T) / 2


def _residual(a, d, q):
    return float(torch.linalg.norm(a @ q - q * d) / torch.linalg.norm(a))


def _orth(q):
    return float(torch.linalg.norm(q.mT @ q - torch.eye(q.shape[-1], dtype=q.dtype, device=q.device)))


# ----------------------------------------------------------------------------- Jacobi
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n", SIZES)
def test_jacobi_kernel_invariants(cuda, n, dtype):
    gen = torch.Generator().manual_seed(n)
    mats = torch.stack([_case(k, n, gen) for k in KINDS]).to(dtype)  # rounded once
    vals, vecs, info = cuda.jacobi_eigh_stack(mats.cuda())
    torch.cuda.synchronize()
    assert bool((info[:, 0] == 1).all()), info
    for b in range(len(KINDS)):
        a = mats[b].double()
        d, q = vals[b].cpu().double(), vecs[b].cpu().double()
        d32, q32 = torch.linalg.eigh(mats[b].float())
        bound = max(2 * _residual(a, d32.double(), q32.double()), 1e-5)
        assert _residual(a, d, q) <= bound, (KINDS[b], _residual(a, d, q), bound)
        assert _orth(q) <= (1e-6 if dtype == torch.float64 else 2e-5 * math.sqrt(n)), KINDS[b]
        assert bool((d[1:] >= d[:-1]).all())


def test_jacobi_kernel_matches_host_core(cuda):
    from kfac_fast import _C

    gen = torch.Generator().manual_seed(11)
    mats = torch.stack([_case("spd", 65, gen) for _ in range(5)])
    d_dev, _, info = cuda.jacobi_eigh_stack(mats.cuda())
    d_host, _, conv, sweeps = _C.jacobi_eigh_host(mats.numpy())
    assert conv.all()
    np.testing.assert_allclose(d_dev.cpu().numpy(), d_host, rtol=0, atol=1e-12 * float(d_host.max()))
    # The same algorithm: sweep counts agree up to rounding deciding one extra sweep.
    assert np.all(np.abs(info[:, 1].cpu().numpy() - sweeps) <= 1)


def test_jacobi_kernel_large_batch_global_workspace_and_side_stream(cuda):
    gen = torch.Generator().manual_seed(5)
    mats = torch.stack([_case("spd", 128, gen) for _ in range(4)]).repeat(128, 1, 1).float().cuda()
    stream = torch.cuda.Stream()
    # mats was written on the current stream: the side stream must wait for it (issue 17,
    # defect 10), and the allocator must not reuse it while the side stream reads.
    stream.wait_stream(torch.cuda.current_stream())
    mats.record_stream(stream)
    with torch.cuda.stream(stream):
        vals, vecs, info = cuda.jacobi_eigh_stack(mats)
    stream.synchronize()
    assert bool((info[:, 0] == 1).all())
    a = mats.double()
    res = torch.linalg.norm(a @ vecs.double() - vecs.double() * vals.double()[:, None, :], dim=(1, 2))
    assert float((res / torch.linalg.norm(a, dim=(1, 2))).max()) < 1e-5


def test_jacobi_kernel_reports_unconverged(cuda):
    gen = torch.Generator().manual_seed(2)
    mats = torch.stack([_case("spd", 40, gen), torch.eye(40, dtype=torch.float64)]).cuda()
    _, _, info = cuda.jacobi_eigh_stack(mats, max_sweeps=1)
    assert info.cpu().tolist() == [[0, 1], [1, 0]]


def test_jacobi_kernel_rejects_bad_arguments(cuda):
    from kfac_fast import _C

    x = torch.zeros(2, 8, 8, device="cuda")
    out = torch.empty(2, 8, device="cuda")
    with pytest.raises(ValueError, match="n must be in"):
        cuda.jacobi_eigh_stack(torch.zeros(1, 129, 129, device="cuda"))
    with pytest.raises(RuntimeError, match="vals is not 4-byte aligned"):
        _C.jacobi_eigh_cuda(4, x.data_ptr(), out.data_ptr() + 2, x.data_ptr(), 0,
                            out.data_ptr(), 2, 8, 1e-12, 10, 0)
    with pytest.raises(RuntimeError, match="in is not device memory"):
        host = torch.zeros(2, 8, 8)
        _C.jacobi_eigh_cuda(4, host.data_ptr(), out.data_ptr(), x.data_ptr(), 0,
                            out.data_ptr(), 2, 8, 1e-12, 10, 0)


def test_eigh_op_mixed_sizes_against_reference(cuda):
    gen = torch.Generator().manual_seed(3)
    sizes = [3, 17, 33, 65, 65, 128, 130]
    mats = [_case("spd", n, gen).float().cuda() for n in sizes]
    vals, vecs = cuda.eigh(mats)
    ref_vals, _ = reference.eigh([m.double().cpu() for m in mats])
    for m, d, q, rd in zip(mats, vals, vecs, ref_vals):
        assert d.dtype == m.dtype and q.shape == m.shape
        a = m.double().cpu()
        # The error rule: at most twice torch's own fp32 error on this device, floor 1e-6.
        td, tq = torch.linalg.eigh(m)
        ours = _residual(a, d.double().cpu(), q.double().cpu())
        torchs = _residual(a, td.double().cpu(), tq.double().cpu())
        print(f"n={m.shape[0]}: residual {ours:.2e}, torch.linalg.eigh {torchs:.2e}")
        assert ours <= max(2 * torchs, 1e-6), f"n={m.shape[0]}: residual {ours:.2e} > 2 x torch's {torchs:.2e}"
        # H200: torch's own fp32 vectors are far from orthogonal above n = 64 (4.4e-4 at n = 130)
        orth, torch_orth = _orth(q.double().cpu()), _orth(tq.double().cpu())
        assert orth <= max(2 * torch_orth, 1e-5), f"n={m.shape[0]}: orthogonality {orth:.2e} vs torch {torch_orth:.2e}"
        torch.testing.assert_close(d.double().cpu(), rd, rtol=0, atol=1e-5 * float(rd.abs().max()))


def test_eigh_op_with_repeated_sizes_through_dispatch(cuda):
    # Through the custom op, whose check refuses outputs aliasing one another: same-sized
    # matrices share a bucket (seen failing on an H200 with a CNN's factors).
    from kfac_fast import ops

    gen = torch.Generator().manual_seed(4)
    mats = [_case("spd", n, gen).float().cuda() for n in (20, 20, 65, 65, 130, 130)]
    vals, vecs = ops.eigh(mats)
    for m, d, q in zip(mats, vals, vecs):
        assert _residual(m.double().cpu(), d.double().cpu(), q.double().cpu()) < 1e-4


def test_eigh_op_retries_unconverged_in_float64(cuda, monkeypatch):
    raw = cuda.jacobi_eigh_stack
    monkeypatch.setattr(cuda, "jacobi_eigh_stack", lambda stack: raw(stack, max_sweeps=1))
    gen = torch.Generator().manual_seed(4)
    m = _case("cond1e8", 50, gen).float().cuda()
    (d,), (q,) = cuda.eigh([m], clamp=False)
    a = m.double().cpu()
    assert _residual(a, d.double().cpu(), q.double().cpu()) < 1e-6


def test_eigh_op_non_finite_input_raises(cuda):
    m = torch.eye(40, device="cuda")
    m[3, 4] = m[4, 3] = float("nan")
    with pytest.raises(ValueError, match="not finite"):
        cuda.eigh([m])


def test_eigh_op_clamps(cuda):
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(40, 40, dtype=torch.float64, generator=gen)
    (d,), _ = cuda.eigh([((x + x.T) / 2).cuda()])
    assert float(d.min()) == 0.0


# ----------------------------------------------------------------------------- eigen scale
def _layers(gen, shapes, dtype, bias=True):
    layers = []
    for d_out, d_in in shapes:
        n_a = d_in + bias
        a = _case("spd", n_a, gen)
        g = _case("rank_deficient", d_out, gen)
        da, qa = torch.linalg.eigh(a)
        dg, qg = torch.linalg.eigh(g)
        w = torch.randn(d_out, d_in, dtype=torch.float64, generator=gen)
        b = torch.randn(d_out, dtype=torch.float64, generator=gen) if bias else None
        layers.append(dict(qa=qa, da=da, qg=qg, dg=dg, w=w, b=b))
    return [{k: None if v is None else v.to(dtype).cuda() for k, v in lay.items()} for lay in layers]


def test_eigen_scale_kernel_writes_r_over_many_layers(cuda):
    from kfac_fast import _C

    gen = torch.Generator().manual_seed(8)
    shapes = [(3 + i, 5 + 2 * i) for i in range(40)]  # 40 layers: two launches of 32
    dgs = [torch.randn(r, dtype=torch.float64, generator=gen).cuda() for r, _ in shapes]
    das = [torch.randn(c, dtype=torch.float64, generator=gen).cuda() for _, c in shapes]
    outs = [torch.empty(r, c, dtype=torch.float64, device="cuda") for r, c in shapes]
    damping = torch.linspace(0.1, 1.0, len(shapes), dtype=torch.float64, device="cuda")
    ptrs = [damping.data_ptr() + 8 * i for i in range(len(shapes))]
    _C.eigen_scale_cuda(8, [0] * len(shapes), [o.data_ptr() for o in outs], [d.data_ptr() for d in dgs],
                        [d.data_ptr() for d in das], ptrs, [0.0] * len(shapes), [r for r, _ in shapes],
                        [c for _, c in shapes], [c for _, c in shapes], [c for _, c in shapes], 0, 0,
                        torch.cuda.current_stream().cuda_stream)
    for i, o in enumerate(outs):
        want = 1.0 / (dgs[i].clamp(min=0)[:, None] * das[i].clamp(min=0)[None, :] + damping[i])
        torch.testing.assert_close(o, want, rtol=1e-15, atol=0)


def test_eigen_scale_kernel_rejects_bad_arguments(cuda):
    from kfac_fast import _C

    t = torch.zeros(4, device="cuda")
    s = torch.cuda.current_stream().cuda_stream
    with pytest.raises(RuntimeError, match="same length"):
        _C.eigen_scale_cuda(4, [0], [], [], [], [], [], [], [], [], [], 0, 0, s)
    with pytest.raises(RuntimeError, match="out of layer 0 is a null pointer"):
        _C.eigen_scale_cuda(4, [0], [0], [t.data_ptr()], [t.data_ptr()], [0], [0.1], [2], [2], [2], [2], 0, 0, s)
    with pytest.raises(RuntimeError, match="damping of layer 0 must be >= 0"):
        _C.eigen_scale_cuda(4, [0], [t.data_ptr()], [t.data_ptr()], [t.data_ptr()], [0], [-1.0],
                            [2], [2], [2], [2], 0, 0, s)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_precondition_eigen_against_reference(cuda, dtype):
    gen = torch.Generator().manual_seed(9)
    layers = _layers(gen, [(1, 3), (17, 16), (33, 64), (7, 255)], dtype)
    grads = [torch.cat([L["w"], L["b"][:, None]], 1) for L in layers]
    args = [[L[k] for L in layers] for k in ("qa", "da", "qg", "dg")]
    damping = torch.tensor([1e-3, 1e-2, 0.1, 1.0], dtype=torch.float64)
    got = cuda.precondition_eigen(grads, *args, damping)
    want = reference.precondition_eigen([g.double().cpu() for g in grads],
                                        *[[t.double().cpu() for t in a] for a in args], damping)
    fp32 = reference.precondition_eigen([g.cpu() for g in grads], *[[t.cpu() for t in a] for a in args], damping)
    for g, w, f in zip(got, want, fp32):
        err = float((g.double().cpu() - w).norm() / w.norm())
        base = float((f.double() - w).norm() / w.norm())
        assert err <= max(2 * base, 1e-6), (err, base)


def test_precondition_eigen_clamps_negative_eigenvalues(cuda):
    # The kernel fuses the clamp max(d, 0) (docs/design.md: eigenvalues clamped at 0), so
    # eigenvalues from eigh(clamp=False) give the reference's result on clamped ones.
    gen = torch.Generator().manual_seed(12)
    (L,) = _layers(gen, [(9, 6)], torch.float64)
    L["dg"][0] = -1e-3
    L["da"][:2] = -2e-3
    grad = torch.cat([L["w"], L["b"][:, None]], 1)
    (got,) = cuda.precondition_eigen([grad], [L["qa"]], [L["da"]], [L["qg"]], [L["dg"]], 1e-3)
    (want,) = reference.precondition_eigen([grad.cpu()], [L["qa"].cpu()], [L["da"].clamp(min=0).cpu()],
                                           [L["qg"].cpu()], [L["dg"].clamp(min=0).cpu()], 1e-3)
    torch.testing.assert_close(got.cpu(), want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("device_damping", [False, True])
@pytest.mark.parametrize("kl_clip", [None, 1e-3, 1e6])
def test_precondition_eigen_inplace_against_reference(cuda, kl_clip, device_damping):
    gen = torch.Generator().manual_seed(10)
    layers = _layers(gen, [(5, 3), (17, 16), (33, 40)], torch.float32)
    layers[1]["b"] = None
    layers[1].update({k: v for k, v in _layers(gen, [(17, 16)], torch.float32, bias=False)[0].items()
                      if k in ("qa", "da")})
    args = [[L[k] for L in layers] for k in ("qa", "da", "qg", "dg")]
    damping = torch.tensor(0.05, dtype=torch.float64)
    lr = torch.tensor(0.1, dtype=torch.float64)
    kl = None if kl_clip is None else torch.tensor(kl_clip, dtype=torch.float64)
    ws = [L["w"].clone() for L in layers]
    bs = [None if L["b"] is None else L["b"].clone() for L in layers]
    nu = cuda.precondition_eigen_(ws, bs, *args, damping.cuda() if device_damping else damping,
                                  lr=lr, kl_clip=kl)
    ws_ref = [L["w"].double().cpu() for L in layers]
    bs_ref = [None if L["b"] is None else L["b"].double().cpu() for L in layers]
    nu_ref = reference.precondition_eigen_(ws_ref, bs_ref, *[[t.double().cpu() for t in a] for a in args],
                                           damping, lr=lr, kl_clip=kl)
    assert nu.device == ws[0].device and nu.dtype == torch.float32 and nu.dim() == 0
    torch.testing.assert_close(nu.double().cpu(), nu_ref, rtol=1e-5, atol=0)
    if kl_clip == 1e-3:
        assert float(nu) < 1.0  # the clip is active in this case
    for w, wr in zip(ws + [b for b in bs if b is not None], ws_ref + [b for b in bs_ref if b is not None]):
        torch.testing.assert_close(w.double().cpu(), wr, rtol=1e-4, atol=1e-4 * float(wr.abs().max()))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_precondition_eigen_inplace_kl_clip_leaves_a_non_finite_layer_out(cuda, bad):
    # The reference's rule (docs/ops-api.md): a layer whose <P, dW_bar> is not finite counts
    # 0 in the KL sum, so nu still clips the other layers.
    gen = torch.Generator().manual_seed(13)
    layers = _layers(gen, [(5, 3), (17, 16), (33, 40)], torch.float32)
    layers[1]["w"][2, 3] = bad
    args = [[L[k] for L in layers] for k in ("qa", "da", "qg", "dg")]
    lr, kl = torch.tensor(0.1, dtype=torch.float64), torch.tensor(1e-3, dtype=torch.float64)
    ws, bs = [L["w"].clone() for L in layers], [L["b"].clone() for L in layers]
    nu = cuda.precondition_eigen_(ws, bs, *args, 0.05, lr=lr, kl_clip=kl)
    ws_ref, bs_ref = [L["w"].double().cpu() for L in layers], [L["b"].double().cpu() for L in layers]
    nu_ref = reference.precondition_eigen_(ws_ref, bs_ref, *[[t.double().cpu() for t in a] for a in args],
                                           0.05, lr=lr, kl_clip=kl)
    assert 0 < float(nu_ref) < 1
    torch.testing.assert_close(nu.double().cpu(), nu_ref, rtol=1e-5, atol=0)
    for i in (0, 2):
        torch.testing.assert_close(ws[i].double().cpu(), ws_ref[i], rtol=1e-4, atol=1e-4 * float(ws_ref[i].abs().max()))


def test_dispatch_picks_cuda_for_these_ops(cuda):
    # eigh always goes to the CUDA backend; the eigen preconditioning is offered to Triton
    # first and its cost model (backends/cost.py) hands calls where cuBLAS wins to CUDA.
    from kfac_fast import _dispatch
    from kfac_fast.backends.triton import _missing as triton_missing

    info = _dispatch.describe(torch.device("cuda"))
    assert info["eigh"]["backend"] == "cuda"
    for op in ("precondition_eigen", "precondition_eigen_"):
        assert info[op]["backend"] == ("cuda" if triton_missing() else "triton")
        assert not info[op]["cuda"].startswith("not used"), info[op]["cuda"]
