"""Run gpauloski/kfac-pytorch's `KFACPreconditioner` on kfac_fast ops.

    import kfac
    from kfac_fast.integrations.kfac_pytorch import accelerate, deaccelerate, accelerated
    precond = accelerate(kfac.preconditioner.KFACPreconditioner(model, ...))  # same object
    ...  loss.backward(); precond.step(); optimizer.step()  # as before

What changes is how the numbers are computed, not which numbers: kfac-pytorch's own
conventions are kept, including the ones that differ from kfac_fast's frontend:
- A = mean over rows of [a | 1][a | 1]^T; G = mean of g g^T with g = grad_output / scaler
  (no batch-size correction: G shrinks with the batch size, as in kfac-pytorch);
- Conv2d: patches and output gradients are divided by the number of spatial positions
  L before the covariance (so A and G carry 1/L^2), patches ignore `dilation` exactly as
  kfac-pytorch's `_extract_patches` does;
- running average F <- decay*F + (1-decay)*X started from the identity (no
  zero-debiasing), the mean over accumulation steps first;
- eigendecompositions and inverses of the factors cast to float32 (kfac-pytorch's
  choice), results stored in `inv_dtype`, eigenvalues clamped at 0;
- EIGEN: P = Q_G[(Q_G^T dW Q_A) / (d_G d_A^T + damping)]Q_A^T; with
  `compute_eigenvalue_outer_product` the damping is the one of the last refresh;
  INVERSE: (G + damping I)^-1 dW (A + damping I)^-1 (the same damping on both factors);
- KL clip nu = min(1, sqrt(kl_clip / |lr^2 sum <P, dW>|)), computed on the device
  (kfac-pytorch syncs twice per layer for it).

Patched internals (instance attributes that shadow the class methods; the classes are
untouched, `deaccelerate` deletes them; tested with kfac-pytorch 0.4.2, commit 869cf11):
- every `KFACEigenLayer` / `KFACInverseLayer` whose helper is exactly
  `LinearModuleHelper` or `Conv2dModuleHelper`: `save_layer_input`,
  `save_layer_grad_output`, `update_a_factor`, `update_g_factor`, `reset_batch`,
  `compute_a_inv`, `compute_g_inv`, `preconditioned_grad`. Covariances go through
  `ops.update_factor_` / `ops.conv_input_factor_` (no concatenated ones column, no
  im2col copy); with factors updated in the hooks, the running average is folded into
  the same call (beta = decay);
- single process with every layer supported and on one device ("batched" mode):
  `KFACPreconditioner.step` too: one `ops.eigh` (or `ops.damped_inverse`) for all
  factors of all layers, then one `ops.precondition_eigen_` / `ops.precondition_inverse_`
  that writes nu * P into `.grad` in place with the KL clip fused. In batched mode
  with `compute_eigenvalue_outer_product`, layers keep `da`, `dg` (and the damping of
  the refresh) instead of `dgda`; `deaccelerate` converts them back.
Under torch.distributed with several ranks only the per-layer methods are patched and
kfac-pytorch's own `step` (work assignment, broadcasts) runs unchanged.
"""
from __future__ import annotations

from collections import defaultdict
from typing import Callable, Optional

import torch

from .. import ops
from ._kfac_pytorch_factors import a_stat, fold_pending, g_stat, save_stat, update_factor
from ._patching import accelerated_context, is_accelerated, restore_attributes, save_attributes, set_record, take_record

__all__ = ["accelerate", "deaccelerate", "accelerated", "is_accelerated", "TESTED_VERSIONS"]

TESTED_VERSIONS = ("0.4.2",)
# kfac-pytorch decomposes every factor in float32, whatever the factor dtype.
_DECOMP_DTYPE = torch.float32
_LAYER_METHODS = ("save_layer_input", "save_layer_grad_output", "update_a_factor", "update_g_factor",
                  "reset_batch", "compute_a_inv", "compute_g_inv", "preconditioned_grad")


def _kfac():
    try:
        import kfac
        import kfac.layers.eigen
        import kfac.layers.inverse
        import kfac.layers.modules
        import kfac.preconditioner
    except ImportError as exc:  # pragma: no cover - exercised only without kfac
        raise ImportError("kfac_fast.integrations.kfac_pytorch needs kfac-pytorch "
                          "(https://github.com/gpauloski/kfac-pytorch), which is not installed") from exc
    return kfac


# =======================================================================================
# decompositions and preconditioning
# =======================================================================================
def _require(factor, what: str, side: str):
    if not isinstance(factor, torch.Tensor):
        raise RuntimeError(f"Cannot {what} {side} before {side} has been computed")
    return factor


def _store_eigen(layer, side: str, vals, vecs, damping: float, batched: bool) -> None:
    setattr(layer, f"q{side}", vecs.to(layer.inv_dtype))
    setattr(layer, f"d{side}", vals.to(layer.inv_dtype))
    if side == "g" and layer.prediv_eigenvalues:
        if batched:
            layer.dgda = None
            layer._kfac_fast_inv_damping = damping
        else:  # kfac-pytorch's format, which its broadcasts send
            layer.dgda = 1 / (torch.outer(layer.dg, layer.da) + damping)
            layer.dg = None
            layer.da = None


def _refresh(layers, damping: float, batched: bool) -> None:
    """Eigendecompose (EIGEN) or invert (INVERSE) the A and G of all layers at once."""
    a = [_require(layer.a_factor, "decompose", "A").to(_DECOMP_DTYPE) for layer in layers]
    g = [_require(layer.g_factor, "decompose", "G").to(_DECOMP_DTYPE) for layer in layers]
    if _is_eigen(layers[0]):
        vals, vecs = ops.eigh(a + g)
        for i, layer in enumerate(layers):
            _store_eigen(layer, "a", vals[i], vecs[i], damping, batched)
            _store_eigen(layer, "g", vals[len(layers) + i], vecs[len(layers) + i], damping, batched)
    else:
        inv = ops.damped_inverse(a + g, damping)
        for i, layer in enumerate(layers):
            layer.a_inv = inv[i].to(layer.inv_dtype)
            layer.g_inv = inv[len(layers) + i].to(layer.inv_dtype)


def _eigen_damping(layer, damping: float) -> float:
    return layer._kfac_fast_inv_damping if layer.prediv_eigenvalues else damping


def _precondition_all(layers, damping: float, lr: float, kl_clip: Optional[float]) -> None:
    """nu * P into every layer's .grad in place, one grouped call, KL clip on device."""
    weights = [layer.module.module.weight.grad for layer in layers]
    biases = [layer.module.module.bias.grad if layer.module.has_bias() else None for layer in layers]
    # lr == 0 makes kfac-pytorch's KL sum 0, hence nu = 1: the same as no clip.
    clip = {} if kl_clip is None or lr == 0 else {"lr": lr, "kl_clip": kl_clip}
    if _is_eigen(layers[0]):
        missing = [i for i, layer in enumerate(layers) if layer.qa is None or layer.da is None]
        if missing:
            raise RuntimeError("Eigendecompositions for both A and G have not been computed")
        ops.precondition_eigen_(weights, biases, [layer.qa for layer in layers], [layer.da for layer in layers],
                                [layer.qg for layer in layers], [layer.dg for layer in layers],
                                [_eigen_damping(layer, damping) for layer in layers], **clip)
    else:
        if any(layer.a_inv is None or layer.g_inv is None for layer in layers):
            raise RuntimeError("Cannot precondition gradient before A and G have been inverted")
        ops.precondition_inverse_(weights, biases, [layer.a_inv for layer in layers],
                                  [layer.g_inv for layer in layers], **clip)


# =======================================================================================
# the patches
# =======================================================================================
def _is_eigen(layer) -> bool:
    return isinstance(layer, _kfac().layers.eigen.KFACEigenLayer)


def _layer_methods(layer, lazy: bool, batched: bool, originals: dict) -> dict:
    """Replacement methods for one layer (closures over it)."""

    def save_layer_input(input_):
        save_stat(layer, "a", a_stat(layer, input_[0]), lazy)

    def save_layer_grad_output(grad_output):
        save_stat(layer, "g", g_stat(layer, grad_output[0]), lazy)

    def update_a_factor(alpha: float = 0.95):
        update_factor(layer, "a", alpha)

    def update_g_factor(alpha: float = 0.95):
        update_factor(layer, "g", alpha)

    def reset_batch():
        layer._kfac_fast_a_pending = None
        layer._kfac_fast_g_pending = None
        originals["reset_batch"]()

    def compute_a_inv(damping: float = 0.001):
        a = _require(layer.a_factor, "invert", "A").to(_DECOMP_DTYPE)
        if _is_eigen(layer):
            (vals,), (vecs,) = ops.eigh([a])
            _store_eigen(layer, "a", vals, vecs, damping, batched)
        else:
            layer.a_inv = ops.damped_inverse([a], damping)[0].to(layer.inv_dtype)

    def compute_g_inv(damping: float = 0.001):
        g = _require(layer.g_factor, "invert", "G").to(_DECOMP_DTYPE)
        if _is_eigen(layer):
            if layer.da is None:
                raise RuntimeError("compute_a_inv must run before compute_g_inv")
            (vals,), (vecs,) = ops.eigh([g])
            _store_eigen(layer, "g", vals, vecs, damping, batched)
        else:
            layer.g_inv = ops.damped_inverse([g], damping)[0].to(layer.inv_dtype)

    def preconditioned_grad(damping: float = 0.001):
        if _is_eigen(layer) and layer.prediv_eigenvalues and layer.dgda is not None:
            return originals["preconditioned_grad"](damping)  # kfac-pytorch's dgda format
        grad = layer.module.get_grad()
        if _is_eigen(layer):
            if layer.qa is None or layer.qg is None or layer.da is None or layer.dg is None:
                raise RuntimeError("Eigendecompositions for both A and G have not been computed")
            p = ops.precondition_eigen([grad], [layer.qa], [layer.da], [layer.qg], [layer.dg],
                                       _eigen_damping(layer, damping))
        else:
            if layer.a_inv is None or layer.g_inv is None:
                raise RuntimeError("Cannot precondition gradient before A and G have been inverted")
            p = ops.precondition_inverse([grad], [layer.a_inv], [layer.g_inv])
        layer.grad = p[0]

    return {name: fn for name, fn in locals().items() if name in _LAYER_METHODS}


def _make_step(pc, layers: list) -> Callable:
    """KFACPreconditioner.step for one process: same schedule, grouped ops."""

    @torch.no_grad()
    def step() -> None:
        if not pc._update_factors_in_hook and pc.steps % pc.factor_update_steps == 0:
            for name, layer in reversed(list(pc._layers.values())):
                pc._mini_steps[name] = 0
                layer.update_a_factor(alpha=pc.factor_decay)
                layer.reduce_a_factor(pc._assignment.factor_group(name, "A"))
                layer.update_g_factor(alpha=pc.factor_decay)
                layer.reduce_g_factor(pc._assignment.factor_group(name, "G"))
        pc._tdc.flush_allreduce_buckets()
        if pc.steps % pc.inv_update_steps == 0:
            _refresh(layers, pc.damping, batched=True)
        _precondition_all(layers, pc.damping, pc.lr, pc.kl_clip)
        pc._steps += 1
        pc._mini_steps = defaultdict(int)

    return step


def _supported(layer) -> bool:
    kfac = _kfac()
    helper = type(layer.module)
    return (type(layer) in (kfac.layers.eigen.KFACEigenLayer, kfac.layers.inverse.KFACInverseLayer)
            and helper in (kfac.layers.modules.LinearModuleHelper, kfac.layers.modules.Conv2dModuleHelper))


def _check(pc) -> None:
    kfac = _kfac()
    if not isinstance(pc, kfac.base_preconditioner.BaseKFACPreconditioner):
        raise TypeError(f"accelerate: expected a kfac.preconditioner.KFACPreconditioner, got {type(pc).__name__}")
    for attr in ("_layers", "_assignment", "_tdc", "_mini_steps", "_steps", "_update_factors_in_hook"):
        if not hasattr(pc, attr):
            raise TypeError(f"accelerate: this kfac-pytorch version has no {attr!r} on its preconditioner "
                            f"(tested with {', '.join(TESTED_VERSIONS)})")
    for name, layer in pc._layers.values():
        if not _supported(layer):
            continue
        for dtype_name in ("factor_dtype", "inv_dtype"):
            dtype = getattr(layer, dtype_name)
            if dtype is not None and dtype not in (torch.float32, torch.float64):
                raise ValueError(f"accelerate: layer {name!r} has {dtype_name}={dtype}; kfac_fast keeps factors "
                                 "and decompositions in float32 or float64")


def accelerate(pc, *, batched: Optional[bool] = None):
    """Route a kfac-pytorch preconditioner's math through kfac_fast; returns the same object.

    batched: patch `step` to handle all layers in grouped ops (default: when running in
    one process with every registered layer supported and on one device; True demands
    it, False keeps kfac-pytorch's per-layer step). Layers kfac_fast does not know
    (other helper or layer classes) keep their own methods. Accelerating twice is a no-op.
    """
    if is_accelerated(pc):
        return pc
    _check(pc)
    kfac = _kfac()
    all_layers = [layer for _, layer in reversed(list(pc._layers.values()))]
    layers = [layer for layer in all_layers if _supported(layer)]
    devices = {layer.module.device for layer in layers}
    can_batch = (bool(layers) and len(layers) == len(all_layers) and len(devices) == 1
                 and kfac.distributed.get_world_size() == 1)
    if batched and not can_batch:
        raise ValueError("accelerate: batched=True needs one process, every registered layer a Linear or "
                         "Conv2d KFAC layer, and all layers on one device")
    batched = can_batch if batched is None else batched
    # Without accumulation the hooks run save and update back to back: a capture can
    # wait for the update and join it (beta = decay) without outliving the hook.
    lazy = bool(pc._update_factors_in_hook) and pc._accumulation_steps == 1
    record = {"layers": [], "saved": save_attributes(pc, ("step",)), "batched": batched}
    for layer in layers:
        originals = {name: getattr(layer, name) for name in _LAYER_METHODS}
        saved = save_attributes(layer, _LAYER_METHODS)
        for name, fn in _layer_methods(layer, lazy, batched, originals).items():
            setattr(layer, name, fn)
        layer._kfac_fast_a_pending = None
        layer._kfac_fast_g_pending = None
        record["layers"].append((layer, saved))
    if batched:
        pc.step = _make_step(pc, layers)
    set_record(pc, record)
    return pc


def deaccelerate(pc):
    """Undo `accelerate`: kfac-pytorch's own methods again, state in its own format."""
    record = take_record(pc)
    if record is None:
        return pc
    for layer, saved in record["layers"]:
        fold_pending(layer, "a")
        fold_pending(layer, "g")
        if (_is_eigen(layer) and layer.prediv_eigenvalues and layer.dgda is None
                and layer.da is not None and layer.dg is not None):
            layer.dgda = 1 / (torch.outer(layer.dg, layer.da) + layer._kfac_fast_inv_damping)
            layer.da = None
            layer.dg = None
        restore_attributes(layer, saved)
        for attr in ("_kfac_fast_a_pending", "_kfac_fast_g_pending", "_kfac_fast_inv_damping"):
            layer.__dict__.pop(attr, None)
    if record["batched"]:
        restore_attributes(pc, record["saved"])
    return pc


accelerated = accelerated_context(
    accelerate, deaccelerate, "`with accelerated(precond): ...` accelerates for the block, then restores.")
