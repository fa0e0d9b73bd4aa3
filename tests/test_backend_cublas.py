"""The `cublas` backend (kfac_fast/backends/cublas.py): the reference's factor-update
contract in cuBLAS's fastest form, and the rule that hands launch-bound groups to Triton.

The functions are plain torch, so they run on the CPU here. Two paths differ there: 16-bit
rows take the cast path (CPU torch has no mm with out_dtype), and device scalars are CPU
tensors, so the tests marked `device_branch` force the device-scalar branch through
`cublas._on_host`. On a GPU, `bench/gpu_check.sh tests` runs this file on CUDA tensors."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from kfac_fast import _dispatch
from kfac_fast.backends import cublas, reference
from tests._oracle import assert_error_rule, f64, generator, random_spd

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _rows(shape, dtype, gen):
    return torch.randn(*shape, generator=gen).to(dtype).to(DEV)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("append_ones", [False, True])
@pytest.mark.parametrize("shape", [(37, 5), (3, 11, 7), (1, 1), (300, 33)])
@pytest.mark.parametrize("device_scalars", [False, True, "device_branch"])
def test_update_factor_meets_the_error_rule(dtype, append_ones, shape, device_scalars, monkeypatch):
    if device_scalars == "device_branch":
        monkeypatch.setattr(cublas, "_on_host", lambda s: False)
    gen = generator(1)
    x = _rows(shape, dtype, gen)
    n = shape[-1] + append_ones
    start = random_spd(n, dtype=torch.float32, gen=gen).to(DEV)
    beta, alpha = 0.9, 0.1 / x.shape[:-1].numel()
    scalars = (torch.tensor(beta, device=DEV), torch.tensor(alpha, device=DEV)) if device_scalars else (beta, alpha)
    out = cublas.update_factor_(start.clone(), x, *scalars, append_ones=append_ones)
    ref64 = reference.update_factor_(f64(start).cpu(), f64(x).cpu(), beta, alpha, append_ones=append_ones)
    ref32 = reference.update_factor_(start.clone().cpu(), x.float().cpu(), beta, alpha, append_ones=append_ones)
    assert out.dtype == torch.float32 and out.shape == (n, n)
    assert_error_rule(out.cpu(), ref64, ref32)


@pytest.mark.parametrize("branch", ["host", "device_branch"])
def test_zero_beta_never_reads_the_factor_and_zero_alpha_never_reads_x(branch, monkeypatch):
    if branch == "device_branch":  # scalars as if on the device: never read on the host
        monkeypatch.setattr(cublas, "_on_host", lambda s: False)
        monkeypatch.setattr(cublas, "is_host_zero", lambda s: False)
    gen = generator(2)
    x = _rows((20, 6), torch.float32, gen)
    poisoned = torch.full((7, 7), float("nan"), device=DEV)
    out = cublas.update_factor_(poisoned, x, 0.0, 0.05, append_ones=True)
    assert torch.isfinite(out).all()
    start = random_spd(6, dtype=torch.float32, gen=gen).to(DEV)
    bad_x = torch.full((20, 6), float("nan"), device=DEV)
    for alpha in (0.0, torch.tensor(0.0, device=DEV)):
        out = cublas.update_factor_(start.clone(), bad_x, 0.5, alpha)
        torch.testing.assert_close(out, start * 0.5, rtol=0, atol=0)
    out = cublas.update_factor_(poisoned.clone(), x, torch.tensor(0.0, device=DEV), torch.tensor(0.05, device=DEV),
                                append_ones=True)
    assert torch.isfinite(out).all()


def test_grouped_update_with_mixed_ones_and_per_layer_scalars():
    gen = generator(3)
    dims, ones = [4, 9, 1, 16], [True, False, True, False]
    xs = [_rows((25, d), torch.bfloat16, gen) for d in dims]
    starts = [random_spd(d + o, dtype=torch.float32, gen=gen).to(DEV) for d, o in zip(dims, ones)]
    betas = torch.tensor([0.9, 0.5, 0.0, 1.0], dtype=torch.float64)
    alphas = torch.tensor([0.1, 0.5, 1.0, 0.0], dtype=torch.float64)
    outs = cublas.update_factors_([s.clone() for s in starts], xs, betas, alphas, append_ones=ones)
    for i, out in enumerate(outs):
        args = (float(betas[i]), float(alphas[i]))
        ref64 = reference.update_factor_(f64(starts[i]).cpu(), f64(xs[i]).cpu(), *args, append_ones=ones[i])
        ref32 = reference.update_factor_(starts[i].clone().cpu(), xs[i].float().cpu(), *args, append_ones=ones[i])
        assert_error_rule(out.cpu(), ref64, ref32, what=f"layer {i}")


@pytest.mark.parametrize("conv", [dict(kernel_size=3, padding=1), dict(kernel_size=(3, 2), stride=2, dilation=(1, 2)),
                                  dict(kernel_size=1)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_conv_input_factor_meets_the_error_rule(conv, dtype):
    gen = generator(4)
    layer = nn.Conv2d(5, 3, **conv)
    x = _rows((3, 5, 9, 11), dtype, gen)
    geometry = [layer.kernel_size, layer.stride, layer.padding, layer.dilation]
    n = 5 * layer.kernel_size[0] * layer.kernel_size[1] + 1
    start = random_spd(n, dtype=torch.float32, gen=gen).to(DEV)
    out = cublas.conv_input_factor_(start.clone(), x, 0.8, 0.01, *geometry, append_ones=True)
    ref64 = reference.conv_input_factor_(f64(start).cpu(), f64(x).cpu(), 0.8, 0.01, *geometry, append_ones=True)
    ref32 = reference.conv_input_factor_(start.clone().cpu(), x.float().cpu(), 0.8, 0.01, *geometry,
                                         append_ones=True)
    assert_error_rule(out.cpu(), ref64, ref32)


def test_conv_chunks_give_the_same_factor(monkeypatch):
    # patches unfolded a few images at a time (CONV_CHUNK_ELEMENTS) equal one whole unfold
    gen = generator(5)
    x = _rows((7, 3, 6, 5), torch.float32, gen)
    start = random_spd(28, dtype=torch.float32, gen=gen).to(DEV)
    geometry = [(3, 3), (1, 1), (1, 1), (1, 1)]
    whole = cublas.conv_input_factor_(start.clone(), x, 0.8, 0.01, *geometry, append_ones=True)
    monkeypatch.setattr(cublas, "CONV_CHUNK_ELEMENTS", 2 * 27 * 30)  # two images per chunk: 4 chunks
    chunked = cublas.conv_input_factor_(start.clone(), x, 0.8, 0.01, *geometry, append_ones=True)
    torch.testing.assert_close(chunked, whole, rtol=1e-6, atol=1e-6)
    empty = cublas.conv_input_factor_(start.clone(), x[:0], 0.8, 0.01, *geometry, append_ones=True)
    torch.testing.assert_close(empty, 0.8 * start, rtol=1e-6, atol=0)


def _group(count, n, rows):
    return [torch.empty(n, n) for _ in range(count)], [torch.empty(rows, n - 1) for _ in range(count)]


def test_launch_bound_groups_are_the_measured_kind():
    assert cublas.launch_bound(*_group(48, 257, 1024))
    assert not cublas.launch_bound(*_group(7, 64, 1024))  # too few layers to be launch-bound
    assert not cublas.launch_bound(*_group(24, 769, 2048))  # the transformer mix that lost
    assert not cublas.launch_bound(*_group(12, 33, 8192))  # conv G factors: long rows lost


def test_auto_sends_factor_ops_to_cublas_and_small_groups_to_triton(monkeypatch):
    monkeypatch.setattr(_dispatch._BACKENDS["cublas"], "_why", None)  # as on a GPU machine
    monkeypatch.setattr(_dispatch._BACKENDS["triton"], "_why", None)
    cuda = torch.device("cuda")
    info = _dispatch.describe(cuda)
    for op in ("update_factor_", "update_factors_", "conv_input_factor_"):
        assert info[op]["backend"] == "cublas", info[op]
    rule = cublas._grouped_refuses
    small, large = _group(48, 129, 512), _group(24, 769, 2048)
    assert "launch-bound" in rule(_dispatch.Call(cuda, torch.float32, 129, (*small, None, None)))
    assert rule(_dispatch.Call(cuda, torch.float32, 769, (*large, None, None))) is None
    fp64 = [f.double() for f in small[0]], small[1]  # Triton serves float32 factors only
    assert rule(_dispatch.Call(cuda, torch.float64, 129, (*fp64, None, None))) is None
    monkeypatch.setenv("KFAC_FAST_BACKEND", "cublas")  # named: it serves every call itself
    assert rule(_dispatch.Call(cuda, torch.float32, 129, (*small, None, None))) is None
    monkeypatch.delenv("KFAC_FAST_BACKEND")
    monkeypatch.setattr(_dispatch._BACKENDS["triton"], "_why", "triton is not importable")
    assert rule(_dispatch.Call(cuda, torch.float32, 129, (*small, None, None))) is None
    assert "CUDA tensors only" in rule(_dispatch.Call(torch.device("cpu"), torch.float32, 129, (*small, None, None)))
