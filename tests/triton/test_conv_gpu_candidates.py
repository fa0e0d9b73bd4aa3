"""The grouped and conv candidates (out of `auto`) at their real tile sizes in bf16, on a
GPU only (bf16 tl.dot is wrong under the interpreter; these tiles are too slow there):
the grouped split-K (kernels/grouped_splitk.py), the conv split-K and the conv (kh, kw, c)
column order (kernels/conv_factor.py), each against float64 under the error rule and
bitwise deterministic. A GPU run of these is what a candidate needs before `auto`."""
from __future__ import annotations

import pytest
import torch

from kfac_fast.backends import reference
from kfac_fast.kernels import conv_factor, factor_update_grouped
from tests._oracle import assert_error_rule
from tests.triton.test_factor_update import DEV, oracles, poison_lower, sym_factor

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(DEV != "cuda", reason="real tile sizes in bf16: GPU only")]


def test_gpu_grouped_splitk_bf16():
    gen = torch.Generator().manual_seed(21)
    xs = [torch.randn(8192, 1024, generator=gen).to(torch.bfloat16).to(DEV),
          torch.randn(8192, 255, generator=gen).to(torch.bfloat16).to(DEV),  # unaligned: d = 255
          torch.randn(300, 64, generator=gen).to(torch.bfloat16).to(DEV)]     # too short to split
    f0s = [sym_factor(x.shape[1] + 1, gen) for x in xs]
    beta, alpha = 0.9, 1 / 8192
    runs = []
    for _ in range(2):
        outs = [poison_lower(f) for f in f0s]
        factor_update_grouped.update_factors_(outs, xs, beta, alpha, append_ones=True, config={"SPLIT_K": 4})
        runs.append(outs)
    for out, f, x in zip(runs[0], f0s, xs):
        ref64, ref32 = oracles(reference.update_factor_, f, x, beta, alpha, append_ones=True)
        assert torch.equal(out, out.T)
        assert_error_rule(out, ref64, ref32)
    assert all(torch.equal(a, b) for a, b in zip(*runs))


# C: 32 and 64 take the 16-byte gather of the (kh, kw, c) order, 24 runs of 8 aligned
# channels that are no multiple of 16, 3 the scalar gather: what the interpreter cannot show.
@pytest.mark.parametrize("config,channels_last,C", [(conv_factor.CONFIG_CONV_16BIT_SPLIT, False, 32),
                                                     (conv_factor.CONFIG_CONV_16BIT_CL, True, 32),
                                                     (conv_factor.CONFIG_CONV_16BIT_CL, True, 3),
                                                     (conv_factor.CONFIG_CONV_16BIT_CL, True, 24),
                                                     (conv_factor.CONFIG_CONV_16BIT_CL, True, 64),
                                                     (conv_factor.CONFIG_CONV_16BIT_CL_SPLIT, True, 32),
                                                     (conv_factor.CONFIG_CONV_16BIT_CL_SPLIT, True, 3)])
def test_gpu_conv_candidates_bf16(config, channels_last, C):
    gen = torch.Generator().manual_seed(22)
    x = torch.randn(8, C, 28, 28, generator=gen).to(torch.bfloat16).to(DEV)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    f0 = sym_factor(C * 9 + 1, gen)
    beta, alpha = torch.tensor(0.9, device=DEV), torch.tensor(1 / 4096, device=DEV)
    ref64, ref32 = oracles(reference.conv_input_factor_, f0, x, beta, alpha, 3, 1, 1, 1, append_ones=True)
    runs = []
    for _ in range(2):
        out = poison_lower(f0)
        conv_factor.conv_input_factor_(out, x, beta, alpha, 3, 1, 1, 1, append_ones=True, config=config)
        runs.append(out)
    assert torch.equal(runs[0], runs[0].T)
    assert_error_rule(runs[0], ref64, ref32)
    assert torch.equal(runs[0], runs[1])
