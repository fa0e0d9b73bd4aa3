"""Registers, spills and shared memory of every shipped Triton kernel config, compiled
ahead of time (no GPU needed), the K loop's instruction mix from the SASS, and a MODEL
of the fused factor update's main loop on an H200.

    python bench/kernel_report.py [--arch 90,80] [--filter NAME]
    python bench/kernel_report.py --compile [--json FILE]   # sm_90, realistic n, K-loop mix
    python bench/kernel_report.py --model                   # the modelled fraction of peak

--compile exits 1 when a config spills (bench/compile_check.sh runs it under several
Triton versions).

The model (issue 17; committed before any kernel rebuild and not to be tuned after):
  per K-step of one program (one program per SM: these configs use ~255 registers x 256
  threads), in SM cycles,
    T   = 2 BM BN BK / 4096              tensor-core cycles (sm_90 dense bf16/fp16: 4096
                                          FLOP/clk/SM; TF32 2048)
    I   = warps x instructions / 4        issue cycles (4 schedulers, 1 instruction/clk)
    M   = (BM + BN) BK bytes / 38.9       L2 cycles (7.5 TB/s over 132 SMs at the clock
                                          where 132 x 4096 FLOP/clk is 790 TFLOP/s)
    cycles = max(max(T, I) + E, M), E = T / warpgroups when the loop waits for every
             wgmma (`WARPGROUP.DEPBAR.LE gsb0, 0x0`: that warpgroup's MMA is exposed on
             the compute path), else 0; the loads are asynchronous and overlap both
  time = ceil(tiles / 132) waves x ceil(N / BK) K-steps x cycles, and the fraction of the
  bf16 peak is the useful FLOPs N n (n + 1) over 132 x 4096 x time. It is a model of the
  instruction mix, not a measurement: a GPU run (bench/bench_triton.py) replaces it.
"""
import argparse
import json
import math
import sys
import warnings

from kfac_fast.kernels import aot_specs

SMS = 132
FLOP_PER_CLK = {"bf16": 4096, "fp16": 4096, "tf32": 2048}
L2_BYTES_PER_CLK = 7.5e12 / (SMS * 790e12 / (SMS * 4096))  # 38.9 B/clk/SM at the 790-TFLOP/s clock
ELEM_BYTES = {"bf16": 2, "fp16": 2, "tf32": 4}


def model_fraction(loop: dict, cfg: dict, N: int, n: int, dtype: str = "bf16") -> dict:
    """The modelled fraction of the peak (module docstring) of one fused update
    factor (n x n) <- x (N rows) with the K-loop mix `loop` under config `cfg`."""
    bm = bn = cfg["BLOCK"]
    bk = cfg["BLOCK_K"]
    warps = cfg["num_warps"]
    t = 2 * bm * bn * bk / FLOP_PER_CLK[dtype]
    i = warps * loop["instructions"] / 4
    m = (bm + bn) * bk * ELEM_BYTES[dtype] / L2_BYTES_PER_CLK
    exposed = t / max(warps // 4, 1) if loop["wait0"] else 0.0
    cycles = max(max(t, i) + exposed, m)
    nt = math.ceil(n / bm)
    tiles = nt * (nt + 1) // 2
    time = math.ceil(tiles / SMS) * math.ceil(N / bk) * cycles
    frac = N * n * (n + 1) / (SMS * FLOP_PER_CLK[dtype] * time)
    return dict(tensor=t, issue=i, l2=m, cycles=cycles, waves=math.ceil(tiles / SMS), fraction=frac)


def _compile_rows(cap: int, name_filter: str) -> list:
    import triton

    rows = []
    for spec in aot_specs.realistic_specs():
        if name_filter not in spec.name:
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            r = aot_specs.report(spec, cap, loop=True)
        loop = r.get("loop") or {}
        rows.append(dict(config=spec.name, n=spec.n_case or "-", triton=triton.__version__, arch=f"sm_{cap}",
                         registers=r["registers"], spill_stores=r["spill_stores"], spill_loads=r["spill_loads"],
                         shared=r["shared"], hgmma=loop.get("hgmma", 0), ffma=loop.get("ffma", 0),
                         instructions=loop.get("instructions", 0), sel=loop.get("sel", 0),
                         lds=loop.get("lds", 0), sts=loop.get("sts", 0), ldg=loop.get("ldg", 0),
                         ldgsts=loop.get("ldgsts", 0), wait0=loop.get("wait0", False)))
        row = rows[-1]
        print(f"{row['config']:44s} {row['triton']:7s} {row['registers']:4d} {row['spill_stores']:4d}/"
              f"{row['spill_loads']:<4d} {row['hgmma']:5d} {row['instructions']:6d} {row['sel']:4d} "
              f"{row['lds']:4d}/{row['sts']:<4d} {row['ldg']:4d} {row['ldgsts']:6d} "
              f"{'wait0' if row['wait0'] else '-'}", flush=True)
    return rows


def _model_table() -> None:
    from kfac_fast.kernels import factor_update as fu

    print("MODEL (not a measurement; see the module docstring): fused update bf16, N = 8192")
    runs = [(k, case, n, cfg) for k, cfg in (("factor_update[bf16,ieee]", fu.CONFIG_16BIT),
                                            ("factor_update[bf16,ieee,ones-outside]", fu.CONFIG_16BIT_ONES_OUTSIDE))
            for case, n in (("n=d", 4096), ("n=d+1", 4097))]
    for kernel, case, n, cfg in runs:
        spec = next(s for s in aot_specs.realistic_specs() if s.name == f"{kernel}@{case}")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            r = aot_specs.report(spec, 90, loop=True)
        loop = r["loop"]
        m = model_fraction(loop, cfg, 8192, n)
        print(f"  {spec.name:46s} n={n}: {loop['instructions']} instr/K-step/warp, {loop['hgmma']} HGMMA, "
              f"T={m['tensor']:.0f} I={m['issue']:.0f} L2={m['l2']:.0f} -> {m['cycles']:.0f} cycles/K-step, "
              f"{m['waves']} waves, spills {r['spill_stores']}/{r['spill_loads']} B: "
              f"modelled {100 * m['fraction']:.1f}% of the bf16 peak")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="90,80", help="compute capabilities, comma-separated")
    p.add_argument("--filter", default="", help="only specs whose name contains this")
    p.add_argument("--compile", action="store_true", help="sm_90 table at realistic n with the K-loop mix")
    p.add_argument("--model", action="store_true", help="the modelled fraction of the bf16 peak")
    p.add_argument("--json", default="", help="with --compile: write the rows here")
    args = p.parse_args()
    if args.model:
        _model_table()
        return 0
    if args.compile:
        print(f"{'config@n':44s} {'triton':7s} {'regs':>4s} {'spill st/ld':>9s} {'HGMMA':>5s} {'instr':>6s} "
              f"{'sel':>4s} {'lds/sts':>9s} {'ldg':>4s} {'ldgsts':>6s} (per K-step per warp)")
        rows = _compile_rows(90, args.filter)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(rows, f, indent=1)
        spills = [r["config"] for r in rows if r["spill_stores"] or r["spill_loads"]]
        print(f"{len(rows) - len(spills)}/{len(rows)} configs without spills" +
              (f"; spilling: {', '.join(spills)}" if spills else ""))
        return 1 if spills else 0
    print(f"{'kernel[config]':42s} {'arch':5s} {'warps':>5s} {'stages':>6s} {'regs':>4s} {'spill st/ld':>11s} "
          f"{'smem B':>7s} tensor-cores")
    for spec in aot_specs.specs():
        if args.filter not in spec.name:
            continue
        for cap in (int(c) for c in args.arch.split(",")):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                r = aot_specs.report(spec, cap)
            tc = "wgmma" if r["wgmma"] else "mma" if r["mma"] else "-"
            print(f"{spec.name:42s} sm_{cap:<3d} {spec.options['num_warps']:5d} {spec.options['num_stages']:6d} "
                  f"{r['registers']:4d} {r['spill_stores']:5d}/{r['spill_loads']:<5d} {r['shared']:7d} {tc}",
                  flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
