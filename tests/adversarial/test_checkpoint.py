"""Adversarial checkpoint cases (issue 18 item 8): whatever save_checkpoint accepts,
load_checkpoint loads (or save refuses it, naming it); mismatched states are converted
as documented or refused with the layer named, before anything changes; saves are safe
from any thread; files of today's format (v1) still load, unknown versions are refused."""
from __future__ import annotations

import copy
import hashlib
import io
import os
import threading

import numpy as np
import pytest
import torch
from torch import nn

from kfac_fast import KFACPreconditioner, load_checkpoint, save_checkpoint
from kfac_fast.checkpoint import FORMAT_VERSION, CheckpointError, read_checkpoint

pytestmark = pytest.mark.adversarial

FIXTURE_V1 = os.path.join(os.path.dirname(__file__), "data", "checkpoint_v1.ckpt")


def trained(model=None, **kw):
    torch.manual_seed(0)
    model = model or nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3))
    precond = KFACPreconditioner(model, **kw)
    dtype = next(model.parameters()).dtype
    model(torch.randn(6, 5, dtype=dtype)).square().sum().backward()
    precond.step()
    return model, precond


def snapshot(precond):
    return copy.deepcopy(precond.state_dict())


def assert_unchanged(precond, before):
    after = precond.state_dict()
    for name, entry in before["layers"].items():
        for k, v in entry.items():
            if isinstance(v, torch.Tensor):
                assert torch.equal(after["layers"][name][k], v), f"{name}.{k} changed by a refused load"
    assert after["steps"] == before["steps"]


# ---- extra: what save accepts, load loads ----------------------------------------------
def test_error_extra_numpy_rng_state_refused_at_save(tmp_path):
    _, precond = trained()
    path = tmp_path / "c.ckpt"
    with pytest.raises(TypeError, match=r"extra\['rng'\]\[1\] is a numpy\.ndarray.*weights_only"):
        save_checkpoint(path, precond, extra={"rng": np.random.get_state()})
    assert not path.exists() and not list(tmp_path.iterdir())


def test_error_extra_numpy_scalar_refused_at_save(tmp_path):
    _, precond = trained()
    with pytest.raises(TypeError, match=r"extra\['best'\] is a numpy\.float64"):
        save_checkpoint(tmp_path / "c.ckpt", precond, extra={"best": np.float64(0.5)})


def test_error_extra_arbitrary_object_refused_at_save(tmp_path):
    class Config:
        lr = 0.1

    _, precond = trained()
    with pytest.raises(TypeError, match=r"extra\['config'\] is a .*Config"):
        save_checkpoint(tmp_path / "c.ckpt", precond, extra={"config": Config()})
    with pytest.raises(TypeError, match=r"extra\['fn'\] is a builtins\.function"):
        save_checkpoint(tmp_path / "c.ckpt", precond, extra={"fn": lambda: 0})


def test_error_extra_set_refused_at_save(tmp_path):
    _, precond = trained()
    with pytest.raises(TypeError, match=r"extra\['seen'\] is a builtins\.set"):
        save_checkpoint(tmp_path / "c.ckpt", precond, extra={"seen": {1, 2}})


def test_safe_extra_of_allowed_types_round_trips(tmp_path):
    model, precond = trained()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    opt.step()
    extra = {"rng": torch.get_rng_state(), "np_rng": list(np.random.get_state()[1][:4].tolist()),
             "model": model.state_dict(), "optimizer": opt.state_dict(), "epoch": 3, "loss": 0.25,
             "name": "run", "blob": b"\x00\x01", "dtype": torch.float64, "device": torch.device("cpu"),
             "size": torch.Size([2, 3]), "nested": [(1, None, True), {"k": [2.5]}], 7: "int key"}
    path = tmp_path / "c.ckpt"
    save_checkpoint(path, precond, extra=extra)
    _, fresh = trained()
    got = load_checkpoint(path, fresh)
    assert torch.equal(got["rng"], extra["rng"]) and got["np_rng"] == extra["np_rng"]
    assert got["optimizer"]["state"][0]["momentum_buffer"].equal(extra["optimizer"]["state"][0]["momentum_buffer"])
    for key in ("epoch", "loss", "name", "blob", "dtype", "device", "size", "nested", 7):
        assert got[key] == extra[key], key


def test_error_precond_argument_of_wrong_type(tmp_path):
    with pytest.raises(TypeError, match="precond must be a KFACPreconditioner"):
        save_checkpoint(tmp_path / "c.ckpt", 42)
    with pytest.raises(TypeError, match="precond must be a KFACPreconditioner"):
        save_checkpoint(tmp_path / "c.ckpt", {"not": "a state"})


def test_safe_state_dict_saved_directly(tmp_path):
    _, precond = trained()
    path = tmp_path / "c.ckpt"
    save_checkpoint(path, precond.state_dict())
    assert read_checkpoint(path)["format"] == FORMAT_VERSION
    _, fresh = trained()
    load_checkpoint(path, fresh)
    assert torch.equal(fresh.layers["0"].a_factor, precond.layers["0"].a_factor)


# ---- dtype and shape mismatches --------------------------------------------------------
def test_safe_float32_checkpoint_into_float64_preconditioner(tmp_path):
    _, p32 = trained()
    path = tmp_path / "c.ckpt"
    save_checkpoint(path, p32)
    _, p64 = trained(factor_dtype=torch.float64)
    load_checkpoint(path, p64)
    for name, layer in p64.layers.items():
        for t in ("a_factor", "g_factor", "qa", "da", "qg", "dg"):
            got, want = getattr(layer, t), getattr(p32.layers[name], t)
            assert got.dtype == torch.float64, f"{name}.{t} stayed {got.dtype}"
            assert torch.equal(got, want.double())


def test_safe_float64_checkpoint_into_float32_preconditioner(tmp_path):
    _, p64 = trained(factor_dtype=torch.float64)
    path = tmp_path / "c.ckpt"
    save_checkpoint(path, p64)
    _, p32 = trained()
    load_checkpoint(path, p32)
    layer = p32.layers["2"]
    assert layer.g_factor.dtype == torch.float32 and torch.equal(layer.g_factor, p64.layers["2"].g_factor.float())


def test_error_bias_state_into_bias_free_layer_of_the_same_size(tmp_path):
    # Linear(3, 5) with a bias and Linear(4, 5) without one both have a 4x4 A and a 5x5 G
    path = tmp_path / "c.ckpt"
    torch.manual_seed(0)
    biasfree = nn.Sequential(nn.Linear(4, 5, bias=False))
    biased = nn.Sequential(nn.Linear(3, 5))
    pb = KFACPreconditioner(biased)
    biased(torch.randn(6, 3)).square().sum().backward()
    pb.step()
    pf = KFACPreconditioner(biasfree)
    assert pb.layers["0"].a_dim == pf.layers["0"].a_dim == 4
    save_checkpoint(path, pb)
    with pytest.raises(ValueError, match=r"layer '0'.*bias=True.*bias=False"):
        load_checkpoint(path, pf)
    assert pf.layers["0"].a_factor is None


def test_error_layer_of_another_kind_with_the_same_sizes(tmp_path):
    conv = nn.Sequential(nn.Conv2d(5, 3, 1))
    lin = nn.Sequential(nn.Linear(5, 3))
    pc = KFACPreconditioner(conv)
    torch.manual_seed(0)
    conv(torch.randn(2, 5, 2, 2)).square().sum().backward()
    pc.step()
    pl = KFACPreconditioner(lin)
    assert (pc.layers["0"].a_dim, pc.layers["0"].g_dim) == (pl.layers["0"].a_dim, pl.layers["0"].g_dim)
    path = tmp_path / "c.ckpt"
    save_checkpoint(path, pc)
    with pytest.raises(ValueError, match=r"layer '0': the state is of a 'conv2d' layer"):
        load_checkpoint(path, pl)


def test_error_non_tensor_factor(tmp_path):
    _, precond = trained()
    state = precond.state_dict()
    state["layers"]["0"]["a_factor"] = state["layers"]["0"]["a_factor"].tolist()
    before = snapshot(precond)
    with pytest.raises(TypeError, match=r"layer '0': a_factor must be a tensor, got list"):
        precond.load_state_dict(state)
    assert_unchanged(precond, before)


def test_error_non_dict_layer_entry():
    _, precond = trained()
    state = precond.state_dict()
    state["layers"]["2"] = [1, 2]
    with pytest.raises(TypeError, match=r"state of layer '2' must be a dict"):
        precond.load_state_dict(state)


def test_error_decomposition_of_the_wrong_shape():
    _, precond = trained()
    state = precond.state_dict()
    state["layers"]["2"]["qg"] = torch.eye(4)
    with pytest.raises(ValueError, match=r"layer '2': qg has shape \(4, 4\).*needs \(3, 3\)"):
        precond.load_state_dict(state)


@pytest.mark.parametrize("key", ["a_factor", "qa", "dg"])
def test_error_nonfinite_tensor_in_state_is_refused_before_any_change(key):
    _, precond = trained()
    state = precond.state_dict()
    state["layers"]["2"][key] = state["layers"]["2"][key].clone()
    state["layers"]["2"][key].view(-1)[0] = float("nan")
    state["steps"] = 99
    before = snapshot(precond)
    with pytest.raises(ValueError, match=rf"layer '2': {key} is not finite"):
        precond.load_state_dict(state)
    assert_unchanged(precond, before)


@pytest.mark.parametrize("bad", [1.5, -1, "3", True])
def test_error_count_not_a_non_negative_int(bad):
    _, precond = trained()
    state = precond.state_dict()
    state["layers"]["0"]["a_count"] = bad
    with pytest.raises(TypeError, match=r"layer '0': a_count must be an int >= 0"):
        precond.load_state_dict(state)


def test_error_integer_tensor_factor():
    _, precond = trained()
    state = precond.state_dict()
    state["layers"]["0"]["g_factor"] = torch.ones(4, 4, dtype=torch.int64)
    with pytest.raises(TypeError, match=r"layer '0': g_factor must be a floating tensor"):
        precond.load_state_dict(state)


# ---- threads, versions ---------------------------------------------------------------
def test_safe_threads_saving_to_one_path(tmp_path):
    _, precond = trained()
    path = tmp_path / "c.ckpt"
    errors = []

    def save(i):
        try:
            for _ in range(3):
                save_checkpoint(path, precond, extra={"writer": i})
        except Exception as exc:  # collected: the assertion below names it
            errors.append(repr(exc))

    threads = [threading.Thread(target=save, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    _, fresh = trained()
    assert load_checkpoint(path, fresh)["writer"] in range(8)
    assert [p.name for p in tmp_path.iterdir()] == ["c.ckpt"], "temporary files left behind"


def test_safe_checkpoint_of_format_v1_written_by_the_previous_code_loads():
    content = read_checkpoint(FIXTURE_V1)
    assert content["format"] == 1 and "kind" not in content["preconditioner"]["layers"]["0"]
    model, precond = trained()
    fresh = KFACPreconditioner(model)
    extra = load_checkpoint(FIXTURE_V1, fresh)
    assert extra["step"] == 1 and torch.equal(extra["model"]["0.weight"], model[0].weight)
    for name, layer in fresh.layers.items():
        assert torch.equal(layer.a_factor, content["preconditioner"]["layers"][name]["a_factor"])
        assert torch.equal(layer.a_factor, precond.layers[name].a_factor)  # the same run, today
    assert fresh.steps == 1


def _with_header(tmp_path, version: int, payload_obj) -> str:
    buffer = io.BytesIO()
    torch.save(payload_obj, buffer)
    payload = buffer.getvalue()
    path = tmp_path / f"v{version}.ckpt"
    path.write_bytes(f"KFAC_FAST_CHECKPOINT v{version}\n".encode() + hashlib.sha256(payload).hexdigest().encode()
                     + b"\n" + str(len(payload)).encode() + b"\n" + payload)
    return str(path)


def test_error_checkpoint_of_a_newer_format_names_its_version(tmp_path):
    _, precond = trained()
    path = _with_header(tmp_path, 3, {"format": 3, "preconditioner": precond.state_dict(), "extra": None})
    with pytest.raises(CheckpointError, match="format version 3; this kfac_fast reads versions 1 and 2"):
        load_checkpoint(path, precond)


def test_error_header_and_payload_versions_disagree(tmp_path):
    _, precond = trained()
    path = _with_header(tmp_path, 2, {"format": 1, "preconditioner": precond.state_dict(), "extra": None})
    with pytest.raises(CheckpointError, match="header says format 2, payload says 1"):
        load_checkpoint(path, precond)


def test_error_payload_that_is_not_a_checkpoint(tmp_path):
    _, precond = trained()
    path = _with_header(tmp_path, 2, [1, 2, 3])
    with pytest.raises(CheckpointError, match="not a kfac_fast checkpoint's"):
        load_checkpoint(path, precond)


def test_safe_failed_save_leaves_the_previous_checkpoint(tmp_path):
    _, precond = trained()
    path = tmp_path / "c.ckpt"
    save_checkpoint(path, precond, extra={"v": 1})
    with pytest.raises(TypeError):
        save_checkpoint(path, precond, extra={"v": np.zeros(2)})
    assert load_checkpoint(path, trained()[1])["v"] == 1 and len(list(tmp_path.iterdir())) == 1
