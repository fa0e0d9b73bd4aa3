"""Real training code: padded sequences (row masks), per-layer damping, precision policy.

Oracles are independent of the preconditioner: our own hooks record each layer's input
and output gradient, A and G follow docs/design.md from the real rows only, and P is the
dense Kronecker solve `solve(kron(A, G) + damping I, vec(dW_bar))` with each layer's own
damping.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

from kfac_fast import KFACPreconditioner, ops
from kfac_fast.curves import make_curves
from kfac_fast.demo import KFAC_SETTINGS, bce_loss, build_autoencoder
from kfac_fast.layers.linear import use_reduce
from kfac_fast.precision import eigen_denominators, precondition_bf16


# ---------------------------------------------------------------------------------------
# oracle helpers
# ---------------------------------------------------------------------------------------
class Recorder:
    """Each module's input and output gradient of the last forward/backward."""

    def __init__(self, modules: dict):
        self.inputs, self.grads = {}, {}
        for name, m in modules.items():
            m.register_forward_hook(self._hook(name))

    def _hook(self, name):
        def hook(module, inputs, output):
            self.inputs[name] = inputs[0].detach().clone()
            output.register_hook(lambda g: self.grads.__setitem__(name, g.detach().clone()))
        return hook


def bar(rows, bias: bool):
    return torch.cat([rows, torch.ones(rows.shape[0], 1, dtype=rows.dtype)], 1) if bias else rows


def dense_solve(a, g, grad_bar, damping):
    k = torch.kron(a, g) + damping * torch.eye(a.shape[0] * g.shape[0], dtype=a.dtype)
    return torch.linalg.solve(k, grad_bar.mT.reshape(-1)).reshape(a.shape[0], g.shape[0]).mT


def grad_bar(m):
    w = m.weight.grad.reshape(m.weight.shape[0], -1)
    return torch.cat([w, m.bias.grad[:, None]], 1) if m.bias is not None else w


def rel(a, b):
    return float((a - b).norm() / b.norm())


# ---------------------------------------------------------------------------------------
# 1. padded sequences
# ---------------------------------------------------------------------------------------
D_IN, HID, D_OUT = 5, 7, 3


def token_mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(D_IN, HID), nn.Tanh(), nn.Linear(HID, D_OUT, bias=False)).double()


def token_loss(out, y, mask):
    """Mean over real tokens of a per-token squared error (padding excluded)."""
    per = ((out - y) ** 2).sum(-1)
    return torch.where(mask, per, torch.zeros_like(per)).sum() / mask.sum()


def padded_batch(lengths, T, seed=1):
    gen = torch.Generator().manual_seed(seed)
    n = len(lengths)
    x = torch.randn(n, T, D_IN, generator=gen, dtype=torch.float64)
    y = torch.randn(n, T, D_OUT, generator=gen, dtype=torch.float64)
    mask = torch.arange(T)[None, :] < torch.tensor(lengths)[:, None]
    # padding rows far from the data: any leak into A or G would be obvious
    x = torch.where(mask[..., None], x, torch.full_like(x, 1e3))
    return x, y, mask


@pytest.mark.parametrize("in_hooks", [False, True])
def test_row_mask_factors_and_step_match_real_rows_oracle(in_hooks):
    lengths, T, damping = [4, 1, 6], 6, 1e-2
    model = token_mlp()
    rec = Recorder({"0": model[0], "2": model[2]})
    pre = KFACPreconditioner(model, damping=damping, kl_clip=None, loss_average="tokens",
                             factor_dtype=torch.float64, update_factors_in_hooks=in_hooks)
    x, y, mask = padded_batch(lengths, T)
    pre.set_row_mask(mask)
    token_loss(model(x), y, mask).backward()
    grads = {n: grad_bar(model[int(n)]).clone() for n in ("0", "2")}
    pre.step()

    n, s = len(lengths), sum(lengths)  # N examples; S = R = the real tokens
    for name in ("0", "2"):
        m = model[int(name)]
        a_rows = bar(rec.inputs[name][mask], m.bias is not None)
        g_rows = s * rec.grads[name][mask]
        a = a_rows.T @ a_rows / s
        g = g_rows.T @ g_rows / n
        layer = pre.layers[name]
        torch.testing.assert_close(layer.a_factor, a, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(layer.g_factor, g, rtol=1e-10, atol=1e-12)
        p = dense_solve(a, g, grads[name], damping)
        torch.testing.assert_close(grad_bar(m), p, rtol=1e-7, atol=1e-10)
    assert pre._row_mask is None  # step() ends the mask's batch


def test_padded_batch_with_mask_equals_unpadded_batch():
    """Every sequence has L real tokens, padding at different places: with the mask, the
    padded (N, T) batch is the unpadded (N, L) batch, factors and preconditioned grads."""
    N, L, T = 3, 4, 7
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(N, L, D_IN, generator=gen, dtype=torch.float64)
    y = torch.randn(N, L, D_OUT, generator=gen, dtype=torch.float64)
    starts = [0, 3, 1]  # left, right and both-side padding
    mask = torch.zeros(N, T, dtype=torch.bool)
    xp = torch.full((N, T, D_IN), -50.0, dtype=torch.float64)
    yp = torch.zeros(N, T, D_OUT, dtype=torch.float64)
    for i, s0 in enumerate(starts):
        mask[i, s0:s0 + L] = True
        xp[i, s0:s0 + L], yp[i, s0:s0 + L] = x[i], y[i]

    results = []
    for xi, yi, mi, use_mask in ((x, y, torch.ones(N, L, dtype=torch.bool), False), (xp, yp, mask, True)):
        model = token_mlp()
        pre = KFACPreconditioner(model, damping=1e-2, kl_clip=1e-3, loss_average="tokens",
                                 factor_dtype=torch.float64)
        for _ in range(2):  # the second step runs the running average too
            model.zero_grad()
            if use_mask:
                pre.set_row_mask(mi)
            token_loss(model(xi), yi, mi).backward()
            pre.step()
        results.append([pre.layers["0"].a_factor, pre.layers["2"].g_factor,
                        model[0].weight.grad, model[0].bias.grad, model[2].weight.grad])
    for got, want in zip(results[1], results[0]):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)


def test_row_mask_skips_layers_with_other_leading_dims():
    """A head on pooled (N, d) features is not masked: its A counts all N rows."""
    model = nn.Sequential(nn.Linear(D_IN, HID)).double()
    head = nn.Linear(HID, 2).double()
    pre = KFACPreconditioner(nn.ModuleDict({"tok": model, "head": head}), kl_clip=None,
                             factor_dtype=torch.float64)
    x, _, mask = padded_batch([2, 3], 3)
    pre.set_row_mask(mask)
    h = model(x)
    pooled = torch.where(mask[..., None], h, torch.zeros_like(h)).sum(1)
    head(pooled).sum().backward()
    pre.step()
    rows = bar(pooled.detach(), True)
    torch.testing.assert_close(pre.layers["head"].a_factor, rows.T @ rows / 2)


def test_set_row_mask_rejects_bad_masks():
    pre = KFACPreconditioner(token_mlp())
    with pytest.raises(TypeError, match="torch.bool"):
        pre.set_row_mask(torch.ones(2, 3))
    with pytest.raises(TypeError, match="mask must be"):
        pre.set_row_mask([[True]])
    ekfac = KFACPreconditioner(token_mlp(), method="ekfac")
    with pytest.raises(ValueError, match="ekfac"):
        ekfac.set_row_mask(torch.ones(2, 3, dtype=torch.bool))


# ---------------------------------------------------------------------------------------
# 2. per-layer damping
# ---------------------------------------------------------------------------------------
def two_layer(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()


def run_one_step(damping, method="eigen", step_count=1):
    model = two_layer()
    rec = Recorder({"0": model[0], "2": model[2]})
    pre = KFACPreconditioner(model, damping=damping, kl_clip=None, method=method,
                             factor_decay=0.0, factor_dtype=torch.float64)
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(8, 4, generator=gen, dtype=torch.float64)
    for _ in range(step_count):
        model.zero_grad()
        model(x).pow(2).mean(0).sum().backward()
        grads = {n: grad_bar(model[int(n)]).clone() for n in ("0", "2")}
        pre.step()
    out = {}
    for name in ("0", "2"):
        m = model[int(name)]
        a_rows = bar(rec.inputs[name], True)
        g_rows = 8 * rec.grads[name]
        out[name] = (a_rows.T @ a_rows / 8, g_rows.T @ g_rows / 8, grads[name], grad_bar(m))
    return out


@pytest.mark.parametrize("damping, expect", [
    ({"0": 1e-1, "default": 1e-3}, {"0": 1e-1, "2": 1e-3}),
    ({r"\d": 3e-2}, {"0": 3e-2, "2": 3e-2}),
    ({"2": lambda step: 0.5 / (step + 1), r"[0-9]": 1e-2}, {"0": 1e-2, "2": 0.25}),
    (lambda name, step: 1e-2 * (int(name) + 1) * (step + 1), {"0": 2e-2, "2": 6e-2}),
])
def test_per_layer_damping_eigen_matches_dense_oracles(damping, expect):
    out = run_one_step(damping, step_count=2)  # the second step: schedules see step 1
    for name, (a, g, grad, got) in out.items():
        torch.testing.assert_close(got, dense_solve(a, g, grad, expect[name]), rtol=1e-7, atol=1e-10)


def test_per_layer_damping_inverse_uses_each_layers_pi_damping():
    lams = {"0": 2e-1, "2": 1e-3}
    out = run_one_step({"0": lams["0"], "default": lams["2"]}, method="inverse")
    for name, (a, g, grad, got) in out.items():
        gamma = lams[name] ** 0.5
        pi = ((torch.trace(a) / a.shape[0]) / (torch.trace(g) / g.shape[0])) ** 0.5
        want = torch.linalg.solve(g + gamma / pi * torch.eye(g.shape[0], dtype=g.dtype), grad) \
            @ torch.linalg.inv(a + pi * gamma * torch.eye(a.shape[0], dtype=a.dtype))
        torch.testing.assert_close(got, want, rtol=1e-7, atol=1e-10)


def test_per_layer_damping_errors_name_the_problem():
    with pytest.raises(ValueError, match="layer '2' matches no key"):
        KFACPreconditioner(two_layer(), damping={"0": 1e-2})
    with pytest.raises(ValueError, match="bad regex"):
        KFACPreconditioner(two_layer(), damping={"(": 1e-2})
    with pytest.raises(ValueError, match=r"damping\['0'\] must be > 0"):
        KFACPreconditioner(two_layer(), damping={"0": -1.0, "default": 1e-3})
    pre = KFACPreconditioner(two_layer(), damping=lambda name, step: -1.0)
    with pytest.raises(ValueError, match=r"damping\('0', step\)"):
        pre.damping.for_layers(["0"], 0)


# ---------------------------------------------------------------------------------------
# 3. precision policy
# ---------------------------------------------------------------------------------------
def demo_state(steps=3, batch=128):
    """The demo autoencoder after a few K-FAC steps (its settings, empirical Fisher)."""
    torch.manual_seed(0)
    model = build_autoencoder(seed=0)
    settings = dict(KFAC_SETTINGS, fisher="empirical", kl_clip=None)
    pre = KFACPreconditioner(model, **settings)
    data = make_curves(batch * steps, seed=0)
    for i in range(steps):
        model.zero_grad()
        xb = data[i * batch:(i + 1) * batch]
        bce_loss(model(xb), xb).backward()
        pre.step()
    return model, pre, settings["damping"]


def test_bf16_precision_error_on_demo_factors():
    """The figures quoted in kfac_fast.precision: the demo's own gradient after 3 steps."""
    model, pre, damping = demo_state()
    layers = list(pre.layers.values())
    xb = make_curves(128, seed=9)
    model.zero_grad()
    bce_loss(model(xb), xb).backward()
    grads = [grad_bar(layer.module).clone() for layer in layers]
    qa, da = [layer.qa for layer in layers], [layer.da for layer in layers]
    qg, dg = [layer.qg for layer in layers], [layer.dg for layer in layers]
    exact = ops.precondition_eigen([g.double() for g in grads], [q.double() for q in qa],
                                   [d.double() for d in da], [q.double() for q in qg],
                                   [d.double() for d in dg], damping)
    fp32 = ops.precondition_eigen(grads, qa, da, qg, dg, damping)
    bf16 = precondition_bf16(grads, qa, qg, eigen_denominators(da, dg, damping))
    err32 = rel(torch.cat([p.reshape(-1) for p in fp32]).double(), torch.cat([p.reshape(-1) for p in exact]))
    err16 = rel(torch.cat([p.reshape(-1) for p in bf16]).double(), torch.cat([p.reshape(-1) for p in exact]))
    print(f"demo factors: relative error of P, fp32 {err32:.2e}, bf16 {err16:.2e}")
    # bf16 keeps 8 bits and the decoder's factors are ill-conditioned: it must really
    # round (far above fp32) and stay a direction (a transposed product is off by ~1)
    assert err32 < 1e-4
    assert 100 * err32 < err16 < 0.5


@pytest.mark.parametrize("precision", ["tf32", "bf16"])
def test_precision_policy_in_the_step(precision):
    """The step with a precision policy against the fp32 step on the same state: tf32 is
    a no-op on CPU (bit-identical), bf16 close but not identical."""
    model, pre, _ = demo_state(steps=2)
    twin = build_autoencoder(seed=0)
    twin.load_state_dict(model.state_dict())
    other = KFACPreconditioner(twin, **dict(KFAC_SETTINGS, fisher="empirical", kl_clip=None),
                               precision=precision)
    other.load_state_dict(pre.state_dict())
    xb = make_curves(64, seed=9)
    grads = []
    for p, net in ((pre, model), (other, twin)):
        net.zero_grad()
        bce_loss(net(xb), xb).backward()
        p.repeat_precondition()
        grads.append(torch.cat([q.grad.reshape(-1) for q in net.parameters()]))
    if precision == "tf32":
        assert torch.equal(grads[0], grads[1])
    else:
        assert 1e-3 < rel(grads[1], grads[0]) < 0.5


def test_precision_argument_is_checked():
    with pytest.raises(ValueError, match="precision must be one of"):
        KFACPreconditioner(two_layer(), precision="fp16")
    with pytest.raises(ValueError, match="method='inverse'"):
        KFACPreconditioner(two_layer(), method="inverse", precision="bf16")


# ---------------------------------------------------------------------------------------
# 4. K-FAC-reduce for Linear layers over sequences (kfac_fast.layers.linear.use_reduce)
# ---------------------------------------------------------------------------------------
def seq_loss(out, y):
    """Mean over all N*T tokens of a per-token squared error."""
    return ((out - y) ** 2).sum(-1).mean()


@pytest.mark.parametrize("in_hooks", [False, True])
@pytest.mark.parametrize("loss_average", ["tokens", "batch"])
def test_linear_reduce_factors_and_step_match_the_reduce_oracle(loss_average, in_hooks):
    """A = (1/N) sum_n abar abar^T (inputs averaged over the sequence, ones-column
    included), G = (1/N) sum_n (S gsum)(S gsum)^T (output gradients summed), from our own
    hooks in float64; P the dense Kronecker solve."""
    N, T, damping = 3, 5, 1e-2
    model = token_mlp()
    rec = Recorder({"0": model[0], "2": model[2]})
    pre = KFACPreconditioner(model, damping=damping, kl_clip=None, loss_average=loss_average,
                             factor_dtype=torch.float64, update_factors_in_hooks=in_hooks)
    assert use_reduce(pre) == ["0", "2"]
    assert all(layer.kind == "linear_reduce" for layer in pre.layers.values())
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(N, T, D_IN, generator=gen, dtype=torch.float64)
    y = torch.randn(N, T, D_OUT, generator=gen, dtype=torch.float64)
    seq_loss(model(x), y).backward()
    grads = {n: grad_bar(model[int(n)]).clone() for n in ("0", "2")}
    pre.step()
    s = N * T if loss_average == "tokens" else N
    for name in ("0", "2"):
        m = model[int(name)]
        a_rows = bar(rec.inputs[name].mean(1), m.bias is not None)
        g_rows = s * rec.grads[name].sum(1)
        a, g = a_rows.T @ a_rows / N, g_rows.T @ g_rows / N
        layer = pre.layers[name]
        torch.testing.assert_close(layer.a_factor, a, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(layer.g_factor, g, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(grad_bar(m), dense_solve(a, g, grads[name], damping), rtol=1e-7, atol=1e-10)


def test_linear_reduce_is_exact_for_one_example_with_shared_inputs_and_expand_is_not():
    """One sequence whose T inputs are equal: every layer's input is the same at each
    position, its gradient is gsum abar^T, and reduce's A (x) G is the exact (empirical)
    Fisher block vec(dW_bar) vec(dW_bar)^T; expand's is not."""
    T = 4
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(1, 1, D_IN, generator=gen, dtype=torch.float64).expand(1, T, D_IN)
    y = torch.randn(1, T, D_OUT, generator=gen, dtype=torch.float64)
    errors = {}
    for kinds in ("linear_reduce", "expand"):
        model = token_mlp()
        pre = KFACPreconditioner(model, kl_clip=None, loss_average="batch", factor_dtype=torch.float64)
        if kinds == "linear_reduce":
            use_reduce(pre)
        seq_loss(model(x), y).backward()
        pre.step()  # factors only matter here (S = N = 1: the loss is the example's)
        for name in ("0", "2"):
            model.zero_grad()
            seq_loss(model(x), y).backward()
            v = grad_bar(model[int(name)]).mT.reshape(-1)
            layer = pre.layers[name]
            exact = torch.outer(v, v)
            errors[kinds, name] = rel(torch.kron(layer.a_factor, layer.g_factor), exact)
    assert errors["linear_reduce", "0"] < 1e-12 and errors["linear_reduce", "2"] < 1e-12
    assert errors["expand", "0"] > 1e-2 and errors["expand", "2"] > 1e-2


def test_linear_reduce_without_a_sequence_is_expand_and_use_reduce_checks_its_arguments():
    """(N, d) inputs: the same factors as the default Linear. use_reduce refuses method
    'ekfac' (its per-example gradients are not the reduced rows'), a preconditioner that
    has stepped, and names that are not its Linear layers; it converts only the named."""
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(6, D_IN, generator=gen, dtype=torch.float64)
    y = torch.randn(6, D_OUT, generator=gen, dtype=torch.float64)
    factors = []
    for reduce in (True, False):
        model = token_mlp()
        pre = KFACPreconditioner(model, kl_clip=None, factor_dtype=torch.float64)
        if reduce:
            use_reduce(pre)
        seq_loss(model(x), y).backward()
        pre.step()
        factors.append([pre.layers[n].a_factor for n in ("0", "2")] + [pre.layers[n].g_factor for n in ("0", "2")])
    for got, want in zip(*factors):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)
    with pytest.raises(ValueError, match="before the first step"):
        use_reduce(pre)
    with pytest.raises(ValueError, match="method='ekfac'"):
        use_reduce(KFACPreconditioner(token_mlp(), method="ekfac"))
    pre = KFACPreconditioner(nn.Sequential(token_mlp(), nn.Embedding(4, 3)))
    with pytest.raises(ValueError, match=r"layers \['1'\] are not registered nn.Linear"):
        use_reduce(pre, ["0.0", "1"])
    with pytest.raises(TypeError, match="layers"):
        use_reduce(pre, 3)
    assert use_reduce(pre, "0.2") == ["0.2"]
    assert [layer.kind for layer in pre.layers.values()] == ["linear", "linear_reduce", "embedding"]
    with pytest.raises(ValueError, match=r"layers \['0.2'\]"):  # already reduce
        use_reduce(pre, ["0.2"])


def test_linear_reduce_and_row_masks_refuse_each_other():
    """K-FAC-reduce is not row-maskable: padded positions would enter its input mean, its
    summed output gradient and the "tokens" scale. set_row_mask after use_reduce and
    use_reduce after set_row_mask both raise; None still clears."""
    mask = torch.tensor([[True, True, False], [True, False, False]])
    pre = KFACPreconditioner(token_mlp())
    use_reduce(pre, ["2"])
    with pytest.raises(ValueError, match=r"layer '2' is K-FAC-reduce .*not supported with K-FAC-reduce"):
        pre.set_row_mask(mask)
    assert pre._row_mask is None
    pre.set_row_mask(None)
    pre = KFACPreconditioner(token_mlp())
    pre.set_row_mask(mask)
    with pytest.raises(ValueError, match="row mask is set.*not supported with K-FAC-reduce"):
        use_reduce(pre)
    assert [layer.kind for layer in pre.layers.values()] == ["linear", "linear"]
    pre.set_row_mask(None)
    assert use_reduce(pre) == ["0", "2"]


@pytest.mark.parametrize("in_hooks", [False, True])
def test_use_reduce_refuses_layers_that_already_hold_captures(in_hooks):
    """A forward/backward captured before use_reduce (no step yet) would mix expand inputs
    with reduce gradients in the first update: refused, for held and hooks-mode captures,
    after a forward alone too."""
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(2, 3, D_IN, generator=gen, dtype=torch.float64)
    y = torch.randn(2, 3, D_OUT, generator=gen, dtype=torch.float64)
    for backward in (True, False):
        model = token_mlp()
        pre = KFACPreconditioner(model, update_factors_in_hooks=in_hooks)
        loss = seq_loss(model(x), y)
        if backward:
            loss.backward()
        with pytest.raises(ValueError, match=r"layers \['0', '2'\] already hold captures"):
            use_reduce(pre)
        assert [layer.kind for layer in pre.layers.values()] == ["linear", "linear"]
    model = token_mlp()
    pre = KFACPreconditioner(model)
    with torch.no_grad():
        model(x)  # not captured: nothing held
    assert use_reduce(pre) == ["0", "2"]


def test_linear_reduce_empty_sequence_gives_finite_factors():
    """L = 0 positions: each example's input mean is taken as zeros (not mean's NaN over
    an empty dim); its gradient sum is zeros already. The factors stay finite."""
    model = token_mlp()
    pre = KFACPreconditioner(model, kl_clip=None, factor_dtype=torch.float64)
    use_reduce(pre)
    layer = pre.layers["0"]
    a = layer.batched_input(torch.randn(2, 0, D_IN, dtype=torch.float64))
    assert a.shape == (2, D_IN) and torch.equal(a, torch.zeros(2, D_IN, dtype=torch.float64))
    x = torch.randn(2, 3, D_IN, dtype=torch.float64)
    torch.testing.assert_close(layer.batched_input(x), x.mean(1), rtol=0, atol=0)
    g = layer.grad_rows(torch.randn(2, 0, D_OUT, dtype=torch.float64))
    assert g.shape == (2, 0, D_OUT)
