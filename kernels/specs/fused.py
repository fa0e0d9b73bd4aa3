"""Compile specs of the fused factor update (`kernels/factor_update.py`)."""
from __future__ import annotations

from .. import factor_update as fu
from . import Spec, launch, sig

# The ints whose divisibility by 16 follows n and d (realistic sizes: aot_specs._variants).
SIZED = ("d", "n", "stride_f", "s_inner")


def _types(x: str) -> dict:
    return dict(F="*fp32", X=f"*{x}", beta_ptr="*fp32", alpha_ptr="*fp32", beta_val="fp32",
                alpha_val="fp32", R="i32", d="i32", n="i32", L_inner="i32", s_outer="i64",
                s_inner="i64", s_col="i64", stride_f="i32")


def specs() -> list:
    out = []
    for x, prec, cfg in [("fp16", "ieee", fu.CONFIG_16BIT), ("bf16", "ieee", fu.CONFIG_16BIT),
                         ("fp32", "ieee", fu.CONFIG_FP32), ("fp32", "tf32", fu.CONFIG_TF32)]:
        ce = dict(BETA_ON_DEVICE=True, ALPHA_ON_DEVICE=True, TWO_LEVEL=False, INDEX64=False,
                  BLOCK=cfg["BLOCK"], BLOCK_K=cfg["BLOCK_K"], INPUT_PRECISION=prec, ONES_OUTSIDE=False)
        out.append(Spec(f"factor_update[{x},{prec}]", fu._factor_update_kernel,
                        sig(fu._factor_update_kernel, _types(x), ce), ce, launch(cfg),
                        tensor_cores=(x != "fp32" or prec == "tf32"), ones=("s_col",),
                        div16=("s_inner", "stride_f", "d", "n"), realistic=SIZED))
    # Candidates out of `auto` (kernel_report scores them; the compile test does not gate
    # on them): the fused update with the ones column out of the K loop.
    for x in ("bf16",):
        cfg = fu.CONFIG_16BIT_ONES_OUTSIDE
        ce = dict(BETA_ON_DEVICE=True, ALPHA_ON_DEVICE=True, TWO_LEVEL=False, INDEX64=False,
                  BLOCK=cfg["BLOCK"], BLOCK_K=cfg["BLOCK_K"], INPUT_PRECISION="ieee", ONES_OUTSIDE=True)
        out.append(Spec(f"factor_update[{x},ieee,ones-outside]", fu._factor_update_kernel,
                        sig(fu._factor_update_kernel, _types(x), ce), ce, launch(cfg),
                        tensor_cores=True, ones=("s_col",), div16=("s_inner", "stride_f", "d", "n"),
                        candidate=True, realistic=SIZED))
    return out
