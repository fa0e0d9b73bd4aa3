"""The op API surface: validation errors, packing, custom-op registration, torch.compile,
backend selection and backend_info."""
import pytest
import torch

import kfac_fast
from kfac_fast import _ops, ops
from tests._oracle import generator, randn, random_spd

F = torch.ones(4, 4)
X = torch.randn(5, 3)
Q3, Q2 = torch.eye(3), torch.eye(2)
D3, D2 = torch.ones(3), torch.ones(2)


CASES = [
    # (call, exception, words that must appear in the message)
    (lambda: ops.update_factor_(F, X, 0.5, 1.0), ValueError, ["x", "last dim 4"]),
    (lambda: ops.update_factor_(F[:3], X, 0.5, 1.0), ValueError, ["factor", "square"]),
    (lambda: ops.update_factor_(F.to(torch.float16), X, 0.5, 1.0, append_ones=True), TypeError, ["factor", "dtype"]),
    (lambda: ops.update_factor_(F, X.long(), 0.5, 1.0, append_ones=True), TypeError, ["x", "dtype"]),
    (lambda: ops.update_factor_(F, X, float("nan"), 1.0, append_ones=True), ValueError, ["beta", "finite"]),
    (lambda: ops.update_factor_(F, X, 0.5, float("inf"), append_ones=True), ValueError, ["alpha", "finite"]),
    (lambda: ops.update_factor_(F, X, torch.ones(2), 1.0, append_ones=True), ValueError, ["beta", "0-dim"]),
    (lambda: ops.update_factor_(F, X, torch.tensor(1), 1.0, append_ones=True), TypeError, ["beta", "floating"]),
    (lambda: ops.update_factor_(F, X, "0.5", 1.0, append_ones=True), TypeError, ["beta"]),
    (lambda: ops.update_factor_(F, X, 0.5, 1.0, append_ones=1), TypeError, ["append_ones"]),
    (lambda: ops.update_factor_(F, X.to("meta"), 0.5, 1.0, append_ones=True), ValueError, ["x", "meta"]),
    (lambda: ops.update_factor_(torch.ones(4, 8)[:, ::2], X, 0.5, 1.0, append_ones=True), ValueError,
     ["factor", "contiguous"]),
    (lambda: ops.update_factors_([F, F], [X], 0.5, 1.0, append_ones=True), ValueError, ["xs", "2 entries"]),
    (lambda: ops.update_factors_([F, F], [X, X], [0.5], 1.0, append_ones=True), ValueError, ["betas", "2 entries"]),
    (lambda: ops.update_factors_([F, F], [X, X], 0.5, torch.ones(3), append_ones=True), ValueError, ["alphas", "2"]),
    (lambda: ops.update_factors_([F, F], [X, X], 0.5, 1.0, append_ones=[True]), ValueError, ["append_ones", "2"]),
    (lambda: ops.update_factors_([F, F], [X, X[:, :2]], 0.5, 1.0, append_ones=True), ValueError, ["xs[1]"]),
    (lambda: ops.update_factors_(F, [X], 0.5, 1.0), TypeError, ["factors", "list"]),
    (lambda: ops.conv_input_factor_(F, torch.randn(1, 1, 3, 3), 0.5, 1.0, 3, 1, 0, 1), ValueError,
     ["factor", "9x9"]),
    (lambda: ops.conv_input_factor_(F, torch.randn(1, 3, 3), 0.5, 1.0, 2, 1, 0, 1), ValueError, ["x", "4-D"]),
    (lambda: ops.conv_input_factor_(F, torch.randn(1, 1, 3, 3), 0.5, 1.0, (2, 2, 2), 1, 0, 1), TypeError,
     ["kernel_size"]),
    (lambda: ops.conv_input_factor_(F, torch.randn(1, 1, 3, 3), 0.5, 1.0, 2, 0, 0, 1), ValueError, ["stride"]),
    (lambda: ops.conv_input_factor_(torch.ones(10, 10), torch.randn(1, 1, 2, 2), 0.5, 1.0, 3, 1, 0, 1), ValueError,
     ["kernel_size"]),
    (lambda: ops.eigh([F, torch.ones(2, 3)]), ValueError, ["matrices[1]", "square"]),
    (lambda: ops.eigh([F], previous=[torch.eye(3)], tol=0.1), ValueError, ["previous[0]"]),
    (lambda: ops.eigh([F], previous=[F, F]), ValueError, ["previous", "1 entries"]),
    (lambda: ops.eigh([F], tol=-1.0), ValueError, ["tol"]),
    (lambda: ops.eigh([F.int()]), TypeError, ["matrices[0]", "dtype"]),
    (lambda: ops.damped_inverse([F], -0.1), ValueError, ["damping", ">= 0"]),
    (lambda: ops.damped_inverse([F, F], [0.1, -1.0]), ValueError, ["damping[1]"]),
    (lambda: ops.pi_damping(F, Q3, -1.0), ValueError, ["damping"]),
    (lambda: ops.pi_damping(F, torch.ones(3), 1.0), ValueError, ["g", "square"]),
    (lambda: ops.precondition_eigen([torch.ones(2, 4)], [Q3], [D3], [Q2], [D2], 0.1), ValueError,
     ["grads[0]", "(2, 3)"]),
    (lambda: ops.precondition_eigen([torch.ones(2, 3)], [Q3], [D2], [Q2], [D2], 0.1), ValueError, ["da[0]"]),
    (lambda: ops.precondition_eigen([torch.ones(2, 3)], [Q3, Q3], [D3], [Q2], [D2], 0.1), ValueError,
     ["qa", "1 entries"]),
    (lambda: ops.precondition_eigen([torch.ones(2, 3)], [Q3], [D3], [Q2], [D2], -0.1), ValueError, ["damping"]),
    (lambda: ops.precondition_eigen_([torch.ones(2, 3)], [None], [Q3], [D3], [Q2], [D2], 0.1, kl_clip=0.1),
     ValueError, ["lr", "kl_clip"]),
    (lambda: ops.precondition_eigen_([torch.ones(2, 2)], [None], [Q3], [D3], [Q2], [D2], 0.1), ValueError,
     ["weight_grads[0]", "bias_grads[0]", "None"]),
    (lambda: ops.precondition_eigen_([torch.ones(2, 2)], [torch.ones(3)], [Q3], [D3], [Q2], [D2], 0.1), ValueError,
     ["bias_grads[0]", "(2,)"]),
    (lambda: ops.precondition_eigen_([torch.ones(2, 2)], [None, None], [Q3], [D3], [Q2], [D2], 0.1), ValueError,
     ["bias_grads", "1 entries"]),
    (lambda: ops.precondition_eigen_([torch.ones(2, 3)], [None], [Q3], [D3], [Q2], [D2], 0.1, lr=-1.0, kl_clip=0.1),
     ValueError, ["lr", "> 0"]),
    (lambda: ops.precondition_eigen_([], [], [], [], [], [], 0.1), ValueError, ["weight_grads", "empty"]),
    (lambda: ops.precondition_inverse_([torch.ones(2, 3)], [None], [Q3], [Q3], lr=0.1, kl_clip=1.0), ValueError,
     ["weight_grads[0]", "d_out=3"]),
    (lambda: ops.precondition_ekfac([torch.ones(2, 3)], [Q3], [Q2], [torch.ones(3, 2)], 0.1), ValueError,
     ["scales[0]"]),
    (lambda: ops.ekfac_scales_([torch.ones(2, 3)], [torch.ones(4, 3)], [torch.ones(5, 2)], [Q3], [Q2], 0.5, 1.0),
     ValueError, ["gs[0]", "leading"]),
    (lambda: ops.ekfac_scales_([torch.ones(2, 3)], [torch.ones(4, 5)], [torch.ones(4, 2)], [Q3], [Q2], 0.5, 1.0),
     ValueError, ["xs[0]", "last dim"]),
    (lambda: ops.kl_clip_scale([torch.ones(3)], [torch.ones(4)], 0.1, 1.0), ValueError, ["precond_grads[0]"]),
    (lambda: ops.kl_clip_scale([torch.ones(3)], [torch.ones(3)], 0.1, 0.0), ValueError, ["kl_clip", "> 0"]),
    (lambda: ops.unpack_triangles_([F], torch.ones(9)), ValueError, ["flat", "10 entries"]),
    (lambda: ops.pack_triangles([]), ValueError, ["factors", "empty"]),
]


@pytest.mark.parametrize("case", range(len(CASES)))
def test_validation_errors_name_the_argument(case):
    call, exc, words = CASES[case]
    with pytest.raises(exc) as info:
        call()
    message = str(info.value)
    for word in words:
        assert word in message, f"{word!r} not in {message!r}"


def test_pack_unpack_round_trip_is_exact():
    gen = generator(1)
    factors = [random_spd(n, dtype=torch.float32, gen=gen) for n in (1, 3, 17, 2)]
    flat = ops.pack_triangles(factors)
    assert flat.shape == (1 + 6 + 153 + 3,) and flat.dtype == torch.float32
    iu = torch.triu_indices(3, 3)
    torch.testing.assert_close(flat[1:7], factors[1][iu[0], iu[1]], rtol=0, atol=0)
    targets = [torch.randn(f.shape, generator=gen) for f in factors]  # junk to overwrite
    ops.unpack_triangles_(targets, flat)
    for t, f in zip(targets, factors):
        torch.testing.assert_close(t, f, rtol=0, atol=0)


def _op_samples():
    """One valid (op overload, args) per custom op, on fresh random inputs."""
    gen = generator(2)
    def f64t(v):
        return torch.tensor(v, dtype=torch.float64)

    a, g = random_spd(4, dtype=torch.float32, gen=gen), random_spd(3, dtype=torch.float32, gen=gen)
    da, qa = torch.linalg.eigh(a)
    dg, qg = torch.linalg.eigh(g)
    k = torch.ops.kfac_fast
    def w():
        return randn(3, 3, gen=gen)

    def b():
        return randn(3, gen=gen)

    return [
        (k.update_factor_.default, (a.clone(), randn(5, 3, gen=gen), f64t(0.5), f64t(0.2), True)),
        (k.update_factors_.default, ([a.clone(), g.clone()], [randn(5, 3, gen=gen), randn(2, 3, gen=gen)],
                                     torch.rand(2, dtype=torch.float64), torch.rand(2, dtype=torch.float64),
                                     [True, False])),
        (k.conv_input_factor_.default, (random_spd(9, dtype=torch.float32, gen=gen), randn(2, 1, 4, 4, gen=gen),
                                        f64t(0.5), f64t(0.2), [3, 3], [1, 1], [1, 1], [1, 1], False)),
        (k.eigh.default, ([a, g, a], [], None, True)),
        (k.damped_inverse.default, ([a, g], torch.tensor([0.1, 0.2], dtype=torch.float64))),
        (k.pi_damping.default, (a, g, f64t(0.01))),
        (k.precondition_eigen.default, ([randn(3, 4, gen=gen)], [qa], [da], [qg], [dg], f64t(0.1).reshape(1))),
        (k.precondition_eigen_.default, ([w(), randn(3, 4, gen=gen)], [b()], [True, False], [qa, qa], [da, da],
                                         [qg, qg], [dg, dg], torch.full((2,), 0.1, dtype=torch.float64),
                                         f64t(0.1), f64t(1e-3))),
        (k.precondition_inverse.default, ([randn(3, 4, gen=gen)], [a], [g])),
        (k.precondition_inverse_.default, ([w()], [b()], [True], [a], [g], None, None)),
        (k.ekfac_scales_.default, ([torch.rand(3, 4, generator=gen)], [randn(5, 2, 3, gen=gen)],
                                   [randn(5, 2, 3, gen=gen)], [qa], [qg], f64t(0.5).reshape(1), f64t(0.1).reshape(1))),
        (k.precondition_ekfac.default, ([randn(3, 4, gen=gen)], [qa], [qg], [torch.rand(3, 4, generator=gen)],
                                        f64t(0.1).reshape(1))),
        (k.precondition_ekfac_.default, ([w()], [b()], [True], [qa], [qg], [torch.rand(3, 4, generator=gen)],
                                         f64t(0.1).reshape(1), f64t(0.1), f64t(1e-3))),
        (k.kl_clip_scale.default, ([randn(3, 4, gen=gen)], [randn(3, 4, gen=gen)], f64t(0.1), f64t(1e-3))),
        (k.pack_triangles.default, ([a, g],)),
        (k.unpack_triangles_.default, ([a.clone(), g.clone()], randn(16, gen=gen))),
    ]


def test_every_op_is_registered():
    ops_with_samples = {op._name.split("::")[1] for op, _ in _op_samples()}
    assert ops_with_samples == set(_ops.OP_NAMES)
    for name in _ops.OP_NAMES:
        assert hasattr(torch.ops.kfac_fast, name)


@pytest.mark.parametrize("index", range(16))
def test_opcheck(index):
    op, args = _op_samples()[index]
    torch.library.opcheck(op, args)


def test_compile_fullgraph_no_recompile_over_tensor_scalars():
    import torch._dynamo

    torch._dynamo.reset()
    gen = generator(3)
    factors = [random_spd(5, dtype=torch.float32, gen=gen), random_spd(3, dtype=torch.float32, gen=gen)]
    xs = [randn(7, 4, gen=gen), randn(7, 3, gen=gen)]

    def step(factors, xs, beta, alpha):
        ops.update_factors_(factors, xs, beta, alpha, append_ones=[True, False])
        ops.update_factor_(factors[1], xs[1], beta, alpha)
        return ops.pack_triangles(factors)

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    eager = [f.clone() for f in factors]
    with torch._dynamo.config.patch(error_on_recompile=True):
        for beta in (0.0, 0.5, 0.9, 0.99):
            alpha = torch.tensor(1.0 - beta)
            out = compiled(factors, xs, torch.tensor(beta), alpha)
            ref = step(eager, xs, torch.tensor(beta), alpha)
            torch.testing.assert_close(out, ref)
    for f, e in zip(factors, eager):
        torch.testing.assert_close(f, e)


def test_compile_inplace_precondition_with_none_bias():
    import torch._dynamo

    torch._dynamo.reset()
    gen = generator(4)
    a, g = random_spd(3, dtype=torch.float32, gen=gen), random_spd(2, dtype=torch.float32, gen=gen)
    (da, qa), (dg, qg) = torch.linalg.eigh(a), torch.linalg.eigh(g)
    w0, b0 = randn(2, 2, gen=gen), randn(2, gen=gen)
    w1 = randn(2, 3, gen=gen)

    def step(wg, bg, damping, lr):
        return ops.precondition_eigen_(wg, bg, [qa, qa], [da, da], [qg, qg], [dg, dg], damping, lr=lr,
                                       kl_clip=torch.tensor(1e-3))

    compiled = torch.compile(step, fullgraph=True)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for lam in (0.1, 0.2):
            cw, cb = [w0.clone(), w1.clone()], [b0.clone(), None]
            ew, eb = [w0.clone(), w1.clone()], [b0.clone(), None]
            nu_c = compiled(cw, cb, torch.tensor(lam), torch.tensor(0.3))
            nu_e = step(ew, eb, torch.tensor(lam), torch.tensor(0.3))
            torch.testing.assert_close(nu_c, nu_e)
            for x, y in zip(cw + cb[:1], ew + eb[:1]):
                torch.testing.assert_close(x, y)
            assert not torch.equal(cw[1], w1)  # really written in place


def test_backend_info_reports_every_op():
    info = kfac_fast.backend_info()
    assert "cpu" in info["devices"]
    assert set(info["devices"]["cpu"]) == set(_ops.OP_NAMES)
    assert all(row["backend"] == "torch" for row in info["devices"]["cpu"].values())
    text = str(info)
    for op in _ops.OP_NAMES:
        assert op in text
    assert "_C" in text and "triton" in text
    assert set(kfac_fast.backend_info("cpu")["devices"]) == {"cpu"}


def test_backend_env_triton_on_cpu_raises_and_auto_falls_back(monkeypatch):
    x = randn(4, 3, gen=generator(5))
    monkeypatch.setenv("KFAC_FAST_BACKEND", "triton")
    with pytest.raises(RuntimeError, match="KFAC_FAST_BACKEND=triton"):
        ops.update_factor_(torch.eye(3), x, 0.5, 1.0)
    monkeypatch.setenv("KFAC_FAST_BACKEND", "auto")
    out = ops.update_factor_(torch.eye(3), x, 0.5, 1.0)
    torch.testing.assert_close(out, 0.5 * torch.eye(3) + x.mT @ x)
    monkeypatch.setenv("KFAC_FAST_BACKEND", "torch")
    torch.testing.assert_close(ops.update_factor_(torch.eye(3), x, 0.5, 1.0), out)


def test_backend_env_names_the_declared_backends(monkeypatch):
    monkeypatch.setenv("KFAC_FAST_BACKEND", "rocm")
    with pytest.raises(ValueError, match="KFAC_FAST_BACKEND must be auto, torch, cublas, triton, cuda; got 'rocm'"):
        ops.update_factor_(torch.eye(3), randn(4, 3, gen=generator(5)), 0.5, 1.0)


def _triton_refusal(op, *args, dtype=torch.float32, **kwargs):
    """Why the triton row of `op` refuses this call, as if its tensors were on CUDA
    (`dtype`: the leading tensor's, as kfac_fast._ops passes it)."""
    from kfac_fast import _dispatch

    (row,) = [impl for impl in _dispatch._REGISTRY[op] if impl.backend == "triton"]
    return row.refuses(_dispatch.Call(torch.device("cuda"), dtype, 4, args, kwargs))


def test_triton_rows_refuse_what_their_kernels_cannot_serve():
    """Kernels never fall back: the router sends these calls to another backend."""
    f32, f64 = torch.eye(3), torch.eye(3, dtype=torch.float64)
    x = torch.ones(2, 3)
    assert _triton_refusal("update_factor_", f32, x, 1.0, 1.0, append_ones=False) is None
    assert "float32" in _triton_refusal("update_factor_", f64, x, 1.0, 1.0, dtype=f64.dtype, append_ones=False)
    assert _triton_refusal("update_factors_", [f32, f32], [x, x], None, None) is None
    assert "float32" in _triton_refusal("update_factors_", [f32, f64], [x, x], None, None)
    q, d = [torch.eye(3)], [torch.ones(3)]
    assert _triton_refusal("precondition_eigen", [torch.ones(3, 3)], q, d, q, d, None) is None
    assert "float32" in _triton_refusal("precondition_eigen", [torch.ones(3, 3)], q, [d[0].double()], q, d, None)
    assert "one gradient dtype" in _triton_refusal("precondition_eigen", [], [], [], [], [], None)
    two = [torch.eye(3)] * 2, [torch.ones(3)] * 2
    assert "one gradient dtype" in _triton_refusal(
        "precondition_eigen", [torch.ones(3, 3), torch.ones(3, 3).half()], two[0], two[1], two[0], two[1], None)
    w = torch.ones(3, 2)
    assert _triton_refusal("precondition_eigen_", [w], [torch.ones(3)], q, d, q, d, None) is None
    assert "one gradient dtype" in _triton_refusal("precondition_eigen_", [w], [torch.ones(3).half()], q, d, q, d,
                                                    None)
    strided = torch.ones(3, 4, 2).transpose(1, 2)  # (3, 2, 4) that no view flattens to (3, 8)
    q8, d8 = [torch.eye(8)], [torch.ones(8)]
    assert "weight_grads[0]" in _triton_refusal("precondition_eigen_", [strided], [None], q8, d8, q, d, None)


def _host_to_device_copies(monkeypatch) -> list:
    """Records every Tensor.to that moves a CPU tensor to another device (on CUDA a
    pageable copy of that kind is a host sync)."""
    moved: list = []
    real = torch.Tensor.to

    def spy(self, *args, **kwargs):
        out = real(self, *args, **kwargs)
        if self.device.type == "cpu" and out.device.type != "cpu":
            moved.append((tuple(self.shape), out.device))
        return out

    monkeypatch.setattr(torch.Tensor, "to", spy)
    return moved


def test_per_layer_mixed_numbers_and_device_tensors_without_host_copy(monkeypatch):
    # A per-layer list mixing Python numbers (and CPU 0-dim tensors) with device tensors:
    # the host values are filled on the device, never copied from pageable memory.
    from kfac_fast import _validate as check

    dev = torch.device("meta")  # a non-CPU device a CPU machine has
    moved = _host_to_device_copies(monkeypatch)
    t = check.per_layer("precondition_eigen_", "damping", [0.1, torch.tensor(0.2, device=dev),
                                                          torch.tensor(0.3, dtype=torch.float64), 4], 4, dev,
                        "nonneg")
    assert moved == [] and t.device == dev and t.shape == (4,) and t.dtype == torch.float64
    cpu = check.per_layer("precondition_eigen_", "damping", [0.1, torch.tensor(0.2), 3], 3,
                          torch.device("cpu"), "nonneg")
    assert cpu.tolist() == [0.1, torch.tensor(0.2).item(), 3.0]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_per_layer_mixed_list_no_sync_on_cuda():
    from kfac_fast import _validate as check

    dev = torch.device("cuda")
    damping = torch.tensor(0.2, device=dev)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        t = check.per_layer("precondition_eigen_", "damping", [0.1, damping, 0.3], 3, dev, "nonneg")
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert t.device.type == "cuda"
    torch.testing.assert_close(t.cpu(), torch.tensor([0.1, torch.tensor(0.2).item(), 0.3], dtype=torch.float64))
