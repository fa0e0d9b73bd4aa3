"""Compile specs of the grouped factor update (`kernels/factor_update_grouped.py`): per
input dtype the unaligned variant (scalar loads) and the ALIGNED one (host-checked
16-byte facts: cp.async, pipelined)."""
from __future__ import annotations

import torch
import triton.language as tl

from .. import factor_update_grouped as fg
from .. import grouped_splitk as gs
from . import Spec, launch, sig


def specs() -> list:
    out = []
    for x, prec, dtype in [("fp16", "ieee", torch.float16), ("bf16", "ieee", torch.bfloat16),
                           ("fp32", "ieee", torch.float32), ("fp32", "tf32", torch.float32)]:
        for aligned in (False, True):
            cfg = fg.pick_config(dtype, prec == "tf32", aligned)
            ce = dict(X_DTYPE={"fp16": tl.float16, "bf16": tl.bfloat16, "fp32": tl.float32}[x], INDEX64=False,
                      BLOCK=cfg["BLOCK"], BLOCK_K=cfg["BLOCK_K"], INPUT_PRECISION=prec, ALIGNED=aligned)
            types = dict(work="*i32", meta="*i64", betas="*fp32", alphas="*fp32")
            label = f"{x}{',tf32' if prec == 'tf32' else ''}{',aligned' if aligned else ''}"
            tensor_cores = x != "fp32" or prec == "tf32"
            out.append(Spec(f"factor_update_grouped[{label}]",
                            fg._factor_update_grouped_kernel, sig(fg._factor_update_grouped_kernel, types, ce), ce,
                            launch(cfg), tensor_cores=tensor_cores))
            # Candidate out of `auto`: split-K's partial kernel (kernels/grouped_splitk.py).
            types = dict(work="*i32", meta="*i64", betas="*fp32", alphas="*fp32", Wk="*fp32")
            out.append(Spec(f"grouped_splitk_partial[{label}]",
                            gs._grouped_partial_kernel, sig(gs._grouped_partial_kernel, types, ce), ce,
                            launch(gs.partial_config(cfg, dtype)), tensor_cores=tensor_cores, candidate=True))
    for block in sorted({fg.CONFIG_GROUPED_16BIT["BLOCK"], fg.CONFIG_GROUPED_FP32["BLOCK"]}):
        ce = dict(INDEX64=False, BLOCK=block)
        types = dict(rwork="*i32", meta="*i64", betas="*fp32", alphas="*fp32", Wk="*fp32")
        out.append(Spec(f"grouped_splitk_reduce[{block}]", gs._grouped_reduce_kernel,
                        sig(gs._grouped_reduce_kernel, types, ce), ce,
                        dict(num_warps=gs.REDUCE_WARPS, num_stages=1), tensor_cores=False, candidate=True))
    return out
