"""KFACPreconditioner for kfac-pytorch users: its keywords, numbers, factorless state (#21 item 9)."""
from __future__ import annotations

import inspect
import io

import pytest
import torch
from torch import nn

from kfac_fast import KFACPreconditioner
from kfac_fast.checkpoint import load_checkpoint, save_checkpoint
from kfac_fast.preconditioner.args import KFAC_PYTORCH_KEYWORDS

NO_KFAC_PYTORCH = "kfac-pytorch not installed (make test installs it from KFAC_PYTORCH_WHEEL when that exists)"


def mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3))


def batches(n: int, seed: int = 1) -> list:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(6, 5, generator=g), torch.randint(0, 3, (6,), generator=g)) for _ in range(n)]


def train(model: nn.Module, precond: KFACPreconditioner, data: list) -> list:
    out = []
    for x, y in data:
        model.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        precond.step()
        out.append([p.grad.clone() for p in model.parameters()])
    return out


# ---------------------------------------------------------------------------------------
# kfac-pytorch's keywords
# ---------------------------------------------------------------------------------------
def _kfac_pytorch_keywords() -> list[str]:
    kfac = pytest.importorskip("kfac.preconditioner", reason=NO_KFAC_PYTORCH)
    params = inspect.signature(kfac.KFACPreconditioner.__init__).parameters
    return [n for n in params if n not in ("self", "model")]


def test_every_kfac_pytorch_keyword_is_ours_or_mapped():
    ours = set(inspect.signature(KFACPreconditioner.__init__).parameters)
    theirs = _kfac_pytorch_keywords()
    assert len(theirs) == 20
    unmapped = [n for n in theirs if n not in ours and n not in KFAC_PYTORCH_KEYWORDS]
    assert unmapped == []
    assert not set(KFAC_PYTORCH_KEYWORDS) & ours  # a mapped keyword is never also ours


@pytest.mark.parametrize("name, value, names", [
    ("compute_method", "inverse", "method='inverse'"),
    ("update_factors_in_hook", True, "update_factors_in_hooks=True"),
    ("inv_dtype", torch.float32, "factor_dtype="),
    ("assignment_strategy", "compute", "there is none"),
    ("colocate_factors", True, "strategy="),
    ("grad_worker_fraction", 1.0, "strategy='communication'"),
    ("symmetry_aware", False, "upper triangles"),
    ("allreduce_bucket_cap_mb", 25.0, "bucket_cap_mb="),
    ("compute_eigenvalue_outer_product", True, "there is none"),
    ("loglevel", 10, "getLogger('kfac_fast')"),
])
def test_kfac_pytorch_keyword_raises_type_error_naming_ours(name, value, names):
    with pytest.raises(TypeError) as info:
        KFACPreconditioner(mlp(), **{name: value})
    message = str(info.value)
    assert f"kfac-pytorch's keyword {name}=" in message and names in message
    assert "migration-kfac-pytorch.md" in message


def test_kfac_pytorch_enum_values_are_named():
    enums = pytest.importorskip("kfac.enums", reason=NO_KFAC_PYTORCH)
    with pytest.raises(TypeError, match="pass method='eigen'"):
        KFACPreconditioner(mlp(), compute_method=enums.ComputeMethod.EIGEN)


def test_unknown_keyword_still_bare_type_error():
    with pytest.raises(TypeError, match="unexpected keyword argument 'not_a_keyword'"):
        KFACPreconditioner(mlp(), not_a_keyword=1)


def test_shared_keywords_work_with_kfac_pytorch_defaults():
    # kfac-pytorch's defaults for the keywords both libraries have
    pc = KFACPreconditioner(mlp(), factor_update_steps=1, inv_update_steps=1, damping=0.001, factor_decay=0.95,
                            kl_clip=0.001, lr=0.1, accumulation_steps=1, grad_scaler=None, factor_dtype=None,
                            skip_layers=None)
    assert pc.factor_dtype == torch.float32 and len(pc.layers) == 2
    assert KFACPreconditioner(mlp(), skip_layers=None).layers.keys() == KFACPreconditioner(mlp()).layers.keys()


def test_tridiag_frontend_also_names_ours():
    from kfac_fast.tridiag import TridiagPreconditioner
    with pytest.raises(TypeError, match="method="):
        TridiagPreconditioner(mlp(), compute_method="inverse")


# ---------------------------------------------------------------------------------------
# lr and damping as numbers
# ---------------------------------------------------------------------------------------
def test_float_of_hyperparameters_is_the_value_at_the_current_step():
    model = mlp()
    pc = KFACPreconditioner(model, lr=lambda s: 0.5 / (1 + s), damping=lambda s: 1e-2 * (s + 1),
                            factor_decay=0.9, kl_clip=None, inv_update_steps=lambda s: 3 + s)
    assert float(pc.lr) == 0.5 and float(pc.damping) == 1e-2 and float(pc.factor_decay) == 0.9
    assert int(pc.inv_update_steps) == 3 and int(pc.factor_update_steps) == 1
    train(model, pc, batches(2))
    assert pc.steps == 2
    assert float(pc.lr) == 0.5 / 3 and float(pc.damping) == pytest.approx(3e-2)
    assert int(pc.inv_update_steps) == 5
    assert pc.lr(0) == 0.5 and pc.damping(1) == pytest.approx(2e-2)  # calling keeps working
    assert f"{pc.lr:.3f}" == "0.167" and f"{pc.damping:.2f}" == "0.03"
    assert f"{pc.lr}" == str(0.5 / 3) and f"{pc.factor_decay}" == "0.9" and f"{pc.kl_clip}" == repr(pc.kl_clip)
    with pytest.raises(TypeError, match="kl_clip is None"):
        float(pc.kl_clip)
    with pytest.raises(TypeError, match="not an integer hyperparameter"):
        int(pc.lr)


def test_float_of_per_layer_damping_says_use_for_layers():
    pc = KFACPreconditioner(mlp(), damping={"0": 1e-2, "default": 1e-3})
    with pytest.raises(TypeError, match="per layer.*for_layers"):
        float(pc.damping)
    assert f"{pc.damping}" == "LayerDamping(per layer: ['0'])"
    assert pc.damping.for_layers(["0", "2"], 0) == [1e-2, 1e-3]


def test_unbound_schedule_needs_a_step():
    from kfac_fast.schedules import Hyperparameter, positive
    assert float(Hyperparameter("lr", 0.25, positive)) == 0.25
    with pytest.raises(TypeError, match=r"lr\(step\)"):
        float(Hyperparameter("lr", lambda s: 0.25, positive))


# ---------------------------------------------------------------------------------------
# state_dict(include_factors=False)
# ---------------------------------------------------------------------------------------
def _tensors(obj) -> list:
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, dict):
        return [t for v in obj.values() for t in _tensors(v)]
    return []


@pytest.mark.parametrize("method", ["eigen", "inverse", "ekfac"])
def test_state_without_factors_loads_and_restarts_the_factors(method):
    kw = dict(method=method, inv_update_steps=10, kl_clip=1e-2, lr=0.1, factor_decay=0.9)
    data = batches(5)
    model = mlp()
    pc = KFACPreconditioner(model, **kw)
    train(model, pc, data[:3])
    state = pc.state_dict(include_factors=False)
    full = pc.state_dict()
    assert state["include_factors"] is False and state["steps"] == 3
    assert all(not _tensors(entry) for entry in state["layers"].values())
    assert set(state["layers"]["0"]) == {"kind", "has_bias"}
    sizes = []
    for s in (state, full):
        buf = io.BytesIO()
        torch.save(s, buf)
        sizes.append(len(buf.getvalue()))
    assert sizes[0] < sizes[1]

    # loaded into a preconditioner that has factors: they restart
    model2 = mlp()
    model2.load_state_dict(model.state_dict())
    pc2 = KFACPreconditioner(model2, **kw)
    train(model2, pc2, data[:2])
    pc2.load_state_dict(state)
    assert pc2.steps == 3
    assert all(layer.a_count == 0 and layer.a_factor is None and layer.qa is None and layer.a_inv is None
               for layer in pc2.layers.values())
    # ... and continue exactly as a fresh preconditioner at step 3
    model3 = mlp()
    model3.load_state_dict(model.state_dict())
    pc3 = KFACPreconditioner(model3, **kw)
    pc3.steps = 3
    torch.testing.assert_close(train(model2, pc2, data[3:]), train(model3, pc3, data[3:]), rtol=0, atol=0)
    assert pc2.layers["0"].a_count == 2


def test_state_without_factors_through_a_checkpoint_file(tmp_path):
    model = mlp()
    pc = KFACPreconditioner(model)
    train(model, pc, batches(2))
    save_checkpoint(tmp_path / "small.ckpt", pc.state_dict(include_factors=False), extra={"epoch": 1})
    save_checkpoint(tmp_path / "full.ckpt", pc)
    assert (tmp_path / "small.ckpt").stat().st_size < (tmp_path / "full.ckpt").stat().st_size
    fresh = KFACPreconditioner(mlp())
    assert load_checkpoint(tmp_path / "small.ckpt", fresh) == {"epoch": 1}
    assert fresh.steps == 2 and fresh.layers["0"].a_factor is None
    load_checkpoint(tmp_path / "full.ckpt", fresh)  # the full (v2) format still loads
    torch.testing.assert_close(fresh.layers["0"].a_factor, pc.layers["0"].a_factor, rtol=0, atol=0)


def test_state_without_factors_still_checks_the_layers():
    state = KFACPreconditioner(mlp()).state_dict(include_factors=False)
    other = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3), nn.Linear(3, 2))
    with pytest.raises(ValueError, match="model layers missing from the state"):
        KFACPreconditioner(other).load_state_dict(state)
    with pytest.raises(TypeError, match="include_factors must be a bool"):
        KFACPreconditioner(mlp()).state_dict(include_factors="no")


def test_migration_guide_maps_every_kfac_pytorch_keyword():
    import pathlib
    guide = (pathlib.Path(__file__).resolve().parents[1] / "docs" / "migration-kfac-pytorch.md").read_text()
    table = guide.split("## Constructor keywords")[1].split("## Methods and attributes")[0]
    rows = [line.split("|")[1].strip() for line in table.splitlines() if line.startswith("| `")]
    assert [row.split("=")[0].strip("`") for row in rows] == _kfac_pytorch_keywords()


def test_tied_weights_are_refused_naming_both_layers():
    # an embedding reused as the output head: its .grad sums both layers' gradients, which
    # the two per-layer blocks would precondition in turn (silently wrong before)
    import kfac_fast
    from kfac_fast.demo_lm.model import CharTransformer

    torch.manual_seed(0)
    model = CharTransformer(11, d=8, heads=2, blocks=1, context=4)
    model.head.weight = model.tok.weight
    with pytest.raises(ValueError, match=r"layers 'tok' and 'head' share the parameter tok.weight .*"
                                         r"skip_layers='head'"):
        kfac_fast.KFACPreconditioner(model)
    with pytest.raises(ValueError, match="tied weights"):
        kfac_fast.KFAC(model, method="eigen")
    pc = kfac_fast.KFACPreconditioner(model, skip_layers="head")
    assert "tok" in pc.layers and "head" not in pc.layers
