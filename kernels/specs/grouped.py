"""Compile specs of the grouped factor update (`kernels/factor_update_grouped.py`): per
input dtype the unaligned variant (scalar loads) and the ALIGNED one (host-checked
16-byte facts: cp.async, pipelined)."""
from __future__ import annotations

import triton.language as tl

from .. import factor_update_grouped as fg
from . import Spec, launch, sig


def specs() -> list:
    out = []
    for x, cfg in [("fp16", fg.CONFIG_GROUPED_16BIT), ("bf16", fg.CONFIG_GROUPED_16BIT),
                   ("fp32", fg.CONFIG_GROUPED_FP32)]:
        for aligned in (False, True):
            ce = dict(X_DTYPE={"fp16": tl.float16, "bf16": tl.bfloat16, "fp32": tl.float32}[x], INDEX64=False,
                      BLOCK=cfg["BLOCK"], BLOCK_K=cfg["BLOCK_K"], INPUT_PRECISION="ieee", ALIGNED=aligned)
            types = dict(work="*i32", meta="*i64", betas="*fp32", alphas="*fp32")
            out.append(Spec(f"factor_update_grouped[{x}{',aligned' if aligned else ''}]",
                            fg._factor_update_grouped_kernel, sig(fg._factor_update_grouped_kernel, types, ce), ce,
                            launch(cfg), tensor_cores=(x != "fp32")))
    return out
