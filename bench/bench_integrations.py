"""Other K-FAC frontends on kfac_fast: each accelerated frontend against itself
unaccelerated, same model, same settings, one run.

One case = one training step (zero_grad, forward, backward, the frontend's K-FAC step)
on an MLP (4 Linear layers, width 512) and a small CNN (3 Conv2d, 16x16 inputs, pooled
into a Linear), batch 128,
factors and inverses refreshed every step (the expensive setting). CPU cases pin
torch.set_num_threads(THREADS); GPU cases (marked gpu) run where CUDA is present.
Frontends that are not installed are skipped.

    pytest bench/bench_integrations.py --benchmark-only --benchmark-group-by=group
"""
import contextlib
import types
import warnings

import pytest
import torch
from torch import nn

THREADS = 2
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


def _mlp():
    return nn.Sequential(nn.Linear(256, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(),
                         nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 10))


def _cnn():
    return nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 64, 3, stride=2, padding=1),
                         nn.ReLU(), nn.Conv2d(64, 64, 3, stride=2, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10))


MODELS = {"mlp": (_mlp, (256,)), "cnn": (_cnn, (3, 16, 16))}


def _setup(device, model_name):
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    if device == "cpu":
        torch.set_num_threads(THREADS)
    torch.manual_seed(0)
    make, shape = MODELS[model_name]
    model = make().to(device)
    x = torch.randn(128, *shape, device=device)
    y = torch.randint(0, 10, (128,), device=device)
    return model, x, y


def _timed(benchmark, device, step):
    def call():
        step()
        if device == "cuda":
            torch.cuda.synchronize()

    for _ in range(2):  # warm-up: the first steps allocate factors and decompositions
        call()
    benchmark.pedantic(call, rounds=3, iterations=1)


def _run(benchmark, device, group, step):
    """Time `step` in benchmark group `group`, the libraries' warnings silenced."""
    benchmark.group = group
    benchmark.extra_info.update(threads=THREADS if device == "cpu" else None, device=device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _timed(benchmark, device, step)


@pytest.mark.parametrize("accelerated", [False, True], ids=["kfac-pytorch", "kfac-pytorch+kfac_fast"])
@pytest.mark.parametrize("model_name", list(MODELS))
@pytest.mark.parametrize("device", DEVICES)
def test_kfac_pytorch(benchmark, device, model_name, accelerated):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        kfac = pytest.importorskip("kfac", exc_type=ImportError)
    from kfac_fast.integrations import kfac_pytorch

    model, x, y = _setup(device, model_name)
    pc = kfac.preconditioner.KFACPreconditioner(model, factor_update_steps=1, inv_update_steps=1, damping=0.003,
                                                lr=0.1, kl_clip=0.001)
    if accelerated:
        kfac_pytorch.accelerate(pc)

    def step():
        model.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        pc.step()

    _run(benchmark, device, f"kfac-pytorch {model_name} {device}", step)


@pytest.mark.parametrize("accelerated", [False, True], ids=["asdl", "asdl+kfac_fast"])
@pytest.mark.parametrize("model_name", list(MODELS))
@pytest.mark.parametrize("device", DEVICES)
def test_asdl(benchmark, device, model_name, accelerated, monkeypatch):
    asdl = pytest.importorskip("asdl", exc_type=ImportError)
    import asdl.precondition.natural_gradient as natural_gradient

    from kfac_fast.integrations import asdl as asdl_integration

    if not torch.cuda.is_available():  # asdfghjkl 0.1a5 calls CUDA-only nvtx ranges
        monkeypatch.setattr(natural_gradient, "nvtx",
                            types.SimpleNamespace(range=lambda *a, **k: contextlib.nullcontext()))
    model, x, y = _setup(device, model_name)
    config = asdl.PreconditioningConfig(data_size=128, damping=0.003, ema_decay=0.05)
    gm = asdl.KfacGradientMaker(model, config, fisher_type="fisher_emp")
    if accelerated:
        asdl_integration.accelerate(gm)

    def step():
        model.zero_grad()
        dummy = gm.setup_model_call(model, x)
        gm.setup_loss_call(nn.functional.cross_entropy, dummy, y)
        gm.forward_and_backward()

    _run(benchmark, device, f"asdl {model_name} {device}", step)

