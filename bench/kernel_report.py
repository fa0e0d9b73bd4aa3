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
Only the schedule term was generalised since (wave 6, for programs of different lengths):
  programs in work-table order, 132 at a time, time = sum over waves of (the most K-steps
  of any program in that wave) x cycles; for a uniform schedule (every program the same
  K-steps) this is exactly the expression above. Per-K-step cycles are unchanged.
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


def model_fraction(loop: dict, cfg: dict, N: int, n: int, dtype: str = "bf16", programs=None) -> dict:
    """The modelled fraction of the peak (module docstring) of one fused update
    factor (n x n) <- x (N rows) with the K-loop mix `loop` under config `cfg`.

    The rebuilt kernels get the same formula applied to their parameters: BM and BN from
    BLOCK_M / BLOCK_N when the config has them (else BLOCK); tiles = the upper tiles of
    the BM x BN grid (those holding an element with r <= c: nt (nt + 1) / 2 when square);
    with SPLIT_K = s, programs = tiles x s, waves = ceil(programs / 132) and K-steps per
    program = ceil(N / (BK s)) (s = 1: the formula as committed). The split-K reduction
    (workspace traffic, a second kernel) is not in the model: `split_traffic`.

    The schedule term for programs of different lengths: `programs` lists each program's
    K-steps in work-table order (default: the uniform schedule above, tiles x s programs
    of ceil(N / (BK s)) K-steps; SCHEDULE == "tail": splitk_tail.tail_split_schedule's on 132
    SMs); they run 132 at a time and time = sum over waves of (the most K-steps of any
    program in that wave) x cycles. For the uniform schedule the sum is waves x K-steps:
    exactly the committed expression (same integers, one multiplication by cycles)."""
    bm = cfg.get("BLOCK_M", cfg.get("BLOCK"))
    bn = cfg.get("BLOCK_N", cfg.get("BLOCK"))
    bk = cfg["BLOCK_K"]
    split = cfg.get("SPLIT_K", 1)
    warps = cfg["num_warps"]
    t = 2 * bm * bn * bk / FLOP_PER_CLK[dtype]
    i = warps * loop["instructions"] / 4
    m = (bm + bn) * bk * ELEM_BYTES[dtype] / L2_BYTES_PER_CLK
    exposed = t / max(warps // 4, 1) if loop["wait0"] else 0.0
    cycles = max(max(t, i) + exposed, m)
    if bm == bn:
        nt = math.ceil(n / bm)
        tiles = nt * (nt + 1) // 2
    else:
        tiles = sum(1 for tj in range(math.ceil(n / bn)) for ti in range(math.ceil(n / bm))
                    if ti * bm <= tj * bn + bn - 1)
    if programs is None and cfg.get("SCHEDULE") == "tail":
        from kfac_fast.kernels import splitk_tail

        programs = [math.ceil((hi - lo) / bk) for _, _, lo, hi, _ in splitk_tail.tail_split_schedule(n, N, cfg, SMS)]
    if programs is None:
        programs = [math.ceil(N / (bk * split))] * (tiles * split)
    waves = math.ceil(len(programs) / SMS)
    ksteps = sum(max(programs[w * SMS:(w + 1) * SMS]) for w in range(waves))  # the longest per wave
    time = ksteps * cycles
    frac = N * n * (n + 1) / (SMS * FLOP_PER_CLK[dtype] * time)
    return dict(tensor=t, issue=i, l2=m, cycles=cycles, waves=waves, tiles=tiles, fraction=frac,
                seconds=time / CLOCK_HZ, ksteps=ksteps, programs=len(programs))


CLOCK_HZ = 790e12 / (SMS * 4096)  # the clock at which 132 SMs x 4096 FLOP/clk are 790 TFLOP/s
HBM_BYTES_PER_S = 4.8e12  # H200


def split_traffic(cfg: dict, tiles: int) -> tuple:
    """(bytes, seconds) of the split-K workspace: s fp32 partial tiles per tile written by
    the first kernel and read by the reduction, at the H200's 4.8 TB/s. NOT in the model."""
    split = cfg.get("SPLIT_K", 1)
    if split == 1:
        return 0, 0.0
    nbytes = 2 * split * tiles * cfg["BLOCK_M"] * cfg["BLOCK_N"] * 4
    return nbytes, nbytes / HBM_BYTES_PER_S


def tail_traffic(cfg: dict, n: int, N: int) -> tuple:
    """(bytes, seconds) of the tail-split schedule's workspace: one fp32 partial tile per
    tail chunk written and read back by the reduction, at 4.8 TB/s. NOT in the model."""
    from kfac_fast.kernels import splitk_tail

    slots = sum(1 for it in splitk_tail.tail_split_schedule(n, N, cfg, SMS) if it[4] >= 0)
    nbytes = 2 * slots * cfg["BLOCK_M"] * cfg["BLOCK_N"] * 4
    return nbytes, nbytes / HBM_BYTES_PER_S


def epilogue_traffic(n: int) -> tuple:
    """(bytes, seconds) of the epilogue's HBM traffic, fp32 factor: the upper triangle read
    (n (n + 1) / 2 elements) and both triangles written (n^2), at 4.8 TB/s. NOT in the model."""
    nbytes = 4 * (n * (n + 1) // 2 + n * n)
    return nbytes, nbytes / HBM_BYTES_PER_S


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
    import importlib.util
    import os
    from dataclasses import replace

    from kfac_fast.kernels import factor_update as fu
    from kfac_fast.kernels import splitk, splitk_tail

    # bench/model_baseline.py: the kernel before the rebuild (c7ca147), frozen for the model
    loader = importlib.util.spec_from_file_location(
        "model_baseline", os.path.join(os.path.dirname(os.path.abspath(__file__)), "model_baseline.py"))
    model_baseline = importlib.util.module_from_spec(loader)
    loader.loader.exec_module(model_baseline)

    print("MODEL (not a measurement; see the module docstring): fused update bf16, N = 8192")
    N = 8192
    runs = []
    for case, n in (("n=d", 4096), ("n=d+1", 4097)):
        split = splitk.pick_split(n, N, splitk.CONFIG_128x256)
        runs += [(model_baseline.spec(), case, n, model_baseline.CONFIG),  # the kernel before the rebuild
                 ("factor_update[bf16,ieee]", case, n, fu.CONFIG_16BIT),  # shipped: ones column outside
                 ("factor_update[bf16,ieee,128x256,split1]", case, n, splitk.CONFIG_128x256),
                 ("factor_update[bf16,ieee,128x256,split4]", case, n, dict(splitk.CONFIG_128x256, SPLIT_K=split)),
                 ("factor_update[bf16,ieee,128x256,tail]", case, n, splitk_tail.CONFIG_TAIL)]
    for kernel, case, n, cfg in runs:
        if isinstance(kernel, str):
            spec = next(s for s in aot_specs.realistic_specs() if s.name == f"{kernel}@{case}")
        else:
            spec = next(v for v in aot_specs._variants(kernel) if v.n_case == case)
        if "SPLIT_K" in spec.constexprs and spec.constexprs["SPLIT_K"] != cfg.get("SPLIT_K", 1):
            spec = replace(spec, name=spec.name.replace("split4", f"split{cfg['SPLIT_K']}"),
                           constexprs=dict(spec.constexprs, SPLIT_K=cfg["SPLIT_K"]))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            r = aot_specs.report(spec, 90, loop=True)
        loop = r["loop"]
        m = model_fraction(loop, cfg, N, n)
        if cfg.get("SCHEDULE") == "tail":
            tiles, unsplit, s_tail, chunk = splitk_tail.tail_plan(n, N, cfg, SMS)
            sched = (f"{unsplit} tiles unsplit + {len(tiles) - unsplit} x {s_tail} chunks of "
                     f"{chunk // cfg['BLOCK_K']} K-steps, {m['waves']} waves")
        else:
            sched = f"{m['tiles']} tiles x {cfg.get('SPLIT_K', 1)} splits, {m['waves']} waves"
        print(f"  {spec.name:50s} n={n}: {loop['instructions']} instr/K-step/warp, {loop['hgmma']} HGMMA, "
              f"T={m['tensor']:.0f} I={m['issue']:.0f} L2={m['l2']:.0f} -> {m['cycles']:.0f} cycles/K-step, "
              f"{sched}, {m['ksteps']} K-steps on the critical path, "
              f"spills {r['spill_stores']}/{r['spill_loads']} B: "
              f"modelled {100 * m['fraction']:.1f}% of the bf16 peak ({1e6 * m['seconds']:.0f} us)")
        if cfg.get("SCHEDULE") == "tail":
            nbytes, secs = tail_traffic(cfg, n, N)
            what = f"2 x {len(tiles) - unsplit} x {s_tail} x {cfg['BLOCK_M']}x{cfg['BLOCK_N']} fp32"
        else:
            nbytes, secs = split_traffic(cfg, m["tiles"])
            what = f"2 x {cfg.get('SPLIT_K', 1)} x {m['tiles']} x {cfg.get('BLOCK_M')}x{cfg.get('BLOCK_N')} fp32"
        if nbytes:
            print(f"  {'':50s} split-K reduction (not in the model): workspace {nbytes / 1e6:.0f} MB written + read "
                  f"({what}), {1e6 * secs:.0f} us at 4.8 TB/s HBM")
        ebytes, esecs = epilogue_traffic(n)
        est = N * n * (n + 1) / (790e12 * (m["seconds"] + esecs + secs))
        print(f"  {'':50s} model + epilogue/workspace traffic at 4.8 TB/s, an estimate outside the committed "
              f"model: + {1e6 * esecs:.0f} us epilogue ({ebytes / 1e6:.0f} MB) + {1e6 * secs:.0f} us workspace "
              f"-> {100 * est:.1f}% of the bf16 peak ({1e6 * (m['seconds'] + esecs + secs):.0f} us)")


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
