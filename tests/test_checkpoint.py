"""Checkpoints: bit-identical resume in a fresh process, checksum rejection of damaged
files, weights_only loading, and a clear error for a model with other layers."""
from __future__ import annotations

import hashlib
import io
import os
import pickle
import subprocess
import sys

import pytest
import torch
from torch import nn

import kfac_fast
from kfac_fast import KFACPreconditioner, load_checkpoint, save_checkpoint
from kfac_fast.checkpoint import MAGIC, CheckpointError

WORKER = os.path.join(os.path.dirname(__file__), "_checkpoint_worker.py")


def worker(*args):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    subprocess.run([sys.executable, WORKER, *map(str, args)], check=True, env=env, timeout=120)


def tensors(state):
    """Every tensor of a nested state, in a fixed order, with its path."""
    if isinstance(state, torch.Tensor):
        yield "", state
    elif isinstance(state, dict):
        for k in sorted(state, key=str):
            for path, t in tensors(state[k]):
                yield f"{k}.{path}", t
    elif isinstance(state, (list, tuple)):
        for i, v in enumerate(state):
            for path, t in tensors(v):
                yield f"{i}.{path}", t


def test_resume_in_a_new_process_is_bit_identical(tmp_path):
    ckpt, full, resumed = tmp_path / "k.ckpt", tmp_path / "full.pt", tmp_path / "resumed.pt"
    k, n = 4, 8  # inv_update_steps=3: the resume lands between refreshes
    worker("full", ckpt, full, k, n)
    worker("first", ckpt, "-", k, n)
    worker("resume", ckpt, resumed, k, n)
    a = dict(tensors(torch.load(full, weights_only=True)))
    b = dict(tensors(torch.load(resumed, weights_only=True)))
    assert a.keys() == b.keys() and any("a_factor" in p for p in a)
    for path in a:
        assert a[path].dtype == b[path].dtype and torch.equal(a[path], b[path]), path


def trained(model=None):
    torch.manual_seed(0)
    model = model or nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3))
    precond = KFACPreconditioner(model)
    model(torch.randn(6, 5)).square().sum().backward()
    precond.step()
    return model, precond


def test_round_trip_restores_the_state_and_extra(tmp_path):
    model, precond = trained()
    path = tmp_path / "c.ckpt"
    save_checkpoint(path, precond, extra={"model": model.state_dict()})
    _, fresh = trained()
    fresh.layers["0"].a_factor.zero_()
    extra = load_checkpoint(path, fresh)
    assert torch.equal(extra["model"]["0.weight"], model[0].weight)
    assert torch.equal(fresh.layers["0"].a_factor, precond.layers["0"].a_factor)
    assert fresh.steps == precond.steps and not list(tmp_path.glob("*.tmp-*"))


@pytest.mark.parametrize("damage", ["truncate", "flip", "header", "pad"])
def test_damaged_file_is_rejected(tmp_path, damage):
    _, precond = trained()
    path = tmp_path / "c.ckpt"
    save_checkpoint(path, precond)
    data = bytearray(path.read_bytes())
    if damage == "truncate":
        data = data[:-10]
    elif damage == "flip":
        data[-5] ^= 0xFF
    elif damage == "header":
        data[0:4] = b"NOPE"
    else:
        data += b"\0"
    path.write_bytes(bytes(data))
    match = {"truncate": "truncated", "flip": "checksum", "header": "not a kfac_fast checkpoint",
             "pad": "truncated or padded"}[damage]
    with pytest.raises(CheckpointError, match=match):
        load_checkpoint(path, precond)


class Payload:
    def __reduce__(self):  # would run code on an unrestricted unpickle
        return (os.getcwd, ())


def test_payload_is_loaded_weights_only(tmp_path):
    """A file with a valid checksum but a code-carrying pickle is still refused."""
    buffer = io.BytesIO()
    torch.save({"preconditioner": Payload(), "extra": None}, buffer)
    payload = buffer.getvalue()
    path = tmp_path / "evil.ckpt"
    path.write_bytes(MAGIC + hashlib.sha256(payload).hexdigest().encode() + b"\n"
                     + str(len(payload)).encode() + b"\n" + payload)
    _, precond = trained()
    with pytest.raises(pickle.UnpicklingError):
        load_checkpoint(path, precond)


def test_loading_into_a_model_with_other_layers_names_them(tmp_path):
    _, precond = trained()
    path = tmp_path / "c.ckpt"
    save_checkpoint(path, precond)
    other = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 7), nn.Tanh(), nn.Linear(7, 2))
    with pytest.raises(ValueError, match=r"missing from the state: \['4'\].*size differs: \['2 \(g factor"):
        load_checkpoint(path, KFACPreconditioner(other))
    fewer = nn.Sequential(nn.Linear(5, 4))
    with pytest.raises(ValueError, match=r"does not register: \['2'\]"):
        load_checkpoint(path, KFACPreconditioner(fewer))


def test_exports():
    assert kfac_fast.save_checkpoint is save_checkpoint and kfac_fast.load_checkpoint is load_checkpoint
    with pytest.raises(TypeError, match="extra"):
        save_checkpoint("unused", trained()[1], extra=[1])
