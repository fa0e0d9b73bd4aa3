"""Host side of the Triton launchers (issue 17, defects 3 and 4): offsets chosen 64-bit
or refused, per-layer scalars that never take a pageable copy, precision reaching the
kernels. Run with TRITON_INTERPRET=1 like the rest of tests/triton."""
from __future__ import annotations

import os
from types import SimpleNamespace

import pytest
import torch

from kfac_fast.kernels import factor_update, guard, launch

# The launchers need tensors on the device Triton runs on: a GPU, or the CPU when interpreted.
DEV = "cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1" else "cpu"


def _fake(shape, stride):
    return SimpleNamespace(shape=tuple(shape), stride=lambda: tuple(stride), device=torch.device("cpu"))


def test_factor_epilogue_goes_64_bit_from_n_46341():
    x = _fake((8, 46341), (46341, 1))
    f_small = SimpleNamespace(shape=(4097, 4097), stride=lambda *a: 4097 if a else (4097, 1))
    f_big = SimpleNamespace(shape=(46341, 46341), stride=lambda *a: 46341 if a else (46341, 1))
    assert not factor_update.index64("update_factor_", f_small, _fake((8, 4096), (4096, 1)), 8, 128, 64)
    assert factor_update.index64("update_factor_", f_big, x, 8, 128, 64)


def test_row_counts_past_int32_are_refused():
    f = SimpleNamespace(shape=(17, 17), stride=lambda *a: 17 if a else (17, 1))
    with pytest.raises(ValueError, match="update_factors_: x spans .* rows"):
        factor_update.index64("update_factors_", f, _fake((2**31, 16), (16, 1)), 2**31, 64, 64)


def test_precondition_refuses_operands_past_int32():
    small = [_fake((300, 257), (257, 1))]
    qa, qg = [_fake((257, 257), (257, 1))], [_fake((300, 300), (300, 1))]
    assert guard.offsets_fit(small, qa, qg) is None
    big_qg = [_fake((46341, 46341), (46341, 1))]
    why = guard.offsets_fit([_fake((46341, 257), (257, 1))], qa, big_qg)
    assert why.startswith("layer 0: qg spans")


class _NoPageable(Exception):
    pass


@pytest.fixture
def pinned_only(monkeypatch):
    """host_table recorded (the pinned non_blocking path) and Tensor.to(cuda) forbidden,
    with 'cuda' standing for a device the CPU cannot reach."""
    calls = []

    def host_table(rows, dtype, device):
        calls.append((list(rows), dtype, str(device)))
        return torch.tensor(rows, dtype=dtype)

    real_to = torch.Tensor.to

    def to(self, *args, **kwargs):
        target = kwargs.get("device", args[0] if args and not isinstance(args[0], torch.dtype) else None)
        if target is not None and torch.device(target).type == "cuda":
            raise _NoPageable("pageable .to(cuda): a host sync")
        return real_to(self, *args, **kwargs)

    monkeypatch.setattr(launch, "host_table", host_table)
    monkeypatch.setattr(torch.Tensor, "to", to)
    return calls


@pytest.mark.parametrize("values", [torch.tensor(0.25, dtype=torch.float64),
                                    torch.tensor([0.25, 0.5, 0.75], dtype=torch.float64),
                                    [0.25, torch.tensor(0.5, dtype=torch.float64), 0.75]])
def test_cpu_scalars_travel_pinned_never_pageable(pinned_only, values):
    # kfac_fast.ops hands Python floats over as CPU float64 tensors (0-dim or 1-D).
    out = launch.per_layer_scalars(values, 3, "cuda")
    assert len(pinned_only) == 1 and pinned_only[0][1] == torch.float32 and pinned_only[0][2] == "cuda"
    want = [0.25] * 3 if isinstance(values, torch.Tensor) and values.dim() == 0 else [0.25, 0.5, 0.75]
    assert out.tolist() == want


def test_per_layer_scalars_device_values_stay_and_round_like_before():
    t = torch.tensor([0.1, 0.2], dtype=torch.float64)
    assert torch.equal(launch.per_layer_scalars(t, 2, "cpu"), t.to(torch.float32))
    assert torch.equal(launch.per_layer_scalars(0.1, 2, "cpu"), torch.full((2,), 0.1))
    mixed = launch.per_layer_scalars([torch.tensor(0.3), 0.7], 2, "cpu")
    assert mixed.tolist() == pytest.approx([0.3, 0.7]) and mixed.dtype == torch.float32


def test_precision_reaches_the_launchers():
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(9, 5, generator=gen).to(DEV)
    f_ieee = torch.randn(5, 5, generator=gen).to(DEV)
    f_ieee = f_ieee @ f_ieee.T
    f_none = f_ieee.clone()
    cfg = dict(BLOCK=16, BLOCK_K=16, num_warps=1, num_stages=1)
    factor_update.update_factor_(f_ieee, x, torch.tensor(0.5), torch.tensor(0.25), precision="ieee", config=cfg)
    factor_update.update_factor_(f_none, x, torch.tensor(0.5), torch.tensor(0.25), config=cfg)
    assert torch.equal(f_ieee, f_none)
    with pytest.raises(ValueError, match="precision must be"):
        factor_update.update_factor_(f_none, x, 0.5, 0.25, precision="fp8", config=cfg)
