"""Registers, spills and shared memory of every shipped Triton kernel config, compiled
ahead of time (no GPU needed): `python bench/kernel_report.py [--arch 90,80] [--filter NAME]`."""
import argparse
import warnings

from kfac_fast.kernels import aot_specs


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--arch", default="90,80", help="compute capabilities, comma-separated")
    p.add_argument("--filter", default="", help="only specs whose name contains this")
    args = p.parse_args()
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


if __name__ == "__main__":
    main()
