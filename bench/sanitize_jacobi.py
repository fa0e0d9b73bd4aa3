"""Small CUDA-kernel workload for compute-sanitizer (racecheck, memcheck): the Jacobi
kernel with V^T in shared and in global memory, fp32 and fp64, odd and even n, and the
eigen-scale kernel with KL tile sums over more than one launch, and batches holding an
all-NaN and a NaN-diagonal matrix (status -1, no out-of-bounds read). Exits non-zero when a
result is wrong, so a silent race that corrupts results also fails.

    compute-sanitizer --tool racecheck python bench/sanitize_jacobi.py
    compute-sanitizer --tool memcheck  python bench/sanitize_jacobi.py
"""
import sys

import torch


def main() -> int:
    from kfac_fast import _C
    from kfac_fast.backends import cuda as _cuda

    assert torch.cuda.is_available() and _C.build_info()["cuda"], "needs CUDA and a CUDA build of _C"
    failures = []
    gen = torch.Generator(device="cuda").manual_seed(0)
    for n, batch in ((5, 3), (33, 2), (65, 2), (128, 1)):
        plan = _C.jacobi_cuda_plan(n)
        for dtype in (torch.float32, torch.float64):
            x = torch.randn(batch, n, n + 2, device="cuda", dtype=dtype, generator=gen)
            a = (x @ x.mT / n).contiguous()
            vals, vecs, info = _cuda.jacobi_eigh_stack(a)
            torch.cuda.synchronize()
            ad = a.double()
            res = torch.linalg.norm(ad @ vecs.double() - vecs.double() * vals.double()[:, None, :], dim=(1, 2))
            res = float((res / torch.linalg.norm(ad, dim=(1, 2))).max())
            ok = bool((info[:, 0] == 1).all()) and res < 1e-5
            print(f"jacobi n={n} batch={batch} {dtype} vt_in_smem={plan['vt_in_smem']} "
                  f"sweeps={info[:, 1].tolist()} residual={res:.1e} {'ok' if ok else 'FAIL'}")
            if not ok:
                failures.append(f"jacobi n={n} {dtype}")
    # Non-finite batches (issue 17, defect 2): an all-NaN and a NaN-diagonal matrix between
    # finite ones. Before the fix the eigenvalue order left perm slots unwritten and the
    # kernel read a[perm*ld+perm] / vt at garbage indices: memcheck reports that.
    for n in (65, 128):
        x = torch.randn(4, n, n + 2, device="cuda", generator=gen)
        a = (x @ x.mT / n).contiguous()
        a[1] = float("nan")
        a[2].diagonal()[::3] = float("nan")
        vals, vecs, info = _cuda.jacobi_eigh_stack(a)
        torch.cuda.synchronize()
        status = info[:, 0].tolist()
        ok = status == [1, -1, -1, 1] and bool(torch.isfinite(vals[[0, 3]]).all())
        print(f"jacobi NaN batch n={n} status={status} {'ok' if ok else 'FAIL'}")
        if not ok:
            failures.append(f"jacobi NaN n={n}")
    # 40 layers: two launches of the scale kernel; KL tile sums against torch.
    shapes = [(2 + i, 3 + 3 * i) for i in range(40)]
    xs = [torch.randn(r, c, device="cuda", generator=gen) for r, c in shapes]
    dgs = [torch.rand(r, device="cuda", generator=gen) for r, _ in shapes]
    das = [torch.rand(c, device="cuda", generator=gen) for _, c in shapes]
    want = [x / (g[:, None] * a[None, :] + 0.1) for x, g, a in zip(xs, dgs, das)]
    kl_want = sum(float((x.double() * w.double()).sum()) for x, w in zip(xs, want))
    kl = _cuda._scale_("sanitize", xs, dgs, das, _cuda._Damping(torch.tensor(0.1, dtype=torch.float64), 40), kl=True)
    torch.cuda.synchronize()
    err = max(float((x - w).abs().max() / w.abs().max()) for x, w in zip(xs, want))
    ok = err < 1e-5 and abs(float(kl) - kl_want) <= 1e-5 * abs(kl_want)
    print(f"eigen_scale layers=40 max_err={err:.1e} kl={float(kl):.6g} want={kl_want:.6g} {'ok' if ok else 'FAIL'}")
    if not ok:
        failures.append("eigen_scale")
    print("FAILED: " + ", ".join(failures) if failures else "all ok")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
