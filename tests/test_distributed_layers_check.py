"""`kfac_fast.distributed.check_same_layers` (public re-export) is `agreement.check_same_setup`
of the layers alone: same gather, same error. The gather is faked (no process group needed)."""
from __future__ import annotations

import pytest
import torch.distributed as dist

from kfac_fast.distributed import agreement, check_same_layers

MINE = [("fc1", "linear", 5, 7, True), ("fc2", "linear", 8, 3, False)]


def _fake_world(monkeypatch, ranks: list) -> None:
    def all_gather_object(out: list, obj, group=None) -> None:
        assert obj == (MINE, {})  # what check_same_setup gathers: layers and no settings
        out[:] = [(r, {}) for r in ranks]

    monkeypatch.setattr(dist, "get_world_size", lambda group=None: len(ranks))
    monkeypatch.setattr(dist, "all_gather_object", all_gather_object)


def test_check_same_layers_is_the_setup_check():
    assert check_same_layers is agreement.check_same_layers


def test_check_same_layers_passes_when_ranks_agree(monkeypatch):
    _fake_world(monkeypatch, [MINE, list(MINE)])
    check_same_layers(MINE, group=None)


def test_check_same_layers_names_the_first_difference(monkeypatch):
    other = [MINE[0], ("fc2", "linear", 8, 4, False)]
    _fake_world(monkeypatch, [MINE, other])
    with pytest.raises(ValueError, match=r"rank 1 registers 2 layers .* first difference at layer #1"):
        check_same_layers(MINE, group=None)
