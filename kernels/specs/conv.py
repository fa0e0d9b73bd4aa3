"""Compile specs of the conv input factor (`kernels/conv_factor.py`)."""
from __future__ import annotations

import torch

from .. import conv_factor as cf
from .. import splitk as sk
from . import Spec, launch, sig

SIZED = ("stride_f", "sH", "sC", "sN")


def specs() -> list:
    out = []
    split = cf.CONFIG_CONV_16BIT_SPLIT["SPLIT_K"]
    # (x, k, channels-last order's C (0: unfold order), SPLIT_K)
    # (x, tl.dot precision, k, channels-last order's C (0: unfold order), SPLIT_K); each
    # config as the launcher builds it (conv_factor.candidate_base, then SPLIT_K / CL).
    for x, prec, k, c, s in [("fp16", "ieee", 3, 0, 1), ("bf16", "ieee", 3, 0, 1), ("bf16", "ieee", 1, 0, 1),
                             ("fp32", "ieee", 3, 0, 1), ("fp32", "tf32", 3, 0, 1),
                             ("fp16", "ieee", 3, 64, 1), ("bf16", "ieee", 3, 64, 1), ("bf16", "ieee", 3, 3, 1),
                             ("fp32", "ieee", 3, 64, 1), ("bf16", "ieee", 3, 0, split), ("fp32", "ieee", 3, 0, split),
                             ("fp32", "tf32", 3, 0, split), ("bf16", "ieee", 3, 64, split)]:
        cfg = cf.candidate_base({"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[x],
                                prec == "tf32", {"CL": c > 0})
        ce = dict(KH=k, KW=k, BETA_ON_DEVICE=True, ALPHA_ON_DEVICE=True, INDEX64=False,
                  BLOCK=cfg["BLOCK"], BLOCK_K=cfg["BLOCK_K"], INPUT_PRECISION=prec, CL=c > 0, SPLIT_K=s, C_CL=c)
        types = dict(F="*fp32", X=f"*{x}", beta_ptr="*fp32", alpha_ptr="*fp32", beta_val="fp32",
                     alpha_val="fp32", stride_f="i32", Wk="*fp32", rows_per_split="i32",
                     **{a: "i32" for a in ("R", "L", "OW", "d", "n", "H", "W", "sN", "sC", "sH", "sW",
                                          "stride_h", "stride_w", "pad_h", "pad_w", "dil_h", "dil_w")})
        if c:
            # Channels-last (sC == 1, sW == C): the strides follow C, not n; C = 64 keeps
            # them multiples of 16 at every n (the vectorised gather), C = 3 never.
            unit, div16, sized = "sC", (("sH", "sW", "sN") if c % 16 == 0 else ()) + ("stride_f",), ("stride_f",)
        else:  # NCHW: sW == 1
            unit, div16, sized = "sW", SIZED, SIZED
        label = f"{x}{',tf32' if prec == 'tf32' else ''},{k}x{k}" + (f",channels-last,C={c}" if c else "") + \
            (f",split{s}" if s > 1 else "")
        # Triton makes an int equal to 1 a constant: stride and dilation 1, and the padding
        # 1 of every 3x3 "same" conv (a 1x1 conv has padding 0, not specialised).
        pads = ("pad_h", "pad_w") if k == 3 else ()
        out.append(Spec(f"conv_factor[{label}]", cf._conv_factor_kernel,
                        sig(cf._conv_factor_kernel, types, ce), ce, launch(cfg),
                        tensor_cores=(x != "fp32" or prec == "tf32"),
                        ones=(unit, "stride_h", "stride_w", "dil_h", "dil_w", *pads),
                        div16=div16, realistic=sized, candidate=c > 0 or s > 1,
                        index64=cf.INDEX64_16BIT if x != "fp32" else {}))
    # Split-K's reduction for the conv candidate: kernels/splitk.py's kernel on square tiles.
    for block in (cf.CONFIG_CONV_16BIT["BLOCK"], cf.CONFIG_CONV_FP32["BLOCK"]):
        ce = dict(BETA_ON_DEVICE=True, ALPHA_ON_DEVICE=True, INDEX64=False, BLOCK_M=block, BLOCK_N=block,
                  SPLIT_K=cf.CONFIG_CONV_16BIT_SPLIT["SPLIT_K"])
        types = dict(F="*fp32", Wk="*fp32", work="*i32", beta_ptr="*fp32", alpha_ptr="*fp32", beta_val="fp32",
                     alpha_val="fp32", n="i32", stride_f="i32")
        out.append(Spec(f"conv_splitk_reduce[{block}x{block},split{ce['SPLIT_K']}]", sk._splitk_reduce_kernel,
                        sig(sk._splitk_reduce_kernel, types, ce), ce, dict(num_warps=sk.REDUCE_WARPS, num_stages=1),
                        tensor_cores=False, div16=("stride_f", "n"), realistic=("n", "stride_f"), candidate=True))
    # The (kh, kw, c) order's split-K reduction (conv_factor._cl_reduce_kernel).
    ce = dict(BETA_ON_DEVICE=True, ALPHA_ON_DEVICE=True, INDEX64=False, BLOCK=cf.CONFIG_CONV_16BIT_CL["BLOCK"],
              SPLIT_K=split, KHW=9)
    types = dict(F="*fp32", Wk="*fp32", beta_ptr="*fp32", alpha_ptr="*fp32", beta_val="fp32", alpha_val="fp32",
                 d="i32", n="i32", stride_f="i32")
    out.append(Spec(f"conv_cl_reduce[{ce['BLOCK']}x{ce['BLOCK']},split{split}]", cf._cl_reduce_kernel,
                    sig(cf._cl_reduce_kernel, types, ce), ce, dict(num_warps=cf.CL_REDUCE_WARPS, num_stages=1),
                    tensor_cores=False, div16=("stride_f", "n", "d"), realistic=("n", "stride_f", "d"),
                    candidate=True))
    return out
