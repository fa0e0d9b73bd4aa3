"""Ahead-of-time compile specs: what one shipped (kernel, signature, constexprs, launch
options) is, and the helpers each kernel family's spec list uses. One module per family
(`fused`, `grouped`, `conv`, `precondition`), each owned with its kernel file;
`kfac_fast.kernels.aot_specs` concatenates them and compiles.
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Spec:
    name: str
    fn: object
    signature: dict
    constexprs: dict
    options: dict
    tensor_cores: bool  # whether this config must run its dots on tensor cores
    # Specialisations Triton's launcher makes at run time for the common case: ints equal
    # to 1 become constants, pointers and ints divisible by 16 are marked so.
    ones: tuple = ()
    div16: tuple = ()
    n_case: str = ""  # realistic-size variant: "n=d" (all multiples of 16), "n=d+1", "odd d"
    candidate: bool = False  # not shipped in `auto`: reported, never gated on by the tests
    # Spec lists mark `realistic = (sized ints,)` to be compiled at n = d, n = d + 1 and odd d.
    realistic: tuple = ()
    # Constexprs the launcher changes when it needs 64-bit offsets (INDEX64), e.g. a smaller
    # BLOCK_K; aot_specs compiles that launch too.
    index64: dict = field(default_factory=dict)


def sig(fn, types: dict, constexprs: dict) -> dict:
    """Full signature in argument order: constexprs typed "constexpr"."""
    return {a: ("constexpr" if a in constexprs else types[a]) for a in fn.arg_names}


def launch(cfg) -> dict:
    return dict(num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
