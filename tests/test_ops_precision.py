"""The ops' keyword-only `precision=` (docs/ops-api.md): validated, carried through the
custom-op schemas to the implementation only when set, ignored by the torch reference
(CPU numbers do not change), and set by KFACPreconditioner(precision="tf32")."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from kfac_fast import KFACPreconditioner, _ops, ops
from tests._oracle import generator, randn, random_spd

PRECISION_OPS = ("update_factor_", "update_factors_", "conv_input_factor_", "precondition_eigen",
                 "precondition_eigen_")


def _calls(gen):
    """op name -> a function calling it with precision=... on fresh CPU inputs."""
    a, g = random_spd(4, dtype=torch.float32, gen=gen), random_spd(3, dtype=torch.float32, gen=gen)
    (da, qa), (dg, qg) = torch.linalg.eigh(a), torch.linalg.eigh(g)
    x, conv_x = randn(5, 3, gen=gen), randn(2, 1, 4, 4, gen=gen)
    w, b, grad = randn(3, 3, gen=gen), randn(3, gen=gen), randn(3, 4, gen=gen)
    conv_f = random_spd(9, dtype=torch.float32, gen=gen)
    return {
        "update_factor_": lambda p: ops.update_factor_(a.clone(), x, 0.5, 0.2, append_ones=True, precision=p),
        "update_factors_": lambda p: ops.update_factors_([a.clone()], [x], 0.5, 0.2, append_ones=True, precision=p),
        "conv_input_factor_": lambda p: ops.conv_input_factor_(conv_f.clone(), conv_x, 0.5, 0.2, 3, 1, 1, 1,
                                                               precision=p),
        "precondition_eigen": lambda p: ops.precondition_eigen([grad], [qa], [da], [qg], [dg], 0.1, precision=p),
        "precondition_eigen_": lambda p: (lambda wb: (ops.precondition_eigen_(
            [wb[0]], [wb[1]], [qa], [da], [qg], [dg], 0.1, lr=0.1, kl_clip=1e-3, precision=p), *wb))(
            (w.clone(), b.clone())),
    }


@pytest.mark.parametrize("op", PRECISION_OPS)
@pytest.mark.parametrize("bad", ["fp16", "TF32", "bf16", 32])
def test_precision_validated(op, bad):
    with pytest.raises(ValueError, match=f"{op}: precision must be None, 'ieee', 'fp32' or 'tf32'"):
        _calls(generator(1))[op](bad)


def _flat(out):
    if isinstance(out, torch.Tensor):
        return [out]
    return [t for o in out for t in _flat(o)]


@pytest.mark.parametrize("op", PRECISION_OPS)
def test_precision_forwarded_only_when_set_and_ignored_by_the_reference(op, monkeypatch):
    seen = []
    real = _ops._run

    def spy(name, *args, **kwargs):
        seen.append(kwargs.get("precision", "absent"))
        return real(name, *args, **kwargs)

    monkeypatch.setattr(_ops, "_run", spy)
    outs = {p: _flat(_calls(generator(2))[op](p)) for p in (None, "ieee", "fp32", "tf32")}
    assert seen == ["absent", "ieee", "fp32", "tf32"]
    for p in ("ieee", "fp32", "tf32"):  # the torch reference computes the same numbers whatever it says
        for got, want in zip(outs[p], outs[None]):
            assert torch.equal(got, want)


def test_custom_op_schemas_take_a_trailing_optional_precision():
    for name in PRECISION_OPS:
        schema = getattr(torch.ops.kfac_fast, name).default._schema
        last = schema.arguments[-1]
        assert last.name == "precision" and str(last.type) == "Optional[str]", (name, str(schema))


def test_opcheck_with_precision():
    gen = generator(3)
    a, g = random_spd(4, dtype=torch.float32, gen=gen), random_spd(3, dtype=torch.float32, gen=gen)
    (da, qa), (dg, qg) = torch.linalg.eigh(a), torch.linalg.eigh(g)
    k, lam = torch.ops.kfac_fast, torch.full((1,), 0.1, dtype=torch.float64)
    f64 = torch.tensor(0.5, dtype=torch.float64)
    torch.library.opcheck(k.update_factor_.default, (a.clone(), randn(5, 3, gen=gen), f64, f64, True, "tf32"))
    torch.library.opcheck(k.precondition_eigen.default, ([randn(3, 4, gen=gen)], [qa], [da], [qg], [dg], lam, "tf32"))
    torch.library.opcheck(k.precondition_eigen_.default, ([randn(3, 3, gen=gen)], [randn(3, gen=gen)], [True], [qa],
                                                          [da], [qg], [dg], lam, f64, f64, "tf32"))


@pytest.mark.parametrize("policy,want", [("tf32", "tf32"), ("fp32", None)])
@pytest.mark.parametrize("kl_clip", [1e-3, None])
def test_preconditioner_precision_reaches_the_eigen_op(policy, want, kl_clip, monkeypatch):
    # KFACPreconditioner(precision="tf32") used to flip only torch's allow_tf32, which the
    # Triton kernels never see; now the op gets precision="tf32" (and nothing for "fp32").
    seen = []
    real = ops.precondition_eigen_

    def spy(*args, **kwargs):
        seen.append(kwargs.get("precision"))
        return real(*args, **kwargs)

    monkeypatch.setattr(ops, "precondition_eigen_", spy)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))
    precond = KFACPreconditioner(model, lr=0.1, damping=1e-2, kl_clip=kl_clip, inv_update_steps=1,
                                 precision=policy)
    for _ in range(2):
        model.zero_grad()
        model(torch.randn(8, 4)).pow(2).mean().backward()
        precond.step()
    assert seen == [want, want]
