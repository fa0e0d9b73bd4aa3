"""Batched eigendecomposition on the GPU: kfac_fast's Jacobi kernel against torch.

Side by side in one run, per (batch, n): the Jacobi kernel (`backends.cuda.jacobi_eigh_stack`,
raw, no retry), kfac_fast's eigh op (buckets, retry check: one host read), torch's
batched torch.linalg.eigh, and a per-matrix torch.linalg.eigh loop. Inputs are fp32
K-FAC-like factors (x^T x / rows, rows = n // 2 + 1: rank deficient as with small batches).
The torch/Jacobi cut-off in kfac_fast/backends/cuda.py (EIGH_TORCH_MAX_N) should follow these
numbers. GPU only: every case skips without CUDA.

    pytest bench/bench_eigh.py --benchmark-only --benchmark-group-by=group
"""
import pytest
import torch

BATCHES = [64, 512]
SIZES = [16, 32, 48, 64, 65, 96, 128]
IMPLS = ["kfac_jacobi", "kfac_eigh_op", "torch_batched", "torch_loop"]

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _factors(batch, n):
    gen = torch.Generator(device="cuda").manual_seed(batch * 1000 + n)
    x = torch.randn(batch, n // 2 + 1, n, device="cuda", generator=gen)
    return (x.mT @ x / x.shape[1]).contiguous()


def _run(impl, stack):
    from kfac_fast.backends import cuda as _cuda

    if impl == "kfac_jacobi":
        return _cuda.jacobi_eigh_stack(stack)
    if impl == "kfac_eigh_op":
        return _cuda.eigh(list(stack.unbind(0)))
    if impl == "torch_batched":
        return torch.linalg.eigh(stack)
    return [torch.linalg.eigh(m) for m in stack]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("batch", BATCHES)
def test_eigh(benchmark, batch, n, impl):
    if impl == "torch_loop" and batch > BATCHES[0]:
        pytest.skip("the per-matrix loop only at the small batch: it scales linearly (and takes the lease)")
    stack = _factors(batch, n)
    benchmark.group = f"eigh fp32 batch={batch} n={n}"
    benchmark.extra_info.update(batch=batch, n=n, impl=impl, device=torch.cuda.get_device_name())

    def call():
        out = _run(impl, stack)
        torch.cuda.synchronize()
        return out

    call()  # warm-up: plan cache, cuSOLVER handles
    benchmark.pedantic(call, rounds=5, iterations=1)
