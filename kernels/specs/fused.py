"""Compile specs of the fused factor update (`kernels/factor_update.py`, `splitk.py`, `splitk_tail.py`)."""
from __future__ import annotations

from dataclasses import replace

from .. import factor_update as fu
from .. import splitk as sk
from .. import splitk_tail as st
from . import Spec, launch, sig

# The ints whose divisibility by 16 follows n and d (realistic sizes: aot_specs._variants).
SIZED = ("d", "n", "stride_f", "s_inner")


def _types(x: str) -> dict:
    return dict(F="*fp32", X=f"*{x}", beta_ptr="*fp32", alpha_ptr="*fp32", beta_val="fp32",
                alpha_val="fp32", R="i32", d="i32", n="i32", L_inner="i32", s_outer="i64",
                s_inner="i64", s_col="i64", stride_f="i32")


def _spec(name: str, x: str, prec: str, cfg: dict, **kw) -> Spec:
    ce = dict(BETA_ON_DEVICE=True, ALPHA_ON_DEVICE=True, TWO_LEVEL=False, INDEX64=False,
              BLOCK=cfg["BLOCK"], BLOCK_K=cfg["BLOCK_K"], INPUT_PRECISION=prec,
              ONES_OUTSIDE=cfg.get("ONES_OUTSIDE", False), ROW_ALIGN=1)
    return Spec(name, fu._factor_update_kernel, sig(fu._factor_update_kernel, _types(x), ce), ce, launch(cfg),
                tensor_cores=(x != "fp32" or prec == "tf32"), ones=("s_col",),
                div16=("s_inner", "stride_f", "d", "n"), **{"realistic": SIZED, **kw})


def specs() -> list:
    out = [_spec(f"factor_update[{x},{prec}]", x, prec, cfg)
           for x, prec, cfg in [("fp16", "ieee", fu.CONFIG_16BIT), ("bf16", "ieee", fu.CONFIG_16BIT),
                                ("fp32", "ieee", fu.CONFIG_FP32), ("fp32", "tf32", fu.CONFIG_TF32)]]
    # Rows 16-byte aligned although d and the row stride are not multiples of 16
    # (d = 8 mod 16): the host's ROW_ALIGN hint keeps the loads 16-byte cp.async.
    for x, prec, cfg, a in [("bf16", "ieee", fu.CONFIG_16BIT, 8), ("fp32", "tf32", fu.CONFIG_TF32, 4)]:
        s = _spec(f"factor_update[{x},{prec}]@row-align{a}", x, prec, cfg, realistic=())
        out.append(replace(s, constexprs=dict(s.constexprs, ROW_ALIGN=a), div16=("stride_f", "n")))
    # For comparison, not shipped: the in-loop ones column (the kernel before the rebuild).
    out.append(_spec("factor_update[bf16,ieee,ones-in-loop]", "bf16", "ieee", fu.CONFIG_16BIT_ONES_IN_LOOP,
                     candidate=True))
    # Candidates (kernels/splitk.py): 128x256 tiles in one kernel, and split over the rows
    # (SPLIT_K = 4, the split pick_split gives N = 8192, n = 4096) with its reduction.
    # The float32 inputs get candidate_config's tiles: TF32 128x128 (CONFIG_TF32_RECT),
    # IEEE the 64x64 FMA tiles (CONFIG_FP32_RECT).
    for x, prec, cfg, split in [("bf16", "ieee", sk.CONFIG_128x256, 1), ("bf16", "ieee", sk.CONFIG_128x256, 4),
                                ("fp32", "tf32", sk.CONFIG_TF32_RECT, 4), ("fp32", "ieee", sk.CONFIG_FP32_RECT, 4)]:
        ce = dict(BETA_ON_DEVICE=True, ALPHA_ON_DEVICE=True, TWO_LEVEL=False, INDEX64=False,
                  BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"], SPLIT_K=split,
                  INPUT_PRECISION=prec, ROW_ALIGN=1)
        types = dict(_types(x), Wk="*fp32", work="*i32", rows_per_split="i32")
        out.append(Spec(f"factor_update[{x},{prec},{cfg['BLOCK_M']}x{cfg['BLOCK_N']},split{split}]", sk._rect_kernel,
                        sig(sk._rect_kernel, types, ce), ce, launch(cfg), tensor_cores=(prec != "ieee" or x != "fp32"),
                        ones=("s_col",), div16=("s_inner", "stride_f", "d", "n", "rows_per_split"), realistic=SIZED,
                        candidate=True))
    cfg = sk.CONFIG_128x256
    ce = dict(BETA_ON_DEVICE=True, ALPHA_ON_DEVICE=True, INDEX64=False, BLOCK_M=cfg["BLOCK_M"],
              BLOCK_N=cfg["BLOCK_N"], SPLIT_K=4)
    types = dict(F="*fp32", Wk="*fp32", work="*i32", beta_ptr="*fp32", alpha_ptr="*fp32", beta_val="fp32",
                 alpha_val="fp32", n="i32", stride_f="i32")
    out.append(Spec("splitk_reduce[128x256,split4]", sk._splitk_reduce_kernel,
                    sig(sk._splitk_reduce_kernel, types, ce), ce, dict(num_warps=sk.REDUCE_WARPS, num_stages=1),
                    tensor_cores=False, div16=("stride_f", "n"), realistic=("n", "stride_f"), candidate=True))
    # The tail-split schedule (SCHEDULE = "tail"): one work-list kernel (unsplit tiles with
    # the epilogue, tail chunks to the workspace; rows_per_chunk is a multiple of BLOCK_K)
    # and the reduction over the tail tiles' column quarters.
    ce = dict(BETA_ON_DEVICE=True, ALPHA_ON_DEVICE=True, TWO_LEVEL=False, INDEX64=False, BLOCK_M=cfg["BLOCK_M"],
              BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"], INPUT_PRECISION="ieee", ROW_ALIGN=1)
    types = dict(_types("bf16"), Wk="*fp32", work="*i32", rows_per_chunk="i32")
    out.append(Spec("factor_update[bf16,ieee,128x256,tail]", st._tail_kernel, sig(st._tail_kernel, types, ce), ce,
                    launch(cfg), tensor_cores=True, ones=("s_col",),
                    div16=("s_inner", "stride_f", "d", "n", "rows_per_chunk"), realistic=SIZED, candidate=True))
    ce = dict(BETA_ON_DEVICE=True, ALPHA_ON_DEVICE=True, INDEX64=False, BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"])
    types = dict(F="*fp32", Wk="*fp32", rwork="*i32", beta_ptr="*fp32", alpha_ptr="*fp32", beta_val="fp32",
                 alpha_val="fp32", n="i32", stride_f="i32")
    out.append(Spec("tail_reduce[128x256]", st._tail_reduce_kernel, sig(st._tail_reduce_kernel, types, ce), ce,
                    dict(num_warps=sk.REDUCE_WARPS, num_stages=1), tensor_cores=False, div16=("stride_f", "n"),
                    realistic=("n", "stride_f"), candidate=True))
    return out
