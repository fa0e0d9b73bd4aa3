"""KFACPreconditioner: state round trip, accumulation, GradScaler, hooks mode, schedules,
layer selection and argument checks (float64 tiny networks)."""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
from test_preconditioner import ce_batch, cnn, dense_eigen, dw_bar, layer_modules, mlp, oracle_a, oracle_g, run_step
from torch import nn

from kfac_fast import KFACPreconditioner

# float64 oracles: every test here runs with float64 as the default dtype.
pytestmark = pytest.mark.usefixtures("float64_default")


def factors(precond):
    return {n: (layer.a_factor.clone(), layer.g_factor.clone()) for n, layer in precond.layers.items()}


def grads(model):
    return {n: dw_bar(m) for n, m in layer_modules(model).items()}


def assert_same(d1, d2, **tol):
    assert d1.keys() == d2.keys()
    for k in d1:
        for u, v in zip(*(x if isinstance(x, tuple) else (x,) for x in (d1[k], d2[k]))):
            torch.testing.assert_close(u, v, **tol)


# ---------------------------------------------------------------------------------------
# state_dict
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["eigen", "inverse", "ekfac"])
def test_state_dict_round_trip_continues_bit_identically(method):
    torch.manual_seed(0)
    data = [(torch.randn(4, 5), torch.randint(0, 3, (4,))) for _ in range(7)]
    kw = dict(method=method, inv_update_steps=3, factor_decay=0.9, kl_clip=1e-2, lr=0.1,
              factor_dtype=torch.float64)

    def train(model, precond, opt, batches):
        for x, y in batches:
            opt.zero_grad()
            ce_batch(model(x), y).backward()
            precond.step()
            opt.step()

    model = mlp(seed=1)
    precond = KFACPreconditioner(model, **kw)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    train(model, precond, opt, data[:4])
    saved = (copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict()),
             copy.deepcopy(precond.state_dict()))
    train(model, precond, opt, data[4:])

    model2 = mlp(seed=99)
    model2.load_state_dict(saved[0])
    precond2 = KFACPreconditioner(model2, **kw)
    precond2.load_state_dict(saved[2])
    opt2 = torch.optim.SGD(model2.parameters(), lr=0.1, momentum=0.9)
    opt2.load_state_dict(saved[1])
    train(model2, precond2, opt2, data[4:])
    for p, q in zip(model.parameters(), model2.parameters()):
        assert torch.equal(p, q)
    for name in precond.layers:
        assert torch.equal(precond.layers[name].a_factor, precond2.layers[name].a_factor)
        assert precond.layers[name].g_count == precond2.layers[name].g_count == 7
    assert precond2.steps == 7


def test_load_state_dict_rejects_foreign_state():
    precond = KFACPreconditioner(mlp(), factor_dtype=torch.float64)
    with pytest.raises(ValueError, match="method"):
        precond.load_state_dict({"steps": 0, "method": "inverse", "layers": {}})
    with pytest.raises(ValueError, match="layers"):
        precond.load_state_dict({"steps": 0, "method": "eigen", "layers": {"nope": {}}})


# ---------------------------------------------------------------------------------------
# accumulation, hooks mode, GradScaler
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("in_hooks", [False, True])
@pytest.mark.parametrize("method", ["eigen", "ekfac"])
def test_accumulation_equals_one_larger_batch(in_hooks, method):
    torch.manual_seed(3)
    k, x, y = 3, torch.randn(6, 2, 5), torch.randint(0, 3, (6, 2))
    big, small = mlp(seed=7), mlp(seed=7)
    p_big = KFACPreconditioner(big, method=method, kl_clip=None, factor_dtype=torch.float64)
    p_small = KFACPreconditioner(small, method=method, kl_clip=None, factor_dtype=torch.float64,
                                 accumulation_steps=k, update_factors_in_hooks=in_hooks)
    for _ in range(2):  # the second step also exercises beta_k and the hook-mode EKFAC scales
        big.zero_grad()
        small.zero_grad()
        ce_batch(big(x), y).backward()
        for xs, ys in zip(x.chunk(k), y.chunk(k)):
            (ce_batch(small(xs), ys) / k).backward()
        p_big.step()
        p_small.step()
        assert_same(factors(p_big), factors(p_small), rtol=1e-12, atol=1e-14)
        assert_same(grads(big), grads(small), rtol=1e-9, atol=1e-12)
    if method == "ekfac" and not in_hooks:
        for n in p_big.layers:
            torch.testing.assert_close(p_big.layers[n].scales, p_small.layers[n].scales, rtol=1e-10, atol=1e-14)


def test_hooks_mode_matches_held_mode_on_convolutions():
    x, y = torch.randn(3, 2, 9, 12), torch.randint(0, 3, (3,))
    models = []
    for _ in range(2):
        models.append(cnn(seed=5))
        models[-1](x)  # materialise the LazyLinear right after seeding: same weights in both
    held = KFACPreconditioner(models[0], kl_clip=None, factor_dtype=torch.float64)
    hooked = KFACPreconditioner(models[1], kl_clip=None, factor_dtype=torch.float64,
                                update_factors_in_hooks=True)
    run_step(models[0], held, x, y, ce_batch)
    run_step(models[1], hooked, x, y, ce_batch)
    assert_same(factors(held), factors(hooked), rtol=1e-12, atol=1e-14)
    assert_same(grads(models[0]), grads(models[1]), rtol=1e-10, atol=1e-13)
    assert all(not layer.inputs and not layer.grads for layer in hooked.layers.values())


@pytest.mark.parametrize("in_hooks", [False, True])
def test_grad_scaler_gives_the_unscaled_factors(in_hooks):
    x, y = torch.randn(4, 5), torch.randint(0, 3, (4,))
    plain_model, amp_model = mlp(seed=8), mlp(seed=8)
    plain = KFACPreconditioner(plain_model, kl_clip=None, factor_dtype=torch.float64)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 12)
    amp = KFACPreconditioner(amp_model, kl_clip=None, factor_dtype=torch.float64, grad_scaler=scaler,
                             update_factors_in_hooks=in_hooks)
    opt = torch.optim.SGD(amp_model.parameters(), lr=0.0)
    run_step(plain_model, plain, x, y, ce_batch)
    scaler.scale(ce_batch(amp_model(x), y)).backward()
    scaler.unscale_(opt)
    amp.step()
    assert_same(factors(plain), factors(amp), rtol=1e-12, atol=1e-14)
    assert_same(grads(plain_model), grads(amp_model), rtol=1e-9, atol=1e-12)

    # an overflowing step (scale = inf) must leave G untouched and finite
    before = factors(amp)
    scaler._scale.fill_(float("inf"))
    opt.zero_grad()
    scaler.scale(ce_batch(amp_model(x), y)).backward()
    amp.step()
    for n, layer in amp.layers.items():
        assert torch.equal(layer.g_factor, before[n][1])


def test_inplace_activation_after_layer_does_not_change_g():
    x, y = torch.randn(4, 5), torch.randint(0, 3, (4,))
    out = []
    for inplace in (False, True):
        torch.manual_seed(1)
        model = nn.Sequential(nn.Linear(5, 4), nn.ReLU(inplace=inplace), nn.Linear(4, 3))
        precond = KFACPreconditioner(model, kl_clip=None, factor_dtype=torch.float64)
        run_step(model, precond, x, y, ce_batch)
        out.append(factors(precond))
    assert_same(out[0], out[1], rtol=0, atol=0)


# ---------------------------------------------------------------------------------------
# schedules
# ---------------------------------------------------------------------------------------
def test_callable_damping_is_read_at_each_step():
    model = mlp()
    damping = lambda step: 0.01 * (step + 1)  # noqa: E731
    precond = KFACPreconditioner(model, damping=damping, factor_decay=0.0, inv_update_steps=1,
                                 kl_clip=None, factor_dtype=torch.float64)
    for step in range(3):
        x, y = torch.randn(4, 5), torch.randint(0, 3, (4,))
        rec, raw = run_step(model, precond, x, y, ce_batch)
        for n, m in layer_modules(model).items():
            p = dense_eigen(oracle_a(m, rec.inputs[n]), oracle_g(m, rec.grads[n], [4]), raw[n], damping(step))
            torch.testing.assert_close(dw_bar(m), p, rtol=1e-9, atol=1e-12)


def test_update_intervals():
    model = mlp()
    precond = KFACPreconditioner(model, factor_update_steps=2, inv_update_steps=3,
                                 factor_dtype=torch.float64)
    seen = []
    for _ in range(7):
        run_step(model, precond, torch.randn(4, 5), torch.randint(0, 3, (4,)), ce_batch)
        seen.append((precond.layers["0"].a_count, precond.layers["0"].qa))
    assert [c for c, _ in seen] == [1, 1, 2, 2, 3, 3, 4]
    refreshed = [i for i in range(1, 7) if seen[i][1] is not seen[i - 1][1]]
    assert refreshed == [3, 6]


def test_bad_schedule_value_names_the_argument():
    model = mlp()
    precond = KFACPreconditioner(model, damping=lambda s: -1.0, factor_dtype=torch.float64)
    model(torch.randn(2, 5)).sum().backward()
    with pytest.raises(ValueError, match="damping"):
        precond.step()


# ---------------------------------------------------------------------------------------
# layer selection
# ---------------------------------------------------------------------------------------
def test_skip_layers_by_name_class_and_ancestor():
    assert set(KFACPreconditioner(mlp(), skip_layers="^0$").layers) == {"2"}
    assert set(KFACPreconditioner(cnn(), skip_layers=["Conv2d"]).layers) == {"5"}

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(4, 2, batch_first=True)
            self.head = nn.Linear(4, 3)

    assert set(KFACPreconditioner(Net()).layers) == {"attn.out_proj", "head"}
    assert set(KFACPreconditioner(Net(), skip_layers="MultiheadAttention").layers) == {"head"}


def test_unused_and_functionally_called_layers_are_left_alone():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(4, 2, batch_first=True)  # out_proj used functionally
            self.unused = nn.Linear(4, 4)
            self.head = nn.Linear(4, 3)

        def forward(self, x):
            return self.head(self.attn(x, x, x, need_weights=False)[0]).sum(1)

    torch.manual_seed(0)
    net = Net()
    precond = KFACPreconditioner(net, kl_clip=None, factor_dtype=torch.float64)
    for _ in range(2):
        net.zero_grad()
        ce_batch(net(torch.randn(3, 2, 4)), torch.randint(0, 3, (3,))).backward()
        raw = net.attn.out_proj.weight.grad.clone()
        head_raw = net.head.weight.grad.clone()
        precond.step()
        assert torch.equal(net.attn.out_proj.weight.grad, raw)
        assert not torch.equal(net.head.weight.grad, head_raw)
        assert net.unused.weight.grad is None
    assert precond.layers["unused"].a_factor is None
    assert precond.layers["attn.out_proj"].a_count == 0


def test_grouped_conv_is_skipped_with_one_warning_naming_it():
    model = nn.Sequential(nn.Conv2d(4, 4, 3, groups=2), nn.Flatten(), nn.Linear(4, 2))
    with pytest.warns(UserWarning, match="'0'.*groups=2") as record:
        precond = KFACPreconditioner(model)
    assert len([w for w in record if "groups" in str(w.message)]) == 1
    assert set(precond.layers) == {"2"}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model(torch.randn(2, 4, 3, 3)).sum().backward()
        precond.step()


def test_memory_usage_counts_state_bytes():
    model = mlp()
    precond = KFACPreconditioner(model, factor_dtype=torch.float64)
    assert precond.memory_usage() == {"0": 0, "2": 0}
    run_step(model, precond, torch.randn(4, 5), torch.randint(0, 3, (4,)), ce_batch)
    usage = precond.memory_usage()
    # A, G, their eigenvectors (same sizes) and eigenvalues, float64
    assert usage["0"] == 8 * (2 * 6 * 6 + 2 * 4 * 4 + 6 + 4)
    assert usage["2"] == 8 * (2 * 5 * 5 + 2 * 3 * 3 + 5 + 3)


# ---------------------------------------------------------------------------------------
# bad arguments
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs,err,name", [
    (dict(method="newton"), ValueError, "method"),
    (dict(fisher="true"), ValueError, "fisher"),
    (dict(loss_average="mean"), ValueError, "loss_average"),
    (dict(loss_average=0), ValueError, "loss_average"),
    (dict(damping=-1.0), ValueError, "damping"),
    (dict(damping="big"), TypeError, "damping"),
    (dict(factor_decay=1.0), ValueError, "factor_decay"),
    (dict(kl_clip=0.0), ValueError, "kl_clip"),
    (dict(lr=0.0), ValueError, "lr"),
    (dict(inv_update_steps=0), ValueError, "inv_update_steps"),
    (dict(factor_update_steps=1.5), TypeError, "factor_update_steps"),
    (dict(accumulation_steps=0), ValueError, "accumulation_steps"),
    (dict(skip_layers="("), ValueError, "skip_layers"),
    (dict(factor_dtype=torch.float16), TypeError, "factor_dtype"),
    (dict(grad_scaler=object()), TypeError, "grad_scaler"),
    (dict(update_factors_in_hooks=1), TypeError, "update_factors_in_hooks"),
    (dict(skip_layers=".*"), ValueError, "skip_layers"),
])
def test_bad_arguments_name_themselves(kwargs, err, name):
    with pytest.raises(err, match=name):
        KFACPreconditioner(mlp(), **kwargs)


def test_model_must_be_a_module():
    with pytest.raises(TypeError, match="model"):
        KFACPreconditioner(lambda x: x)


def test_bf16_autocast_activations_accumulate_into_fp32_factors():
    x, y = torch.randn(8, 5, dtype=torch.float32), torch.randint(0, 3, (8,))
    out = []
    for amp in (False, True):
        torch.manual_seed(2)
        model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)).float()
        precond = KFACPreconditioner(model, kl_clip=None)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            loss = ce_batch(model(x), y)
        loss.backward()
        precond.step()
        assert all(layer.a_factor.dtype == layer.g_factor.dtype == torch.float32 for layer in precond.layers.values())
        assert all(torch.isfinite(p.grad).all() for p in model.parameters())
        out.append(factors(precond))
    # bf16 keeps 8 bits of mantissa: the factors agree to bf16 accuracy, not better
    assert_same(out[0], out[1], rtol=5e-2, atol=5e-3)


# ---------------------------------------------------------------------------------------
# the Curvature extension point (what the tridiagonal variant plugs into)
# ---------------------------------------------------------------------------------------
class TakeOver:
    """A curvature that leaves `name`'s gradient unpreconditioned and records its calls."""

    state_key = "take_over"

    def __init__(self, name):
        self.name, self.calls, self.loaded = name, [], None

    def update(self, layers, context):
        self.calls.append(("update", sorted(layer.name for layer in layers), context.dtype))

    def refresh(self, layers, damping_of):
        self.calls.append(("refresh", sorted(layer.name for layer in layers), damping_of(self.name)))

    def precondition(self, grads):
        self.calls.append(("precondition", sorted(grads)))
        return {self.name: grads[self.name].clone()} if self.name in grads else {}

    def state_dict(self):
        return {"calls": len(self.calls)}

    def load_state_dict(self, entry):
        self.loaded = entry

    def memory_usage(self):
        return {"take_over": 7}


def test_curvature_extension_is_called_by_every_job():
    torch.manual_seed(0)
    x, y = torch.randn(6, 5), torch.randint(0, 3, (6,))
    model, twin = mlp(), mlp()
    plain = KFACPreconditioner(twin, damping=0.1, kl_clip=None, factor_dtype=torch.float64)
    precond = KFACPreconditioner(model, damping=0.1, kl_clip=None, factor_dtype=torch.float64)
    ext = TakeOver("0")
    precond.add_curvature(ext)
    _, raw = run_step(model, precond, x, y, ce_batch)
    run_step(twin, plain, x, y, ce_batch)
    assert [c[0] for c in ext.calls] == ["update", "refresh", "precondition"]
    assert ext.calls[0][1:] == (["0", "2"], torch.float64) and ext.calls[1][1:] == (["0", "2"], 0.1)
    # the extension's layer keeps P = dW_bar (nu = 1 without a KL clip); the rest as usual
    torch.testing.assert_close(dw_bar(model[0]), raw["0"], rtol=0, atol=0)
    torch.testing.assert_close(dw_bar(model[2]), dw_bar(twin[2]))
    state = precond.state_dict()
    assert state["take_over"] == {"calls": 3}
    precond.load_state_dict(state)
    assert ext.loaded == {"calls": 3}
    assert precond.memory_usage()["take_over"] == 7
