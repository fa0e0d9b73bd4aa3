"""kfac_fast.integrations.kfac_pytorch: an accelerated kfac-pytorch KFACPreconditioner
gives the gradients of the original, step after step (skips when kfac is absent)."""
import copy
import warnings

import pytest
import torch
from torch import nn

with warnings.catch_warnings():  # kfac warns at import when NVIDIA Apex is absent
    warnings.simplefilter("ignore")
    kfac = pytest.importorskip("kfac", exc_type=ImportError)
pytestmark = pytest.mark.filterwarnings("ignore:Full backward hook")

from kfac.preconditioner import KFACPreconditioner  # noqa: E402

from kfac_fast.integrations.kfac_pytorch import accelerate, accelerated, deaccelerate, is_accelerated  # noqa: E402

DTYPE = torch.float64
# kfac-pytorch decomposes in float32 on both sides: agreement is float32-level, not
# float64; damping keeps the decompositions well conditioned.
RTOL = 2e-6  # measured worst: 3e-7


def mlp(bias=True):
    return nn.Sequential(nn.Linear(7, 12, bias=bias), nn.Tanh(), nn.Linear(12, 5, bias=bias))


def convnet():
    return nn.Sequential(nn.Conv2d(3, 6, 3, padding=1, stride=2), nn.ReLU(),
                         nn.Conv2d(6, 4, (2, 3), bias=False), nn.Flatten(), nn.Linear(4 * 3 * 3, 5))


def batch(kind, gen, n=9):
    x = torch.randn(n, 7, generator=gen, dtype=DTYPE) if kind != "conv" else \
        torch.randn(n, 3, 8, 9, generator=gen, dtype=DTYPE)
    return x, torch.randint(0, 5, (n,), generator=gen)


def make(kind):
    torch.manual_seed(0)
    return (convnet() if kind == "conv" else mlp(bias=kind != "nobias")).to(DTYPE)


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def run_pair(kind, steps=5, accumulation=1, batched=None, **kw):
    """Train the original and the accelerated copy side by side; compare every step."""
    kw = {**dict(factor_update_steps=1, inv_update_steps=2, damping=0.01, factor_decay=0.9, kl_clip=1e-3,
                 lr=0.1, inv_dtype=DTYPE), **kw}
    ref_model = make(kind)
    fast_model = copy.deepcopy(ref_model)
    ref = KFACPreconditioner(ref_model, accumulation_steps=accumulation, **kw)
    fast = KFACPreconditioner(fast_model, accumulation_steps=accumulation, **kw)
    assert accelerate(fast, batched=batched) is fast
    opts = [torch.optim.SGD(m.parameters(), lr=0.1) for m in (ref_model, fast_model)]
    gen = torch.Generator().manual_seed(1)
    loss_fn = nn.CrossEntropyLoss()
    for _ in range(steps):
        data = [batch(kind, gen) for _ in range(accumulation)]
        for model, pc, opt in ((ref_model, ref, opts[0]), (fast_model, fast, opts[1])):
            opt.zero_grad()
            for x, y in data:
                (loss_fn(model(x), y) / accumulation).backward()
            pc.step()
        for p_ref, p_fast in zip(ref_model.parameters(), fast_model.parameters()):
            assert rel(p_fast.grad, p_ref.grad) < RTOL
        for opt in opts:
            opt.step()
    return ref, fast, ref_model, fast_model


@pytest.mark.parametrize("kind", ["linear", "nobias", "conv"])
@pytest.mark.parametrize("method,prediv", [("eigen", True), ("eigen", False), ("inverse", False)])
def test_matches_original(kind, method, prediv):
    run_pair(kind, compute_method=method, compute_eigenvalue_outer_product=prediv)


@pytest.mark.parametrize("kind", ["linear", "nobias", "conv"])
def test_factors_match_to_float64_rounding(kind):
    """Before any parameter update the factors see the same inputs: float64 agreement."""
    ref, fast, *_ = run_pair(kind, steps=1)
    for (_, layer_ref), (_, layer_fast) in zip(ref._layers.values(), fast._layers.values()):
        assert rel(layer_fast.a_factor, layer_ref.a_factor) < 1e-13
        assert rel(layer_fast.g_factor, layer_ref.g_factor) < 1e-13


@pytest.mark.parametrize("method", ["eigen", "inverse"])
def test_per_layer_path_matches(method):
    """batched=False: kfac-pytorch's own step (the multi-rank path) over patched layers."""
    _, fast, *_ = run_pair("conv", batched=False, compute_method=method)
    assert "step" not in vars(fast)


@pytest.mark.parametrize("in_hook", [True, False])
def test_accumulation_and_deferred_updates(in_hook):
    run_pair("conv", steps=4, accumulation=2, update_factors_in_hook=in_hook)


def test_grad_scaler_and_no_kl_clip():
    run_pair("linear", steps=3, grad_scaler=lambda: 64.0, kl_clip=lambda step: None)  # None only via a callable


def test_deaccelerate_restores_original_behaviour():
    ref, fast, ref_model, fast_model = run_pair("conv", steps=3)  # steps 0..2: refreshed at 2
    assert is_accelerated(fast)
    deaccelerate(fast)
    assert not is_accelerated(fast) and "step" not in vars(fast)
    for _, layer in fast._layers.values():
        assert "save_layer_input" not in vars(layer)
        assert layer.dgda is not None and layer.da is None  # kfac-pytorch's prediv format back
    gen = torch.Generator().manual_seed(5)
    x, y = batch("conv", gen)
    for model, pc in ((ref_model, ref), (fast_model, fast)):
        model.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        pc.step()  # step 3: no refresh, uses the restored dgda
    for p_ref, p_fast in zip(ref_model.parameters(), fast_model.parameters()):
        assert rel(p_fast.grad, p_ref.grad) < RTOL


def test_context_manager_and_idempotence():
    model = make("linear")
    pc = KFACPreconditioner(model)
    with accelerated(pc) as same:
        assert same is pc and is_accelerated(pc)
        assert accelerate(pc) is pc  # twice: no-op
    assert not is_accelerated(pc)


def test_rejects_half_inverse_dtype():
    pc = KFACPreconditioner(make("linear"), inv_dtype=torch.float16)
    with pytest.raises(ValueError, match="inv_dtype"):
        accelerate(pc)


def test_batched_true_refused_with_unsupported_layer():
    pc = KFACPreconditioner(make("linear"))
    name, layer = next(iter(pc._layers.values()))
    layer.module = type("Custom", (type(layer.module),), {})(layer.module.module)
    with pytest.raises(ValueError, match="batched=True"):
        accelerate(pc, batched=True)
    accelerate(pc)  # auto: per-layer mode, the unknown layer keeps its own methods
    assert "step" not in vars(pc) and "save_layer_input" not in vars(layer)


