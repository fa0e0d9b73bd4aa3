"""bench/kernel_report.py's model with the generalised schedule term: for a uniform
schedule it gives exactly the committed expression ceil(tiles s / 132) x ceil(N / (BK s))
x cycles; a schedule of programs of different lengths costs the longest program of each
wave of 132, in work-table order; the tail-split schedule's critical path. Host only."""
from __future__ import annotations

import importlib.util
import math
import os

import pytest

from kfac_fast.kernels import factor_update, splitk, splitk_tail

_PATH = os.path.join(os.path.dirname(__file__), "..", "..", "bench", "kernel_report.py")
_SPEC = importlib.util.spec_from_file_location("kernel_report", _PATH)
kr = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(kr)

LOOP = dict(instructions=116, wait0=False)


def committed(loop, cfg, N, n):
    """The model as committed at 479b202 (its time term, verbatim arithmetic)."""
    bm, bn, bk = cfg.get("BLOCK_M", cfg.get("BLOCK")), cfg.get("BLOCK_N", cfg.get("BLOCK")), cfg["BLOCK_K"]
    split, warps = cfg.get("SPLIT_K", 1), cfg["num_warps"]
    t = 2 * bm * bn * bk / 4096
    m = (bm + bn) * bk * 2 / kr.L2_BYTES_PER_CLK
    cycles = max(max(t, warps * loop["instructions"] / 4) + (t / max(warps // 4, 1) if loop["wait0"] else 0.0), m)
    tiles = len(splitk.upper_rect_tiles(n, bm, bn))
    time = math.ceil(tiles * split / 132) * math.ceil(N / (bk * split)) * cycles
    return N * n * (n + 1) / (132 * 4096 * time)


@pytest.mark.parametrize("n", [4096, 4097, 1000, 256])
@pytest.mark.parametrize("N", [8192, 1000, 131072])
@pytest.mark.parametrize("cfg", [factor_update.CONFIG_16BIT, splitk.CONFIG_128x256,
                                 dict(splitk.CONFIG_128x256, SPLIT_K=3), dict(splitk.CONFIG_128x256, SPLIT_K=4)])
@pytest.mark.parametrize("wait0", [False, True])
def test_uniform_schedule_is_the_committed_expression(n, N, cfg, wait0):
    loop = dict(LOOP, wait0=wait0)
    assert kr.model_fraction(loop, cfg, N, n)["fraction"] == committed(loop, cfg, N, n)


def test_programs_of_different_lengths():
    cfg = splitk.CONFIG_128x256
    one = kr.model_fraction(LOOP, cfg, 8192, 4096, programs=[10] * 132 + [3] * 5)
    assert one["ksteps"] == 13 and one["waves"] == 2
    # work-table order matters: a long program in the second wave costs its length there
    two = kr.model_fraction(LOOP, cfg, 8192, 4096, programs=[3] * 132 + [10] * 5)
    assert two["ksteps"] == 13
    three = kr.model_fraction(LOOP, cfg, 8192, 4096, programs=[10] * 5 + [3] * 132)
    assert three["ksteps"] == 13 and three["seconds"] == one["seconds"]
    assert kr.model_fraction(LOOP, cfg, 8192, 4096, programs=[10] * 137)["ksteps"] == 20


def test_tail_schedule_critical_path():
    """n = 4096: 2 whole waves of 256 K-steps + 8 tiles x 16 chunks of 16; n = 4097: 2 x
    256 + 41 x 3 chunks of 86 (the first two chunks; the last holds 84)."""
    cfg = splitk_tail.CONFIG_TAIL
    m = kr.model_fraction(LOOP, cfg, 8192, 4096)
    assert (m["ksteps"], m["waves"], m["programs"]) == (2 * 256 + 16, 3, 264 + 128)
    m = kr.model_fraction(LOOP, cfg, 8192, 4097)
    assert (m["ksteps"], m["waves"], m["programs"]) == (2 * 256 + 86, 3, 264 + 123)
    nbytes, _ = kr.tail_traffic(cfg, 4096, 8192)
    assert nbytes == 2 * 128 * 128 * 256 * 4
