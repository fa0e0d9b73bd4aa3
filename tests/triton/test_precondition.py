"""Triton grouped eigenbasis preconditioning (kernels/precondition.py) against
kfac_fast.backends.reference in float64, under docs/design.md's error rule.

Runs under TRITON_INTERPRET=1 on CPU (its own pytest process) or on a CUDA device.
"""
import os

import pytest
import torch

if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
    pytest.skip("needs TRITON_INTERPRET=1 (CPU) or a CUDA device", allow_module_level=True)

from kfac_fast.backends import reference
from kfac_fast.kernels import precondition
from tests._oracle import assert_error_rule

pytestmark = pytest.mark.interpret
DEV = "cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1" else "cpu"
SMALL = dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=32)

# (d_out, d_in, bias, weight-grad layout): tiny, odd and tile-straddling shapes, conv-shaped grads.
LAYERS = [(1, 1, False, "contig"), (5, 3, True, "transposed"), (40, 33, False, "contig"),
          (2, 70, True, "conv"), (33, 17, True, "contig"), (17, 64, False, "transposed")]



def eig(n, gen):
    """Eigenvectors/values of a random PSD matrix (values >= 0, as eigh(clamp=True) gives)."""
    m = torch.randn(n, n + 3, generator=gen, dtype=torch.float64)
    d, q = torch.linalg.eigh(m @ m.T / n)
    return d.clamp_min(0).float().to(DEV), q.float().to(DEV)


def make(layers, gen, dtype=torch.float32):
    ws, bs, qa, da, qg, dg = [], [], [], [], [], []
    for d_out, d_in, bias, layout in layers:
        if layout == "transposed":
            w = torch.randn(d_in, d_out, generator=gen).T
        elif layout == "conv":
            w = torch.randn(d_out, d_in // 2, 1, 2, generator=gen)
        else:
            w = torch.randn(d_out, d_in, generator=gen)
        ws.append(w.to(dtype).to(DEV))
        bs.append(torch.randn(d_out, generator=gen).to(dtype).to(DEV) if bias else None)
        a, b = eig(d_in + bias, gen)
        da.append(a), qa.append(b)
        a, b = eig(d_out, gen)
        dg.append(a), qg.append(b)
    return ws, bs, qa, da, qg, dg


def as64(ts):
    return [None if t is None else t.double() for t in ts]


@pytest.mark.parametrize("kl", ["none", "tensor", "float"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_precondition_eigen_inplace(kl, dtype):
    gen = torch.Generator().manual_seed(7)
    ws, bs, qa, da, qg, dg = make(LAYERS, gen, dtype)
    L = len(LAYERS)
    damping = torch.rand(L, generator=gen, dtype=torch.float64) * 0.1 + 1e-3
    lr, kl_clip = {"none": (None, None), "tensor": (torch.tensor(0.1, device=DEV), torch.tensor(1e-3, device=DEV)),
                   "float": (0.1, 1e-3)}[kl]
    lr_ref = None if lr is None else torch.as_tensor(lr).double().cpu()
    kl_ref = None if kl_clip is None else torch.as_tensor(kl_clip).double().cpu()
    w64, b64 = [w.double().clone() for w in ws], [None if b is None else b.double().clone() for b in bs]
    nu64 = reference.precondition_eigen_(w64, b64, as64(qa), as64(da), as64(qg), as64(dg), damping,
                                         lr=lr_ref, kl_clip=kl_ref)
    w32, b32 = [w.float().clone() for w in ws], [None if b is None else b.float().clone() for b in bs]
    nu32 = reference.precondition_eigen_(w32, b32, qa, da, qg, dg, damping.float(), lr=lr_ref, kl_clip=kl_ref)
    if kl != "none":
        assert float(nu64) < 1, "the test should exercise the clip"
    nu = precondition.precondition_eigen_(ws, bs, qa, da, qg, dg, damping.to(DEV, torch.float32), lr=lr,
                                          kl_clip=kl_clip, config=SMALL)
    assert nu.shape == () and nu.device == ws[0].device
    assert_error_rule(nu.reshape(1), nu64.reshape(1), nu32.reshape(1))
    for w, b, r64, r32, rb64, rb32 in zip(ws, bs, w64, w32, b64, b32):
        out = w.reshape(w.shape[0], -1) if b is None else torch.cat([w.reshape(w.shape[0], -1), b[:, None]], 1)
        ref = r64.reshape(r64.shape[0], -1)
        ref = ref if rb64 is None else torch.cat([ref, rb64[:, None]], 1)
        r32_ = r32.reshape(r32.shape[0], -1)
        r32_ = r32_ if rb32 is None else torch.cat([r32_, rb32[:, None]], 1)
        if dtype == torch.float16:  # the output is rounded to fp16: compare against the rounded oracle
            r32_ = ref.half()
        assert_error_rule(out, ref, r32_)


def test_precondition_eigen_functional_and_deterministic():
    gen = torch.Generator().manual_seed(8)
    layers = [(d_out, d_in + bias, False, lay) for d_out, d_in, bias, lay in LAYERS if lay != "conv"]
    ws, _, qa, da, qg, dg = make(layers, gen)
    ref64 = reference.precondition_eigen(as64(ws), as64(qa), as64(da), as64(qg), as64(dg), 0.01)
    ref32 = reference.precondition_eigen(ws, qa, da, qg, dg, 0.01)
    outs = precondition.precondition_eigen(ws, qa, da, qg, dg, torch.tensor(0.01, dtype=torch.float64), config=SMALL)
    again = precondition.precondition_eigen(ws, qa, da, qg, dg, torch.tensor(0.01, dtype=torch.float64), config=SMALL)
    for o, a, r64, r32 in zip(outs, again, ref64, ref32):
        assert torch.equal(o, a)
        assert_error_rule(o, r64, r32)


def test_zero_gradient_gives_nu_one():
    gen = torch.Generator().manual_seed(9)
    ws, bs, qa, da, qg, dg = make(LAYERS[:3], gen)
    for w in ws:
        w.zero_()
    for b in bs:
        if b is not None:
            b.zero_()
    nu = precondition.precondition_eigen_(ws, bs, qa, da, qg, dg, 0.1, lr=0.1, kl_clip=1e-3, config=SMALL)
    assert float(nu) == 1.0 and all(not w.any() for w in ws)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_kl_clip_leaves_a_non_finite_layer_out(bad):
    # docs/ops-api.md: a layer whose <P, dW_bar> is not finite counts 0 in the KL sum, so
    # nu still clips the other layers (the reference's finite_term rule), not nu = NaN or 1.
    gen = torch.Generator().manual_seed(10)
    ws, bs, qa, da, qg, dg = make(LAYERS, gen)
    ws[2][3, 5] = bad  # layer 2 spans several 32x32 tiles: one bad tile among finite ones
    lr, kl_clip = torch.tensor(0.1, dtype=torch.float64), torch.tensor(1e-3, dtype=torch.float64)
    # The references run on the CPU (float64 and float32), whatever device the kernel uses.
    w64, b64 = [w.double().cpu().clone() for w in ws], [None if b is None else b.double().cpu() for b in bs]
    cpu64 = [[t.double().cpu() for t in ts] for ts in (qa, da, qg, dg)]
    nu64 = reference.precondition_eigen_(w64, b64, *cpu64, 0.01,
                                         lr=lr, kl_clip=kl_clip)
    w32, b32 = [w.cpu().clone() for w in ws], [None if b is None else b.cpu().clone() for b in bs]
    nu32 = reference.precondition_eigen_(w32, b32, [t.cpu() for t in qa], [t.cpu() for t in da],
                                         [t.cpu() for t in qg], [t.cpu() for t in dg], 0.01, lr=lr, kl_clip=kl_clip)
    assert torch.isfinite(nu64) and 0 < float(nu64) < 1, "the finite layers should still be clipped"
    nu = precondition.precondition_eigen_(ws, bs, qa, da, qg, dg, 0.01, lr=0.1, kl_clip=1e-3, config=SMALL)
    assert_error_rule(nu.cpu().reshape(1), nu64.reshape(1), nu32.reshape(1))
    assert not torch.isfinite(ws[2]).all()
    for i in (0, 1, 3, 4, 5):
        assert_error_rule(ws[i].cpu(), w64[i], w32[i])
