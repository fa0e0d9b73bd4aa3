"""Triton hot paths vs their torch baselines, side by side in one run (GPU only; every
test skips without CUDA). bf16 inputs, fp32 factors.

    python -m pytest bench/bench_triton.py --benchmark-group-by=group --benchmark-json=out.json

Groups: fused factor update (N=8192 rows, d in 1024/2048/4096) vs the best torch form
and the unfused GEMM+symmetrise+EMA sequence; grouped updates (48 small layers, and a
transformer-like mix) vs a per-layer loop; a ResNet-50 3x3 conv factor vs unfold+GEMM;
grouped preconditioning of 48 layers vs a per-layer loop with a host sync per layer.
"""
import pytest
import torch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="Triton benchmarks need a CUDA device")]

BETA, ALPHA = 0.95, 0.05 / 8192


def run(benchmark, fn, rounds=20):
    def call():
        fn()
        torch.cuda.synchronize()
    call()  # compile / warm up outside the timing
    benchmark.pedantic(call, rounds=rounds, iterations=3, warmup_rounds=1)


def torch_best_update(f, x, beta, alpha):
    """factor <- beta*factor + alpha*x^T x in torch's best form for 16-bit x."""
    try:
        f.mul_(beta).add_(torch.mm(x.T, x, out_dtype=torch.float32), alpha=alpha)
    except TypeError:  # torch without out_dtype: fp32 upcast
        xf = x.float()
        f.addmm_(xf.T, xf, beta=beta, alpha=alpha)


def torch_unfused_update(f, x, beta, alpha):
    """The kfac-pytorch-style sequence: GEMM, symmetrise, running average."""
    xf = x.float()
    cov = xf.T @ xf
    cov = (cov + cov.T) / 2
    f.mul_(beta).add_(cov, alpha=alpha)


def _sms():
    return torch.cuda.get_device_properties(torch.cuda.current_device()).multi_processor_count


def split_candidate(n, rows):
    """The rectangular-tile split-K candidate (kernels/splitk.py, out of `auto`) with the
    split its own rule picks for this shape and this GPU's SM count."""
    from kfac_fast.kernels import splitk

    cfg = dict(splitk.CONFIG_128x256)
    return dict(cfg, SPLIT_K=splitk.pick_split(n, rows, cfg, sms=_sms()))


@pytest.mark.parametrize("d,append", [(1024, False), (2048, False), (4096, False), (4096, True)])
@pytest.mark.parametrize("impl", ["triton", "triton_128x256_split", "torch_best", "torch_unfused"])
def test_factor_update(benchmark, d, append, impl):
    """Issue 17's target: N = 8192, d = 4096 (append_ones too): useful FLOPs N n (n + 1)."""
    from kfac_fast.kernels import factor_update

    n = d + append
    benchmark.group = f"factor_update d={d}{' +ones' if append else ''} N=8192 bf16"
    x = torch.randn(8192, d, device="cuda", dtype=torch.bfloat16)
    f = torch.eye(n, device="cuda")
    beta, alpha = torch.tensor(BETA, device="cuda"), torch.tensor(ALPHA, device="cuda")
    benchmark.extra_info["useful_flop"] = 8192 * n * (n + 1)

    def best():
        xb = torch.cat([x, x.new_ones(x.shape[0], 1)], 1) if append else x
        torch_best_update(f, xb, BETA, ALPHA)

    def unfused():
        xb = torch.cat([x, x.new_ones(x.shape[0], 1)], 1) if append else x
        torch_unfused_update(f, xb, BETA, ALPHA)
    fn = {"triton": lambda: factor_update.update_factor_(f, x, beta, alpha, append_ones=append),
          "triton_128x256_split": lambda: factor_update.update_factor_(
              f, x, beta, alpha, append_ones=append, config=split_candidate(n, 8192)),
          "torch_best": best, "torch_unfused": unfused}[impl]
    run(benchmark, fn)


def _layers(kind):
    g = torch.Generator().manual_seed(0)
    if kind == "48 small":
        dims = [int(d) for d in torch.randint(16, 257, (48,), generator=g)]
        return dims, 1024
    dims = [768, 768, 3072, 768] * 6  # attention in/out, MLP up/down: d 768..3072
    return dims, 2048


@pytest.mark.parametrize("kind", ["48 small", "transformer"])
@pytest.mark.parametrize("impl", ["triton", "triton_split4", "torch_loop"])
def test_grouped_update(benchmark, kind, impl):
    from kfac_fast.kernels import factor_update_grouped

    benchmark.group = f"update_factors_ {kind} bf16"
    dims, rows = _layers(kind)
    xs = [torch.randn(rows, d, device="cuda", dtype=torch.bfloat16) for d in dims]
    fs = [torch.eye(d + 1, device="cuda") for d in dims]
    betas = torch.full((len(dims),), BETA, device="cuda")
    alphas = torch.full((len(dims),), ALPHA, device="cuda")

    def loop():
        for f, x in zip(fs, xs):
            xb = torch.cat([x, x.new_ones(x.shape[0], 1)], 1)
            torch_best_update(f, xb, BETA, ALPHA)
    fn = {"triton": lambda: factor_update_grouped.update_factors_(fs, xs, betas, alphas, append_ones=True),
          # the grouped split-K candidate (kernels/grouped_splitk.py, out of `auto`)
          "triton_split4": lambda: factor_update_grouped.update_factors_(fs, xs, betas, alphas, append_ones=True,
                                                                        config={"SPLIT_K": 4}),
          "torch_loop": loop}[impl]
    run(benchmark, fn)


@pytest.mark.parametrize("impl", ["triton", "unfold_gemm", "triton_split8", "triton_cl_channels_last",
                                  "triton_cl_split8_channels_last"])
def test_conv_factor(benchmark, impl):
    from kfac_fast.kernels import conv_factor

    benchmark.group = "conv_input_factor_ ResNet-50 3x3 N=64 56x56 C=64 bf16"
    x = torch.randn(64, 64, 56, 56, device="cuda", dtype=torch.bfloat16)
    f = torch.eye(64 * 9, device="cuda")
    beta, alpha = torch.tensor(BETA, device="cuda"), torch.tensor(ALPHA, device="cuda")

    def unfold_gemm():
        p = torch.nn.functional.unfold(x, 3, padding=1).transpose(1, 2).reshape(-1, 64 * 9)
        torch_best_update(f, p, BETA, ALPHA)
    x_cl = x.to(memory_format=torch.channels_last) if "channels_last" in impl else None
    fn = {"triton": lambda: conv_factor.conv_input_factor_(f, x, beta, alpha, 3, 1, 1, 1),
          "unfold_gemm": unfold_gemm,
          # candidates out of `auto` (kernels/conv_factor.py): split-K (15 tiles x 8 programs)
          # and the (kh, kw, c) column order on a channels-last input
          "triton_split8": lambda: conv_factor.conv_input_factor_(f, x, beta, alpha, 3, 1, 1, 1,
                                                                  config=conv_factor.CONFIG_CONV_16BIT_SPLIT),
          "triton_cl_channels_last": lambda: conv_factor.conv_input_factor_(f, x_cl, beta, alpha, 3, 1, 1, 1,
                                                                            config=conv_factor.CONFIG_CONV_16BIT_CL),
          "triton_cl_split8_channels_last": lambda: conv_factor.conv_input_factor_(
              f, x_cl, beta, alpha, 3, 1, 1, 1, config=conv_factor.CONFIG_CONV_16BIT_CL_SPLIT),
          }[impl]
    run(benchmark, fn, rounds=10)


@pytest.mark.parametrize("impl", ["triton", "torch_loop_sync"])
def test_grouped_precondition(benchmark, impl):
    from kfac_fast.kernels import precondition

    benchmark.group = "precondition_eigen_ 48 layers (d 64..1024) + KL clip"
    g = torch.Generator().manual_seed(1)
    shapes = [(int(a), int(b)) for a, b in torch.randint(64, 1025, (48, 2), generator=g)]
    ws = [torch.randn(o, i, device="cuda") for o, i in shapes]
    bs = [torch.randn(o, device="cuda") for o, _ in shapes]
    qa = [torch.linalg.qr(torch.randn(i + 1, i + 1, device="cuda"))[0] for _, i in shapes]
    qg = [torch.linalg.qr(torch.randn(o, o, device="cuda"))[0] for o, _ in shapes]
    da = [torch.rand(i + 1, device="cuda") for _, i in shapes]
    dg = [torch.rand(o, device="cuda") for o, _ in shapes]
    lr, kl = torch.tensor(0.1, device="cuda"), torch.tensor(1e-3, device="cuda")

    def loop():
        ps, total = [], 0.0
        for w, b, a, qa_, g_, qg_ in zip(ws, bs, da, qa, dg, qg):
            dw = torch.cat([w, b[:, None]], 1)
            v = qg_.T @ dw @ qa_
            s = v / (g_[:, None] * a[None, :] + 1e-3)
            ps.append(qg_ @ s @ qa_.T)
            total += float((v * s).sum())  # the host sync per layer of a naive frontend
        nu = min(1.0, (1e-3 / abs(0.01 * total)) ** 0.5) if total else 1.0
        for w, b, p in zip(ws, bs, ps):
            w.copy_(p[:, :-1] * nu)
            b.copy_(p[:, -1] * nu)
    fn = {"triton": lambda: precondition.precondition_eigen_(ws, bs, qa, da, qg, dg, 1e-3, lr=lr, kl_clip=kl),
          "torch_loop_sync": loop}[impl]
    run(benchmark, fn, rounds=10)
