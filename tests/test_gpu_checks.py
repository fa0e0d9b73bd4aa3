"""GPU checks of issue 17 that a CPU cannot make: the Jacobi kernel on NaN batches, whole
non-refresh preconditioner steps with no host sync, a launch on the second GPU, and the
factor epilogue's 64-bit offsets at n = 46341. GPU only (marked gpu); bench/gpu_check.sh
runs them, and the Jacobi cases again under compute-sanitizer (bench/sanitize_jacobi.py)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def _c_cuda():
    from kfac_fast import _C

    if not _C.build_info()["cuda"]:
        pytest.skip("kfac_fast._C was built without CUDA")
    from kfac_fast.backends import cuda

    return cuda


def _spd(n, gen, batch=1):
    x = torch.randn(batch, n, n + 3, generator=gen, dtype=torch.float64)
    return (x @ x.mT / n).float()


@pytest.mark.parametrize("n", [65, 128])  # 128: V^T in the global workspace on sm_80
@pytest.mark.parametrize("kind", ["all_nan", "nan_diagonal"])
def test_jacobi_kernel_nan_batch_reports_non_finite(kind, n):
    cuda = _c_cuda()
    gen = torch.Generator().manual_seed(n)
    mats = _spd(n, gen, batch=4)
    if kind == "all_nan":
        mats[1] = float("nan")
    else:
        mats[1].diagonal()[::3] = float("nan")
    vals, vecs, info = cuda.jacobi_eigh_stack(mats.cuda())
    torch.cuda.synchronize()  # a sticky CUDA error (an out-of-bounds read) would raise here
    assert info[:, 0].cpu().tolist() == [1, -1, 1, 1]
    ref = torch.linalg.eigvalsh(mats[0].double())
    torch.testing.assert_close(vals[0].double().cpu(), ref, rtol=0, atol=1e-4 * float(ref.abs().max()))
    with pytest.raises(ValueError, match=r"matrices\[1\] is not finite"):
        cuda.eigh(list(mats.cuda().unbind(0)))


def test_non_refresh_steps_never_sync():
    from kfac_fast import KFACPreconditioner

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 10)).cuda()
    precond = KFACPreconditioner(model, inv_update_steps=4, damping=1e-3, kl_clip=1e-3, lr=0.1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(64, 32, device="cuda"), torch.randint(0, 10, (64,), device="cuda")

    def step():
        opt.zero_grad(set_to_none=False)
        nn.functional.cross_entropy(model(x), y).backward()
        precond.step()
        opt.step()

    step()  # step 0 refreshes the eigenbases (host syncs allowed there)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):  # steps 1-3: factor updates and preconditioning only
            step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_launch_on_the_second_gpu_while_the_first_is_current():
    from kfac_fast import ops
    from kfac_fast.backends import reference

    gen = torch.Generator().manual_seed(1)
    x = torch.randn(300, 257, generator=gen).to(torch.bfloat16)
    f = _spd(258, gen)[0]
    want = f.double().clone()
    reference.update_factor_(want, x.double(), torch.tensor(0.5), torch.tensor(0.25), append_ones=True)
    torch.cuda.set_device(0)
    f1 = f.to("cuda:1")
    ops.update_factor_(f1, x.to("cuda:1"), 0.5, 0.25, append_ones=True)
    torch.cuda.synchronize(1)
    torch.testing.assert_close(f1.double().cpu(), want, rtol=2e-3, atol=2e-3)
    qa = torch.linalg.eigh(f.double())[1].float()
    grads = [torch.randn(40, 258, generator=gen)]
    on1 = dict(device="cuda:1")
    outs = ops.precondition_eigen([g.to("cuda:1") for g in grads], [qa.to("cuda:1")], [torch.ones(258, **on1)],
                                  [torch.eye(40, **on1)], [torch.ones(40, **on1)], 0.1)
    assert outs[0].device == torch.device("cuda:1")
    torch.testing.assert_close(outs[0].cpu(), grads[0] / 1.1, rtol=1e-4, atol=1e-4)


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_properties(0).total_memory < 40e9,
                    reason="needs 40 GB")
def test_factor_update_past_int32_offsets_n_46341():
    from kfac_fast.kernels import factor_update

    n = 46341  # (n-1)*n + (n-1) > 2^31 - 1: the epilogue's offsets must be 64-bit
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(16, n - 1, generator=gen).to(torch.bfloat16).cuda()
    factor = torch.full((n, n), 2.0, device="cuda")
    factor_update.update_factor_(factor, x, torch.tensor(0.5), torch.tensor(0.25), append_ones=True)
    xb = torch.cat([x.double(), torch.ones(16, 1, dtype=torch.float64, device="cuda")], 1)
    for rows in (slice(0, 8), slice(n - 8, n)):
        for cols in (slice(0, 8), slice(n - 8, n)):
            want = 1.0 + 0.25 * xb[:, rows].T @ xb[:, cols]
            torch.testing.assert_close(factor[rows, cols].double(), want, rtol=1e-5, atol=1e-4)
