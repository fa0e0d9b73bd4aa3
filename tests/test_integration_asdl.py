"""kfac_fast.integrations.asdl: an accelerated ASDL KfacGradientMaker gives the
gradients of the original, step after step (skips when asdl is absent)."""
import contextlib
import copy
import types

import pytest
import torch
from torch import nn

asdl = pytest.importorskip("asdl", exc_type=ImportError)

import asdl.precondition.natural_gradient as natural_gradient  # noqa: E402

from kfac_fast.integrations.asdl import accelerate, accelerated, deaccelerate, is_accelerated  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:Using a non-full backward hook:FutureWarning")
DTYPE = torch.float64
RTOL = 1e-9  # both sides invert in float64: differences are Cholesky rounding


@pytest.fixture(autouse=True)
def cpu_nvtx(monkeypatch):
    """asdfghjkl 0.1a5 calls torch.cuda.nvtx.range unconditionally, which a CPU build
    of torch refuses; the original (the oracle) needs a no-op stand-in on CPU."""
    if not torch.cuda.is_available():
        monkeypatch.setattr(natural_gradient, "nvtx",
                            types.SimpleNamespace(range=lambda *a, **k: contextlib.nullcontext()))


def mlp():
    return nn.Sequential(nn.Linear(7, 12), nn.Tanh(), nn.Linear(12, 5, bias=False))


def convnet():
    return nn.Sequential(nn.Conv2d(3, 6, 3, padding=1, stride=2), nn.ReLU(), nn.Conv2d(6, 4, (2, 3), bias=False),
                         nn.Flatten(), nn.Linear(4 * 3 * 3, 5))


def make(kind):
    torch.manual_seed(0)
    return (convnet() if kind == "conv" else mlp()).to(DTYPE)


def batch(kind, gen, n=9):
    shape = (n, 3, 8, 9) if kind == "conv" else (n, 7)
    return torch.randn(*shape, generator=gen, dtype=DTYPE), torch.randint(0, 5, (n,), generator=gen)


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def maker(model, fisher_type, interval):
    config = asdl.PreconditioningConfig(data_size=9, damping=0.01, ema_decay=0.2, preconditioner_upd_interval=interval,
                                        curvature_upd_interval=1)
    return asdl.KfacGradientMaker(model, config, fisher_type=fisher_type, seed=3, grad_scale=0.5)


def train_step(gm, model, opt, x, y):
    opt.zero_grad()
    dummy = gm.setup_model_call(model, x)
    gm.setup_loss_call(nn.functional.cross_entropy, dummy, y)
    gm.forward_and_backward()


@pytest.mark.parametrize("kind", ["linear", "conv"])
@pytest.mark.parametrize("fisher_type,interval", [("fisher_emp", 1), ("fisher_mc", 2)])
def test_matches_original(kind, fisher_type, interval):
    ref_model = make(kind)
    fast_model = copy.deepcopy(ref_model)
    ref = maker(ref_model, fisher_type, interval)
    fast = maker(fast_model, fisher_type, interval)
    assert accelerate(fast) is fast
    opts = [torch.optim.SGD(m.parameters(), lr=0.05) for m in (ref_model, fast_model)]
    gen = torch.Generator().manual_seed(1)
    for _ in range(5):
        x, y = batch(kind, gen)
        train_step(ref, ref_model, opts[0], x, y)
        train_step(fast, fast_model, opts[1], x, y)
        for p_ref, p_fast in zip(ref_model.parameters(), fast_model.parameters()):
            assert rel(p_fast.grad, p_ref.grad) < RTOL
        for opt in opts:
            opt.step()


def test_preconditioning_changes_the_gradient():
    """Guards the comparison above against both sides silently not preconditioning."""
    model = make("linear")
    plain = copy.deepcopy(model)
    gm = accelerate(maker(model, "fisher_emp", 1))
    x, y = batch("linear", torch.Generator().manual_seed(2))
    train_step(gm, model, torch.optim.SGD(model.parameters(), lr=0.1), x, y)
    nn.functional.cross_entropy(plain(x), y).backward()
    for p, q in zip(model.parameters(), plain.parameters()):
        assert rel(p.grad, 0.5 * q.grad) > 1e-3


def test_deaccelerate_and_context_manager():
    gm = maker(make("linear"), "fisher_emp", 1)
    with accelerated(gm) as same:
        assert same is gm and is_accelerated(gm) and "precondition" in vars(gm)
        assert accelerate(gm) is gm
    assert not is_accelerated(gm) and "precondition" not in vars(gm)
    assert deaccelerate(gm) is gm


def test_refuses_ekfac():
    config = asdl.PreconditioningConfig(data_size=9, damping=0.01)
    gm = asdl.EkfacGradientMaker(make("linear"), config, fisher_type="fisher_emp")
    with pytest.raises(ValueError, match="never preconditions"):
        accelerate(gm)
