"""Compile specs of the conv input factor (`kernels/conv_factor.py`)."""
from __future__ import annotations

from .. import conv_factor as cf
from . import Spec, launch, sig

SIZED = ("stride_f", "sH", "sC", "sN")


def specs() -> list:
    out = []
    for x, k in [("fp16", 3), ("bf16", 3), ("bf16", 1), ("fp32", 3)]:
        cfg = cf.CONFIG_CONV_16BIT if x != "fp32" else cf.CONFIG_CONV_FP32
        ce = dict(KH=k, KW=k, BETA_ON_DEVICE=True, ALPHA_ON_DEVICE=True, INDEX64=False,
                  BLOCK=cfg["BLOCK"], BLOCK_K=cfg["BLOCK_K"], INPUT_PRECISION="ieee")
        types = dict(F="*fp32", X=f"*{x}", beta_ptr="*fp32", alpha_ptr="*fp32", beta_val="fp32",
                     alpha_val="fp32", stride_f="i32",
                     **{a: "i32" for a in ("R", "L", "OW", "d", "n", "H", "W", "sN", "sC", "sH", "sW",
                                          "stride_h", "stride_w", "pad_h", "pad_w", "dil_h", "dil_w")})
        out.append(Spec(f"conv_factor[{x},{k}x{k}]", cf._conv_factor_kernel,
                        sig(cf._conv_factor_kernel, types, ce), ce, launch(cfg),
                        tensor_cores=(x != "fp32"), ones=("sW", "stride_h", "stride_w", "dil_h", "dil_w"),
                        div16=("stride_f", "sH", "sC", "sN"), realistic=SIZED))
    return out
