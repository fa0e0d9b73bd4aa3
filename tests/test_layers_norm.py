"""Norm layer kinds (opt-in): nn.LayerNorm (bias or not) and nn.RMSNorm as per-feature
scale-and-shift blocks (kfac_fast/layers/scale_shift.py, docs/design.md "Normalisation layers").

Oracle: the Fisher built by brute force in float64 from per-example gradients (one
autograd.grad per example), v_n = S * dL_n/dtheta, F = (1/N) sum_n v_n v_n^T (dense over
[gamma | beta]); the kind's block is F's per-feature k x k diagonal blocks, and the
preconditioned gradient is (B + damping I)^-1 grad with B those blocks as a dense matrix.
"""
from __future__ import annotations

import contextlib
import copy
import warnings

import pytest
import torch
from torch import nn

from kfac_fast import KFACPreconditioner, layers
from kfac_fast.fisher import sampled_output_grad
from kfac_fast.layers.scale_shift import block_statistics_, precondition_blocks

DAMPING = 0.05
NORMS = ("layernorm", "rmsnorm")


def make_norm(kind: str, shape, *, bias: bool = True, eps=1e-5):
    if kind == "layernorm":
        return nn.LayerNorm(shape, eps=eps, bias=bias)
    return nn.RMSNorm(shape, eps=eps)


def norm_precond(model, **kw):
    """A preconditioner that registers the model's norms (extra_kinds) besides its Linears."""
    kw = {**dict(damping=DAMPING, kl_clip=None, factor_dtype=torch.float64), **kw}
    return KFACPreconditioner(model, extra_kinds=NORMS, **kw)


class NormNet(nn.Module):
    """Linear -> norm (over `shape`, the last dims) -> tanh -> Linear."""

    def __init__(self, norm: nn.Module, shape=(6,), d_in=3, d_out=2):
        super().__init__()
        self.shape = tuple(shape)
        width = int(torch.tensor(self.shape).prod())
        self.inp = nn.Linear(d_in, width)
        self.norm = norm
        self.out = nn.Linear(width, d_out)

    def forward(self, x):
        h = self.inp(x)
        h = self.norm(h.reshape(*h.shape[:-1], *self.shape))
        return self.out(torch.tanh(h.reshape(*h.shape[:len(h.shape) - len(self.shape)], -1)))


def params_of(norm):
    return [norm.weight] + ([norm.bias] if getattr(norm, "bias", None) is not None else [])


def example_losses(out, y, average):
    """The loss terms of each example (L = their sum) and S (docs/design.md)."""
    sq = (out - y).square().reshape(out.shape[0], -1, out.shape[-1]).sum(-1)  # (N, rows)
    if average == "batch":
        return sq.sum(1) / out.shape[0], out.shape[0]
    return sq.sum(1) / sq.numel(), sq.numel()


def oracle_fisher(model, norm, x, y, average):
    """Dense (k d, k d) Fisher over [gamma | beta] from per-example gradients."""
    losses, s = example_losses(model(x), y, average)
    vs = []
    for n in range(x.shape[0]):
        grads = torch.autograd.grad(losses[n], params_of(norm), retain_graph=True)
        vs.append(s * torch.cat([g.reshape(-1) for g in grads]))
    v = torch.stack(vs)
    return v.T @ v / x.shape[0]


def blocks_of(fisher, d, k):
    """The per-feature k x k diagonal blocks of a dense Fisher, as (k, k, d)."""
    idx = torch.arange(d)
    return torch.stack([torch.stack([fisher[i * d + idx, j * d + idx] for j in range(k)]) for i in range(k)])


def block_matrix(blocks):
    """(k, k, d) blocks as the dense (k d, k d) matrix they stand for."""
    k, _, d = blocks.shape
    out = torch.zeros(k * d, k * d, dtype=blocks.dtype)
    idx = torch.arange(d)
    for i in range(k):
        for j in range(k):
            out[i * d + idx, j * d + idx] = blocks[i, j]
    return out


def dense_precondition(blocks, grad_vec, damping=DAMPING):
    m = block_matrix(blocks)
    return torch.linalg.solve(m + damping * torch.eye(m.shape[0], dtype=m.dtype), grad_vec)


def flat_grads(norm):
    return torch.cat([p.grad.reshape(-1) for p in params_of(norm)])


CASES = [  # (kind, bias, normalized shape, leading dims of the input)
    ("layernorm", True, (6,), (5,)),
    ("layernorm", True, (6,), (4, 3)),
    ("layernorm", False, (6,), (4, 3)),
    ("layernorm", True, (2, 3), (3, 4)),
    ("rmsnorm", False, (6,), (5,)),
    ("rmsnorm", False, (6,), (4, 3)),
    ("rmsnorm", False, (2, 3), (3, 4)),
]


@pytest.mark.parametrize("method", ["eigen", "inverse", "ekfac"])
@pytest.mark.parametrize("average", ["batch", "tokens"])
@pytest.mark.parametrize("kind, bias, shape, lead", CASES)
def test_block_and_step_match_brute_force_fisher(kind, bias, shape, lead, average, method):
    torch.manual_seed(hash((kind, bias, shape, lead)) % 1000)
    norm = make_norm(kind, shape, bias=bias)
    model = NormNet(norm, shape).double()
    with torch.no_grad():  # not the initial ones and zeros
        for p in params_of(norm):
            p.add_(0.3 * torch.randn_like(p))
    x, y = torch.randn(*lead, 3, dtype=torch.float64), torch.randn(*lead, 2, dtype=torch.float64)
    fisher = oracle_fisher(model, norm, x, y, average)  # before the hooks: not captured
    pc = norm_precond(model, loss_average=average, method=method)
    assert isinstance(pc.layers["norm"], layers.ScaleShift)
    losses, _ = example_losses(model(x), y, average)
    losses.sum().backward()
    raw = flat_grads(norm).clone()
    pc.step()

    d, k = norm.weight.numel(), 1 + int(bias and kind == "layernorm")
    layer = pc.layers["norm"]
    expected = blocks_of(fisher, d, k)
    assert layer.a_factor.shape == (k, k, d) and layer.g_factor is None
    torch.testing.assert_close(layer.a_factor, expected, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(flat_grads(norm), dense_precondition(expected, raw), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("kind, eps", [("rmsnorm", None), ("layernorm", 1e-3), ("rmsnorm", 1e-3)])
def test_module_eps_is_used(kind, eps):
    """Inputs whose variance is near eps: xhat depends on it (RMSNorm's eps=None is the
    float64 machine eps here, as torch computes)."""
    torch.manual_seed(16)
    norm = nn.RMSNorm(6, eps=eps) if kind == "rmsnorm" else nn.LayerNorm(6, eps=eps)
    model = NormNet(norm).double()
    with torch.no_grad():
        model.inp.weight.mul_(1e-2)
        model.inp.bias.mul_(1e-2)
        for p in params_of(norm):
            p.add_(0.3 * torch.randn_like(p))
    x, y = torch.randn(5, 4, 3, dtype=torch.float64), torch.randn(5, 4, 2, dtype=torch.float64)
    fisher = oracle_fisher(model, norm, x, y, "batch")
    pc = norm_precond(model)
    example_losses(model(x), y, "batch")[0].sum().backward()
    pc.step()
    layer = pc.layers["norm"]
    torch.testing.assert_close(layer.a_factor, blocks_of(fisher, 6, layer.a_dim), rtol=1e-9, atol=1e-12)


def test_norms_are_opt_in():
    ln, rms = nn.LayerNorm(4), nn.RMSNorm(4)
    assert not layers.is_layer(ln) and not layers.is_layer(rms)
    assert layers.layer_class(ln, ("layernorm",)) is layers.LayerNorm
    assert layers.layer_class(rms, ["rmsnorm"]) is layers.RMSNorm
    assert layers.layer_class(rms, ("layernorm",)) is None
    with pytest.raises(TypeError, match="nn.LayerNorm with extra_kinds='layernorm'"):
        layers.make_layer("ln", ln)  # not named: not a layer
    assert type(layers.make_layer("ln", ln, NORMS)) is layers.LayerNorm
    assert layers.opt_in_kinds() == NORMS
    assert layers.check_extra_kinds("layernorm") == ("layernorm",)
    with pytest.raises(ValueError, match="extra_kinds: unknown opt-in kind 'batchnorm'"):
        layers.check_extra_kinds(["batchnorm"])
    with pytest.raises(ValueError, match="extra_kinds: unknown opt-in kind 'linear'"):
        layers.check_extra_kinds(("linear",))
    with pytest.raises(TypeError, match="extra_kinds"):
        layers.check_extra_kinds(3)
    with pytest.raises(TypeError, match="extra_kinds entries"):
        layers.check_extra_kinds([nn.LayerNorm])
    assert "nn.LayerNorm with extra_kinds='layernorm'" in layers.registry.known_kinds()
    why = layers.unsupported_reason(nn.LayerNorm(4, elementwise_affine=False), "eigen", NORMS)
    assert why == "LayerNorm with elementwise_affine=False (it has no parameters to precondition)"
    assert layers.unsupported_reason(nn.RMSNorm(4), "ekfac", NORMS) is None


def test_extra_kinds_selects_the_norms():
    model = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Linear(4, 4), nn.RMSNorm(4),
                          nn.LayerNorm(4, elementwise_affine=False))
    with pytest.warns(UserWarning, match="skipping layer '4'"):
        assert sorted(KFACPreconditioner(model, extra_kinds="layernorm").layers) == ["0", "1", "2"]
    assert sorted(KFACPreconditioner(model, extra_kinds=["rmsnorm"]).layers) == ["0", "2", "3"]
    with pytest.warns(UserWarning, match="skipping layer '4': LayerNorm with elementwise_affine=False"):
        both = KFACPreconditioner(model, extra_kinds=NORMS, skip_layers=r"^1$")
    assert sorted(both.layers) == ["0", "2", "3"]  # skip_layers still applies
    with pytest.raises(ValueError, match="extra_kinds: unknown opt-in kind 'norm'"):
        KFACPreconditioner(model, extra_kinds="norm")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # without extra_kinds the norms are not layers: no warning
        assert sorted(KFACPreconditioner(model).layers) == ["0", "2"]


def test_default_preconditioner_leaves_norm_gradients_plain():
    torch.manual_seed(3)
    model = NormNet(nn.LayerNorm(6)).double()
    pc = KFACPreconditioner(model, damping=DAMPING, kl_clip=None)
    assert sorted(pc.layers) == ["inp", "out"]
    model(torch.randn(5, 3, dtype=torch.float64)).square().sum().backward()
    raw = flat_grads(model.norm).clone()
    pc.step()
    assert torch.equal(flat_grads(model.norm), raw)


def test_mixed_model_linears_unchanged_and_norms_exact():
    """Linear + LayerNorm + RMSNorm over sequences: the Linear layers get what a
    preconditioner without the norms gives them; each norm gets its own exact block."""
    torch.manual_seed(4)

    class Mixed(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(3, 5)
            self.ln = nn.LayerNorm(5)
            self.b = nn.Linear(5, 4)
            self.rms = nn.RMSNorm(4)
            self.c = nn.Linear(4, 2)

        def forward(self, x):
            return self.c(torch.tanh(self.rms(self.b(torch.tanh(self.ln(self.a(x)))))))

    model = Mixed().double()
    with torch.no_grad():
        for p in list(model.ln.parameters()) + list(model.rms.parameters()):
            p.add_(0.2 * torch.randn_like(p))
    plain, oracle = copy.deepcopy(model), copy.deepcopy(model)  # copied before any hook
    xs = [torch.randn(4, 3, 3, dtype=torch.float64) for _ in range(3)]
    ys = [torch.randn(4, 3, 2, dtype=torch.float64) for _ in range(3)]
    pc = norm_precond(model, loss_average="tokens", kl_clip=1e-3, lr=0.1)
    ref = KFACPreconditioner(plain, damping=DAMPING, kl_clip=None, factor_dtype=torch.float64,
                             loss_average="tokens")
    assert sorted(pc.layers) == ["a", "b", "c", "ln", "rms"] and sorted(ref.layers) == ["a", "b", "c"]
    for step, (x, y) in enumerate(zip(xs, ys)):
        fishers = {n: oracle_fisher(oracle, getattr(oracle, n), x, y, "tokens") for n in ("ln", "rms")}
        for m in (model, plain):
            m.zero_grad()
            example_losses(m(x), y, "tokens")[0].sum().backward()
        raw = {n: p.grad.clone() for n, p in model.named_parameters()}
        pc.step()
        ref.step()
        nu = pc.last_nu
        for n in ("a", "b", "c"):  # the reference has no clip: scale it by this step's nu
            torch.testing.assert_close(getattr(model, n).weight.grad, nu * getattr(plain, n).weight.grad,
                                       rtol=1e-9, atol=1e-12)
        if step == 0:  # one batch: the block is that batch's Fisher
            for n in ("ln", "rms"):
                norm = getattr(model, n)
                layer = pc.layers[n]
                expected = blocks_of(fishers[n], 5 if n == "ln" else 4, layer.a_dim)
                torch.testing.assert_close(layer.a_factor, expected, rtol=1e-10, atol=1e-12)
                raw_vec = torch.cat([raw[f"{n}.{p}"].reshape(-1) for p in ("weight", "bias") if f"{n}.{p}" in raw])
                torch.testing.assert_close(flat_grads(norm), nu * dense_precondition(expected, raw_vec),
                                           rtol=1e-9, atol=1e-12)
        # nu counts every layer, the norms' <P, g> included (docs/design.md's KL clip)
        vdot = sum((p.grad / nu * raw[n]).sum() for n, p in model.named_parameters())
        expected_nu = torch.clamp((1e-3 / (0.1 ** 2 * vdot).abs()).sqrt(), max=1.0)
        assert float(nu) < 1.0  # the clip is active: the norms' share matters
        torch.testing.assert_close(nu.double(), expected_nu)


# ---- the block's math on its own ----------------------------------------------------------


def clamped_solve(block, grad, damping):
    """Per feature: Q diag(1 / (max(e, 0) + damping)) Q^T grad, by torch.linalg.eigh."""
    mats = block.permute(2, 0, 1)
    e, q = torch.linalg.eigh(mats)
    inv = q @ torch.diag_embed(1 / (e.clamp(min=0) + damping)) @ q.mT
    return (inv @ grad.T.unsqueeze(-1)).squeeze(-1).T


@pytest.mark.parametrize("damping", [1e-1, 1e-6])
def test_closed_form_equals_clamped_eigen_solve(damping):
    torch.manual_seed(5)
    d = 17
    v = torch.randn(6, 2, d, dtype=torch.float64)
    block = torch.einsum("nid,njd->ijd", v, v) / 6
    block[:, :, 0] = torch.einsum("i,j->ij", v[0, :, 0], v[0, :, 0])  # rank one (N = 1)
    block[:, :, 1] = torch.tensor([[2.0, 0.0], [0.0, 2.0]])  # r == 0: a multiple of I
    block[:, :, 2] = torch.tensor([[1.0, 1.5], [1.5, 1.0]])  # eigenvalue -0.5: clamped at 0
    block[:, :, 3] = torch.tensor([[3.0, 1e-12], [1e-12, 3.0 + 1e-12]])  # r tiny, not 0
    grad = torch.randn(2, d, dtype=torch.float64)
    p = precondition_blocks(block, grad, damping)
    torch.testing.assert_close(p, clamped_solve(block, grad, damping), rtol=1e-10, atol=1e-10 / damping)
    one = block[:1, :1].abs() + 0.1
    torch.testing.assert_close(precondition_blocks(one, grad[:1], damping), grad[:1] / (one[0] + damping))
    assert precondition_blocks(block.float(), grad.float(), 1e-6).isfinite().all()


def test_block_update_overwrites_and_drops():
    torch.manual_seed(6)
    v = torch.randn(4, 2, 3, dtype=torch.float64)
    stat = torch.einsum("nid,njd->ijd", v, v)
    block = torch.full((2, 2, 3), 7.0, dtype=torch.float64)
    block_statistics_(block, v, 0.0, 0.25)  # beta == 0: overwritten
    torch.testing.assert_close(block, 0.25 * stat)
    before = block.clone()
    bad = v.clone()
    bad[0, 0, 0] = float("nan")
    one, zero = torch.ones((), dtype=torch.float64), torch.zeros((), dtype=torch.float64)
    block_statistics_(block, bad, one, zero)  # a dropped step (device weights): v never read
    assert torch.equal(block, before)
    block_statistics_(block, v, torch.tensor(0.5, dtype=torch.float64), torch.tensor(2.0, dtype=torch.float64))
    torch.testing.assert_close(block, 0.5 * before + 2.0 * stat)


# ---- the preconditioner's jobs with a norm --------------------------------------------------


def seq_model(kind="layernorm", seed=7):
    torch.manual_seed(seed)
    model = NormNet(make_norm(kind, (6,)), (6,)).double()
    with torch.no_grad():
        for p in params_of(model.norm):
            p.add_(0.3 * torch.randn_like(p))
    return model


def run_step(model, pc, x, y, average="batch", scale=1.0, parts=1):
    model.zero_grad()
    for xs, ys in zip(x.chunk(parts), y.chunk(parts)):
        (example_losses(model(xs), ys, average)[0].sum() * (scale / parts)).backward()
    if scale != 1.0:
        for p in model.parameters():
            p.grad /= scale
    raw = flat_grads(model.norm).clone()
    pc.step()
    return raw


def test_running_average_and_no_refresh_between_steps():
    """k = 2 averages two batches with beta_2 = decay / (1 + decay); the step uses the
    current block although inv_update_steps has not come round (nothing to refresh)."""
    model = seq_model()
    oracle = copy.deepcopy(model)
    batches = [(torch.randn(5, 4, 3, dtype=torch.float64), torch.randn(5, 4, 2, dtype=torch.float64))
               for _ in range(2)]
    fishers = [blocks_of(oracle_fisher(oracle, oracle.norm, x, y, "batch"), 6, 2) for x, y in batches]
    pc = norm_precond(model, factor_decay=0.9, inv_update_steps=10)
    for x, y in batches:
        raw = run_step(model, pc, x, y)
    beta = 0.9 / 1.9
    expected = beta * fishers[0] + (1 - beta) * fishers[1]
    layer = pc.layers["norm"]
    assert (layer.a_count, layer.g_count) == (2, 2)
    torch.testing.assert_close(layer.a_factor, expected, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(flat_grads(model.norm), dense_precondition(expected, raw), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("kind", NORMS)
def test_hooks_mode_and_accumulation_match_held_captures(kind):
    x, y = torch.randn(6, 4, 3, dtype=torch.float64), torch.randn(6, 4, 2, dtype=torch.float64)
    results = []
    for kw, parts in (({}, 1), ({"update_factors_in_hooks": True}, 1), ({"accumulation_steps": 2}, 2),
                      ({"accumulation_steps": 2, "update_factors_in_hooks": True}, 2)):
        model = seq_model(kind)
        pc = norm_precond(model, loss_average="tokens", **kw)
        for _ in range(2):
            run_step(model, pc, x, y, "tokens", parts=parts)
        results.append((pc.layers["norm"].a_factor.clone(), flat_grads(model.norm).clone()))
    for block, grad in results[1:]:
        torch.testing.assert_close(block, results[0][0], rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(grad, results[0][1], rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("hooks", [False, True])
def test_mc_fisher_block(hooks):
    """fisher="mc": v_n from the sampled backward (S = 1, a sum over rows), the forward's
    input paired with it through sample_fisher."""
    model = seq_model("layernorm", seed=8)
    oracle = copy.deepcopy(model)
    x = torch.randn(5, 3, 3, dtype=torch.float64)
    pc = norm_precond(model, fisher="mc", update_factors_in_hooks=hooks)
    out = model(x)
    pc.sample_fisher(out, "gaussian", generator=torch.Generator().manual_seed(9))
    out.square().sum().backward()
    raw = flat_grads(model.norm).clone()
    pc.step()

    o = oracle(x)
    sampled = sampled_output_grad(o.detach(), "gaussian", generator=torch.Generator().manual_seed(9))
    vs = [torch.cat([g.reshape(-1) for g in torch.autograd.grad((o[n] * sampled[n]).sum(), params_of(oracle.norm),
                                                                retain_graph=True)]) for n in range(5)]
    v = torch.stack(vs)
    expected = blocks_of(v.T @ v / 5, 6, 2)
    torch.testing.assert_close(pc.layers["norm"].a_factor, expected, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(flat_grads(model.norm), dense_precondition(expected, raw), rtol=1e-9, atol=1e-12)


def test_row_mask_counts_real_tokens():
    """Under set_row_mask a norm's padding rows are zeroed and S ("tokens") counts the
    real rows only (unmasked, S would be N*T and the block (N*T / real)^2 too large)."""
    model = seq_model(seed=10)
    oracle = copy.deepcopy(model)
    x, y = torch.randn(4, 5, 3, dtype=torch.float64), torch.randn(4, 5, 2, dtype=torch.float64)
    mask = torch.ones(4, 5, dtype=torch.bool)
    mask[0, 3:] = mask[2, 1:] = False
    x[~mask] = 100.0 * torch.randn(int((~mask).sum()), 3, dtype=torch.float64)  # padding
    real = int(mask.sum())

    def losses(m):
        return torch.where(mask, (m(x) - y).square().sum(-1), 0.0).sum(1) / real

    los = losses(oracle)
    vs = [real * torch.cat([g.reshape(-1) for g in torch.autograd.grad(los[n], params_of(oracle.norm),
                                                                       retain_graph=True)]) for n in range(4)]
    v = torch.stack(vs)
    expected = blocks_of(v.T @ v / 4, 6, 2)
    pc = norm_precond(model, loss_average="tokens")
    pc.set_row_mask(mask)
    losses(model).sum().backward()
    raw = flat_grads(model.norm).clone()
    pc.step()
    assert pc.health()["nonfinite_steps"] == 0
    torch.testing.assert_close(pc.layers["norm"].a_factor, expected, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(flat_grads(model.norm), dense_precondition(expected, raw), rtol=1e-9, atol=1e-12)


def test_nonfinite_capture_leaves_block_and_gradient():
    model = seq_model(seed=11)
    pc = norm_precond(model)
    x, y = torch.randn(5, 4, 3, dtype=torch.float64), torch.randn(5, 4, 2, dtype=torch.float64)
    run_step(model, pc, x, y)
    block = pc.layers["norm"].a_factor.clone()
    bad = x.clone()
    bad[1, 2, 0] = float("inf")
    raw = run_step(model, pc, bad, y)
    assert torch.equal(pc.layers["norm"].a_factor, block)
    assert torch.equal(flat_grads(model.norm).nan_to_num(), raw.nan_to_num())
    assert pc.health()["nonfinite_steps"] == 1


class FakeScaler:
    """What the preconditioner reads of a torch.amp.GradScaler: its scale, enabled."""

    def __init__(self, scale):
        self._scale = torch.tensor(scale)

    def scale(self, loss):
        return loss * self._scale

    def unscale_(self, optimizer):
        pass

    def is_enabled(self):
        return True


@pytest.mark.parametrize("hooks", [False, True])
def test_grad_scaler_is_divided_out(hooks):
    x, y = torch.randn(5, 4, 3, dtype=torch.float64), torch.randn(5, 4, 2, dtype=torch.float64)
    blocks = []
    for scaler in (None, FakeScaler(1024.0)):
        model = seq_model(seed=12)
        pc = norm_precond(model, grad_scaler=scaler, update_factors_in_hooks=hooks)
        run_step(model, pc, x, y, scale=1.0 if scaler is None else 1024.0)
        blocks.append(pc.layers["norm"].a_factor.clone())
    torch.testing.assert_close(blocks[1], blocks[0], rtol=1e-12, atol=0)


def test_state_round_trip_continues_exactly():
    batches = [(torch.randn(5, 4, 3, dtype=torch.float64), torch.randn(5, 4, 2, dtype=torch.float64))
               for _ in range(3)]
    model = seq_model("layernorm", seed=13)
    model.rms = nn.RMSNorm(2).double()  # a second norm kind on the output
    model.forward = lambda x, m=model: m.rms(NormNet.forward(m, x))
    twin = copy.deepcopy(model)
    pc = norm_precond(model)
    for x, y in batches[:2]:
        run_step(model, pc, x, y)
    state = pc.state_dict()
    assert state["layers"]["norm"]["kind"] == "layernorm" and state["layers"]["rms"]["kind"] == "rmsnorm"
    entry = state["layers"]["norm"]
    assert set(entry) >= {"a_factor", "a_count", "g_count"} and "g_factor" not in entry
    twin.forward = lambda x, m=twin: m.rms(NormNet.forward(m, x))
    resumed = norm_precond(twin)
    resumed.load_state_dict(state)
    run_step(model, pc, *batches[2])
    run_step(twin, resumed, *batches[2])
    for n in ("norm", "rms"):
        assert torch.equal(resumed.layers[n].a_factor, pc.layers[n].a_factor)
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p.grad, q.grad)

    no_bias = NormNet(nn.LayerNorm(6, bias=False)).double()  # refused, not misread
    with pytest.raises(ValueError, match=r"'norm \(a factor \(2, 2, 6\), model needs \(1, 1, 6\)\)"):
        norm_precond(no_bias).load_state_dict({**state, "layers": {n: state["layers"][n]
                                                                   for n in ("inp", "norm", "out")}})
    wider = {**state["layers"]["norm"], "a_factor": torch.rand(2, 2, 7, dtype=torch.float64)}
    with pytest.raises(ValueError, match=r"'norm \(a factor \(2, 2, 7\), model needs \(2, 2, 6\)\)"):
        resumed.load_state_dict({**state, "layers": {**state["layers"], "norm": wider}})


def test_unbatched_and_16_bit_inputs():
    """An unbatched input (normalized_shape only) is one example of one row; a bf16 input
    is normalised in float32 (as torch's norms compute) into float32 blocks."""
    torch.manual_seed(14)
    ln = nn.LayerNorm(4).double()
    with torch.no_grad():
        ln.weight.add_(0.3 * torch.randn(4, dtype=torch.float64))
    model = nn.Sequential(nn.Linear(3, 4).double(), ln)
    pc = norm_precond(model)
    x = torch.randn(3, dtype=torch.float64)
    model(x).square().sum().backward()
    v = torch.cat([ln.weight.grad, ln.bias.grad]).clone()
    pc.step()
    expected = blocks_of(torch.outer(v, v), 4, 2)  # N = 1, S = 1
    torch.testing.assert_close(pc.layers["1"].a_factor, expected, rtol=1e-10, atol=1e-12)

    layer = layers.make_layer("ln", nn.LayerNorm(4), ("layernorm",))
    xb = torch.randn(2, 3, 4).to(torch.bfloat16)
    gb = torch.randn(2, 3, 4).to(torch.bfloat16)
    v16 = layer.block_grads(layer.batched_input(xb), layer.grad_rows(gb), torch.float32)
    xf, gf = xb.float(), gb.float()
    xhat = (xf - xf.mean(-1, keepdim=True)) / (xf.var(-1, unbiased=False, keepdim=True) + 1e-5).sqrt()
    assert v16.dtype == torch.float32 and v16.shape == (2, 2, 4)
    torch.testing.assert_close(v16, torch.stack([(gf * xhat).sum(1), gf.sum(1)], 1), rtol=1e-5, atol=1e-5)


def run_masked_steps(device, hooks, steps=3, between=None):
    """A Linear/LayerNorm/RMSNorm model with a row mask and the KL clip: one refresh step,
    then `steps` factor-update steps inside the context `between` (e.g. sync debug)."""
    torch.manual_seed(15)
    model = nn.Sequential(nn.Linear(8, 16), nn.LayerNorm(16), nn.GELU(), nn.Linear(16, 16), nn.RMSNorm(16),
                          nn.Linear(16, 5)).to(device)
    pc = KFACPreconditioner(model, extra_kinds=NORMS, inv_update_steps=4, kl_clip=1e-3, lr=0.1,
                            loss_average="tokens", update_factors_in_hooks=hooks)
    x, y = torch.randn(4, 6, 8, device=device), torch.randint(0, 5, (4, 6), device=device)
    mask = torch.ones(4, 6, dtype=torch.bool, device=device)
    mask[1, 4:] = False

    def step():
        model.zero_grad(set_to_none=False)
        pc.set_row_mask(mask)
        terms = nn.functional.cross_entropy(model(x).reshape(-1, 5), y.reshape(-1), reduction="none")
        ((terms * mask.reshape(-1)).sum() / mask.sum()).backward()  # no boolean indexing: no sync
        pc.step()

    step()  # step 0 refreshes the Linear layers' eigenbases (host syncs allowed there)
    with between() if between is not None else contextlib.nullcontext():
        for _ in range(steps):
            step()
    assert pc.layers["1"].a_count == steps + 1 and torch.isfinite(pc.layers["4"].a_factor).all()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    return pc


@pytest.mark.parametrize("hooks", [False, True])
def test_masked_steps_on_cpu(hooks):
    pc = run_masked_steps("cpu", hooks)
    assert pc.health()["nonfinite_steps"] == 0 and float(pc.last_nu) < 1.0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("hooks", [False, True])
def test_cuda_norm_steps_never_sync(hooks):
    """Factor updates and preconditioning of the norms (held and hooks modes, a row mask's
    device counts, the KL clip) read nothing back: sync debug mode 'error' between refreshes."""

    @contextlib.contextmanager
    def no_sync():
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            yield
        finally:
            torch.cuda.set_sync_debug_mode("default")

    run_masked_steps("cuda", hooks, between=no_sync)
