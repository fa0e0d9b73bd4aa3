"""Compile specs of the conv input factor (`kernels/conv_factor.py`)."""
from __future__ import annotations

from .. import conv_factor as cf
from . import Spec, launch, sig

SIZED = ("stride_f", "sH", "sC", "sN")
SIZED_CL = ("stride_f", "sH", "sW", "sN")


def specs() -> list:
    out = []
    for x, k, cl in [("fp16", 3, False), ("bf16", 3, False), ("bf16", 1, False), ("fp32", 3, False),
                     ("fp16", 3, True), ("bf16", 3, True), ("fp32", 3, True)]:
        if cl:  # candidates out of `auto`: columns in (kh, kw, c) order
            cfg = cf.CONFIG_CONV_16BIT_CL if x != "fp32" else cf.CONFIG_CONV_FP32_CL
        else:
            cfg = cf.CONFIG_CONV_16BIT if x != "fp32" else cf.CONFIG_CONV_FP32
        ce = dict(KH=k, KW=k, BETA_ON_DEVICE=True, ALPHA_ON_DEVICE=True, INDEX64=False,
                  BLOCK=cfg["BLOCK"], BLOCK_K=cfg["BLOCK_K"], INPUT_PRECISION="ieee", CL=cl)
        types = dict(F="*fp32", X=f"*{x}", beta_ptr="*fp32", alpha_ptr="*fp32", beta_val="fp32",
                     alpha_val="fp32", stride_f="i32",
                     **{a: "i32" for a in ("R", "L", "OW", "d", "n", "H", "W", "sN", "sC", "sH", "sW",
                                          "stride_h", "stride_w", "pad_h", "pad_w", "dil_h", "dil_w")})
        # NCHW: sW == 1; channels-last (CL, columns in (kh, kw, c) order): sC == 1, sW == C.
        unit, sized = ("sC", SIZED_CL) if cl else ("sW", SIZED)
        out.append(Spec(f"conv_factor[{x},{k}x{k}{',channels-last' if cl else ''}]", cf._conv_factor_kernel,
                        sig(cf._conv_factor_kernel, types, ce), ce, launch(cfg),
                        tensor_cores=(x != "fp32"), ones=(unit, "stride_h", "stride_w", "dil_h", "dil_w"),
                        div16=sized, realistic=sized, candidate=cl))
    return out
