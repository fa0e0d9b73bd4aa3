"""Compile specs of the grouped eigenbasis preconditioning (`kernels/precondition.py`)."""
from __future__ import annotations

import triton.language as tl

from .. import precondition as pc
from . import Spec, launch, sig


def specs() -> list:
    out = []
    f32, bf16 = tl.float32, tl.bfloat16
    for prec, cfg in [("ieee", pc.CONFIG_FP32), ("tf32", pc.CONFIG_TF32)]:
        for label, a_dt, c_dt, a_extra, c_extra, epi in [
                ("dW.QA", bf16, f32, True, False, 0), ("damp+kl", f32, f32, False, False, 1),
                ("QG.V", f32, f32, False, False, 0), ("U.QA^T->grad", f32, bf16, False, True, 2)]:
            ce = dict(A_DTYPE=a_dt, B_DTYPE=f32, C_DTYPE=c_dt, A_EXTRA=a_extra, C_EXTRA=c_extra,
                      EPILOGUE=epi, BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"],
                      BLOCK_K=cfg["BLOCK_K"], INPUT_PRECISION=prec)
            types = dict(work="*i32", meta="*i64", damping="*fp32", partials="*fp32", nu_ptr="*fp32")
            out.append(Spec(f"precondition_gemm[{label},{prec}]", pc._grouped_gemm_kernel,
                            sig(pc._grouped_gemm_kernel, types, ce), ce, launch(cfg),
                            tensor_cores=(prec == "tf32")))
    ce = dict(LR_ON_DEVICE=True, KL_ON_DEVICE=True, BLOCK=pc.NU_BLOCK)
    types = dict(partials="*fp32", starts="*i32", L="i32", lr_ptr="*fp32", lr_val="fp32", kl_ptr="*fp32",
                 kl_val="fp32", nu_ptr="*fp32")
    out.append(Spec("kl_nu", pc._kl_nu_kernel, sig(pc._kl_nu_kernel, types, ce), ce,
                    dict(num_warps=4, num_stages=1), tensor_cores=False))
    return out
