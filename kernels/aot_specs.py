"""Every (kernel, signature, constexprs, launch options) this package ships, compiled
ahead of time for a GPU target without a GPU, with ptxas's register/spill report.

Used by tests/test_triton_compile.py (tensor cores, no spills, shared memory within the
arch's limit) and bench/kernel_report.py. Works on Triton 3.6 through 3.9.
"""
from __future__ import annotations

import os
import re
import subprocess
import tempfile
from dataclasses import dataclass

import triton

from . import conv_factor, factor_update, precondition

# Opt-in shared memory per block (bytes): sm_90 227 KiB, sm_80 163 KiB.
SHARED_LIMIT = {90: 232448, 80: 166912}


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


def _sig(fn, types: dict, constexprs: dict) -> dict:
    """Full signature in argument order: constexprs typed "constexpr"."""
    return {a: ("constexpr" if a in constexprs else types[a]) for a in fn.arg_names}


_TY = {"fp32": "fp32", "fp16": "fp16", "bf16": "bf16"}


def _launch(cfg):
    return dict(num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])


# The factor kernels at realistic sizes (issue 17, defect 8): Triton marks an int argument
# divisible by 16 only when it is, so n = d + 1 (append_ones) and odd layer widths compile
# to different code (unaligned epilogue and loads) from the n = d case.
_REALISTIC = {"n=d": None, "n=d+1": ("d", "s_inner", "sH", "sC", "sN"), "odd d": ()}


def _variants(spec: "Spec", sized: tuple) -> list:
    """spec at each realistic size: `sized` names the ints that follow n and d."""
    out = []
    for case, keep in _REALISTIC.items():
        div16 = spec.div16 if keep is None else tuple(a for a in spec.div16 if a not in sized or a in keep)
        out.append(Spec(f"{spec.name}@{case}", spec.fn, spec.signature, spec.constexprs, spec.options,
                        spec.tensor_cores, spec.ones, div16, case, spec.candidate))
    return out


def realistic_specs() -> list:
    """The factor-update and conv configs at n = d, n = d + 1 and odd d (strides not
    multiples of 16), plus every other shipped spec once."""
    out = []
    for spec in specs():
        if spec.name.startswith("factor_update["):
            out += _variants(spec, ("d", "n", "stride_f", "s_inner"))
        elif spec.name.startswith("conv_factor["):
            out += _variants(spec, ("stride_f", "sH", "sC", "sN"))
        else:
            out.append(spec)
    return out


def specs() -> list:
    out = []
    fu, cf, pc = factor_update, conv_factor, precondition
    for x, prec, cfg in [("fp16", "ieee", fu.CONFIG_16BIT), ("bf16", "ieee", fu.CONFIG_16BIT),
                         ("fp32", "ieee", fu.CONFIG_FP32), ("fp32", "tf32", fu.CONFIG_TF32)]:
        ce = dict(BETA_ON_DEVICE=True, ALPHA_ON_DEVICE=True, TWO_LEVEL=False, INDEX64=False,
                  BLOCK=cfg["BLOCK"], BLOCK_K=cfg["BLOCK_K"], INPUT_PRECISION=prec, ONES_OUTSIDE=False)
        types = dict(F="*fp32", X=f"*{x}", beta_ptr="*fp32", alpha_ptr="*fp32", beta_val="fp32",
                     alpha_val="fp32", R="i32", d="i32", n="i32", L_inner="i32", s_outer="i64",
                     s_inner="i64", s_col="i64", stride_f="i32")
        out.append(Spec(f"factor_update[{x},{prec}]", fu._factor_update_kernel,
                        _sig(fu._factor_update_kernel, types, ce), ce, _launch(cfg),
                        tensor_cores=(x != "fp32" or prec == "tf32"), ones=("s_col",),
                        div16=("s_inner", "stride_f", "d", "n")))
    # Candidates out of `auto` (kernel_report scores them; the compile test does not gate
    # on them): the fused update with the ones column out of the K loop.
    for x in ("bf16",):
        cfg = fu.CONFIG_16BIT_ONES_OUTSIDE
        ce = dict(BETA_ON_DEVICE=True, ALPHA_ON_DEVICE=True, TWO_LEVEL=False, INDEX64=False,
                  BLOCK=cfg["BLOCK"], BLOCK_K=cfg["BLOCK_K"], INPUT_PRECISION="ieee", ONES_OUTSIDE=True)
        types = dict(F="*fp32", X=f"*{x}", beta_ptr="*fp32", alpha_ptr="*fp32", beta_val="fp32",
                     alpha_val="fp32", R="i32", d="i32", n="i32", L_inner="i32", s_outer="i64",
                     s_inner="i64", s_col="i64", stride_f="i32")
        out.append(Spec(f"factor_update[{x},ieee,ones-outside]", fu._factor_update_kernel,
                        _sig(fu._factor_update_kernel, types, ce), ce, _launch(cfg),
                        tensor_cores=True, ones=("s_col",), div16=("s_inner", "stride_f", "d", "n"),
                        candidate=True))
    for x, cfg in [("fp16", fu.CONFIG_GROUPED_16BIT), ("bf16", fu.CONFIG_GROUPED_16BIT),
                   ("fp32", fu.CONFIG_GROUPED_FP32)]:
        import triton.language as tl

        ce = dict(X_DTYPE={"fp16": tl.float16, "bf16": tl.bfloat16, "fp32": tl.float32}[x], INDEX64=False,
                  BLOCK=cfg["BLOCK"], BLOCK_K=cfg["BLOCK_K"], INPUT_PRECISION="ieee")
        types = dict(work="*i32", meta="*i64", betas="*fp32", alphas="*fp32")
        out.append(Spec(f"factor_update_grouped[{x}]", fu._factor_update_grouped_kernel,
                        _sig(fu._factor_update_grouped_kernel, types, ce), ce, _launch(cfg),
                        tensor_cores=(x != "fp32")))
    for x, k in [("fp16", 3), ("bf16", 3), ("bf16", 1), ("fp32", 3)]:
        cfg = fu.CONFIG_CONV_16BIT if x != "fp32" else fu.CONFIG_FP32
        ce = dict(KH=k, KW=k, BETA_ON_DEVICE=True, ALPHA_ON_DEVICE=True, INDEX64=False,
                  BLOCK=cfg["BLOCK"], BLOCK_K=cfg["BLOCK_K"], INPUT_PRECISION="ieee")
        types = dict(F="*fp32", X=f"*{x}", beta_ptr="*fp32", alpha_ptr="*fp32", beta_val="fp32",
                     alpha_val="fp32", stride_f="i32",
                     **{a: "i32" for a in ("R", "L", "OW", "d", "n", "H", "W", "sN", "sC", "sH", "sW",
                                          "stride_h", "stride_w", "pad_h", "pad_w", "dil_h", "dil_w")})
        out.append(Spec(f"conv_factor[{x},{k}x{k}]", cf._conv_factor_kernel,
                        _sig(cf._conv_factor_kernel, types, ce), ce, _launch(cfg),
                        tensor_cores=(x != "fp32"), ones=("sW", "stride_h", "stride_w", "dil_h", "dil_w"),
                        div16=("stride_f", "sH", "sC", "sN")))
    import triton.language as tl

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
                            _sig(pc._grouped_gemm_kernel, types, ce), ce, _launch(cfg),
                            tensor_cores=(prec == "tf32")))
    ce = dict(LR_ON_DEVICE=True, KL_ON_DEVICE=True, BLOCK=pc.NU_BLOCK)
    types = dict(partials="*fp32", starts="*i32", L="i32", lr_ptr="*fp32", lr_val="fp32", kl_ptr="*fp32", kl_val="fp32",
                 nu_ptr="*fp32")
    out.append(Spec("kl_nu", pc._kl_nu_kernel, _sig(pc._kl_nu_kernel, types, ce), ce,
                    dict(num_warps=4, num_stages=1), tensor_cores=False))
    return out


def compile_spec(spec: Spec, cap: int):
    """triton.compile for sm_<cap> (no GPU needed)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    names = spec.fn.arg_names
    signature = dict(spec.signature)
    constexprs = dict(spec.constexprs)
    for a in spec.ones:
        signature[a] = "constexpr"
        constexprs[a] = 1
    div16 = [a for a in names if a in spec.div16 or (signature[a].startswith("*") and a not in spec.ones)]
    attrs = {(names.index(a),): [["tt.divisibility", 16]] for a in div16}
    src = ASTSource(fn=spec.fn, signature=signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", cap, 32), options=dict(spec.options))


def ptxas_path(cap: int) -> str:
    """The ptxas Triton itself uses for this arch (3.6+: knobs-based lookup)."""
    try:
        from triton.backends.nvidia.compiler import get_ptxas

        return get_ptxas(cap).path
    except Exception:  # older layouts: the binary next to the backend
        import triton.backends.nvidia as nv

        bin_dir = os.path.join(os.path.dirname(nv.__file__), "bin")
        for name in ("ptxas-blackwell", "ptxas"):
            if os.path.exists(os.path.join(bin_dir, name)):
                return os.path.join(bin_dir, name)
        raise


def ptxas_report(ptx: str, cap: int) -> dict:
    """Registers, spill bytes and stack from `ptxas -v` run on the kernel's PTX."""
    arch = re.search(r"^\.target\s+(sm_\w+)", ptx, re.M).group(1)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        res = subprocess.run([ptxas_path(cap), f"-arch={arch}", "-v", path, "-o", os.path.join(tmp, "k.o")],
                             capture_output=True, text=True, check=True)
    text = res.stderr + res.stdout
    regs = int(re.search(r"Used (\d+) registers", text).group(1))
    spill_st = sum(int(v) for v in re.findall(r"(\d+) bytes spill stores", text))
    spill_ld = sum(int(v) for v in re.findall(r"(\d+) bytes spill loads", text))
    return dict(registers=regs, spill_stores=spill_st, spill_loads=spill_ld, text=text)


def sass(cubin: bytes, cap: int) -> str:
    """nvdisasm of a cubin (the nvdisasm Triton ships next to its ptxas)."""
    tool = os.path.join(os.path.dirname(ptxas_path(cap)), "nvdisasm")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        return subprocess.run([tool, "-c", path], capture_output=True, text=True, check=True).stdout


_INSN = re.compile(r"^\s*/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)")


def main_loop(text: str) -> dict:
    """The instruction mix of the K loop: the backward branch whose body holds the most
    MMA instructions (HGMMA / HMMA / FFMA). Counts per K-step of one warp."""
    lines = text.splitlines()
    labels = {m.group(1): i for i, line in enumerate(lines) if (m := re.match(r"^(\.L_x_\d+):", line))}
    best: dict = {}
    for i, line in enumerate(lines):
        m = re.search(r"BRA\s+`?\(?(\.L_x_\d+)", line)
        if not m or labels.get(m.group(1), i) >= i:
            continue
        ops = [mm.group(1) for mm in map(_INSN.match, lines[labels[m.group(1)]:i + 1]) if mm]
        ops = [o for o in ops if o != "NOP"]
        mix = dict(instructions=len(ops), hgmma=sum(o.startswith("HGMMA") for o in ops),
                   hmma=sum(o.startswith("HMMA") for o in ops), ffma=sum(o.startswith("FFMA") for o in ops),
                   sel=sum(o.startswith("SEL") for o in ops), sts=sum(o.startswith("STS") for o in ops),
                   lds=sum(o.startswith(("LDS", "LDSM")) for o in ops),
                   ldgsts=sum(o.startswith("LDGSTS") for o in ops),
                   ldg=sum(o.startswith("LDG.") or o == "LDG" for o in ops),
                   wait0=any("WARPGROUP.DEPBAR.LE gsb0, 0x0" in x for x in lines[labels[m.group(1)]:i + 1]))
        key = mix["hgmma"] + mix["hmma"] + mix["ffma"]
        if key > best.get("_key", -1):
            best = dict(mix, _key=key)
    best.pop("_key", None)
    return best


def report(spec: Spec, cap: int, loop: bool = False) -> dict:
    """Compile one spec for sm_<cap>; registers, spills, shared memory, tensor-core use;
    with `loop`, the K loop's instruction mix from the SASS (`main_loop`)."""
    k = compile_spec(spec, cap)
    ptx = k.asm["ptx"]
    info = ptxas_report(ptx, cap)
    info.update(shared=k.metadata.shared, wgmma="wgmma" in ptx, mma=bool(re.search(r"\bmma\.sync", ptx)))
    if loop:
        info["loop"] = main_loop(sass(k.asm["cubin"], cap))
    return info
