"""EigenAdam: Adam in the eigenbasis of K-FAC's factors (AdamW for the other parameters).

SOAP runs Adam in the eigenbasis of Shampoo's factors; EigenAdam runs it in the eigenbasis
of K-FAC's. For each nn.Linear that K-FAC registers, with gradient W_bar = [dW | db]
(g_dim, a_dim) and the eigendecompositions A = Q_A diag(d_A) Q_A^T, G = Q_G diag(d_G) Q_G^T
of its running factors (KFACPreconditioner, method "eigen"), step t does

    r_t = Q_G^T W_bar_t Q_A
    m_t = b1 m_{t-1} + (1 - b1) r_t,        v_t = b2 v_{t-1} + (1 - b2) r_t^2
    W_bar <- W_bar (1 - lr wd) - lr / (1 - b1^t) Q_G (m_t / (sqrt(v_t / (1 - b2^t)) + eps)) Q_A^T

so Adam's per-coordinate second moments (EKFAC's idea, with Adam's running v in place of
per-example scales) replace K-FAC's eigenvalues and damping: the factors only choose the
basis. When a refresh changes the basis, m is carried into the new one
(m <- Q_G'^T Q_G m Q_A^T Q_A') and v is kept, as SOAP does. Every other parameter
(embeddings, norms, Linear layers K-FAC skips) gets torch.optim.AdamW at the same
hyperparameters, on its K-FAC-preconditioned gradient when the preconditioner holds a
block for it (embeddings, opt-in norms) and on the plain one otherwise.
"""
from __future__ import annotations

import copy
import math
from typing import Any, Callable, Optional

import torch
from torch import nn

from .distributed import DistributedOptions
from .health import all_finite
from .preconditioner import KFACPreconditioner

__all__ = ["EigenAdam"]


class _BasisOnly(KFACPreconditioner):
    """A KFACPreconditioner that updates factors and refreshes eigenbases as usual but
    leaves the `.grad` of the layers in `owned` alone (EigenAdam reads their raw gradient)."""

    owned: frozenset = frozenset()

    def _guarded_precondition(self, layers: list) -> None:
        # filtered here too, so that the non-finite guard checks only the gradients it rewrites
        super()._guarded_precondition([layer for layer in layers if layer.name not in self.owned])

    def _precondition(self, layers: list) -> None:
        # every path ends here (step's guarded one, already filtered: a no-op, and
        # repeat_precondition, which calls it directly)
        super()._precondition([layer for layer in layers if layer.name not in self.owned])


def _number(name: str, value: Any, low: float, *, strict: bool = False, high: Optional[float] = None) -> float:
    """`value` as a float if it is a finite real number in range, else a TypeError/ValueError naming it."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    bad = not math.isfinite(value) or value < low or (strict and value == low) or (high is not None and value >= high)
    if bad:
        what = f"{'>' if strict else '>='} {low}" + ("" if high is None else f" and < {high}")
        raise ValueError(f"{name} must be a finite number {what}, got {value!r}")
    return float(value)


def _is_dtensor(p: torch.Tensor) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch without DTensor: nothing can be sharded
        return False
    return isinstance(p, DTensor)


def _rotate(m: torch.Tensor, old: tuple, new: tuple) -> torch.Tensor:
    """m (in the basis `old` = (Q_A, Q_G)) in the basis `new`: Q_G'^T Q_G m Q_A^T Q_A' (None: I)."""
    (qa0, qg0), (qa1, qg1) = old, new
    left = qg0 if qg1 is None else (qg1.T if qg0 is None else qg1.T @ qg0)
    right = qa0.T if qa1 is None else (qa1 if qa0 is None else qa0.T @ qa1)
    return left @ m @ right


class EigenAdam(torch.optim.Optimizer):
    """Adam in the eigenbasis of K-FAC's factors for a model's nn.Linear layers, AdamW for
    the rest (the math: module docstring). It owns its `KFACPreconditioner` (`self.precond`):
    `step()` runs the preconditioner's factor updates and refreshes, then the two updates.

    Args:
        model: the nn.Module to train; K-FAC registers its layers at construction.
        lr: learning rate (>= 0) of every parameter.
        betas: Adam's (b1, b2), each in [0, 1).
        eps: added to sqrt(v_hat) (> 0: a coordinate whose gradient has always been 0
            would otherwise divide 0 by 0).
        weight_decay: decoupled (AdamW) weight decay, >= 0, of every parameter (biases
            included, as torch.optim.AdamW with one group); default 0.
        damping: K-FAC's damping (> 0), used only for the blocks K-FAC preconditions the
            usual way before AdamW (embeddings, opt-in norms); the Linear layers' step has
            none (eps plays its part).
        **kfac: further KFACPreconditioner arguments (factor_update_steps, inv_update_steps,
            factor_decay, loss_average, skip_layers, factor_dtype, eigh_tol, distributed,
            ...). method is always "eigen" and kl_clip None: other values are refused.

    Parameter groups: `param_groups[0]` holds the Linear layers' weights and biases (Adam in
    the eigenbasis), `param_groups[1]` (when there are other parameters) the rest; the
    latter is the group of the inner torch.optim.AdamW itself, so an lr scheduler (StepLR,
    OneCycleLR, ...) changes both. `add_param_group` is refused (the split follows the model).

    State: per Linear layer, `self.state[layer.weight]` = {"step": t (int), "exp_avg": m,
    "exp_avg_sq": v} (m and v of [W | b] in the current eigenbasis, shape (out, in + bias),
    in the preconditioner's factor_dtype whatever the weights' dtype);
    AdamW's usual state for the rest. `state_dict()` adds the preconditioner's state under
    "kfac" (factors and eigenbases), and `load_state_dict` restores both and re-attaches the
    moments to the loaded eigenbases, so a run resumed from `state_dict()` continues
    bit-identically. The eigenbasis is not duplicated in the optimizer state: after every
    `step()` the moments are in the preconditioner's current basis.

    Data parallel: with DDP (or averaged gradients) and the preconditioner's default
    strategy "communication", every rank holds every eigenbasis (broadcast from its owner)
    and the same averaged gradient, so every rank computes the same moments and update;
    checkpoint with `synced_state_dict()` (a collective: the preconditioner's synced
    state). Tested on 2 gloo ranks with DDP (tests/test_eigen_adam.py: the ranks agree bit
    for bit, match one process on the whole batch to rounding, and resume from
    `synced_state_dict()` bit-identically). Strategy "memory" is refused (a rank holds only
    the eigenbases it owns) and so are FSDP2-sharded layers, on a group of one rank too (the
    rotation needs each Linear layer's whole gradient); both raise NotImplementedError.

    Non-finite gradients: with the preconditioner's guard_nonfinite (default on), a step in
    which any Linear layer's gradient has a NaN/inf leaves every Linear layer's moments,
    weight and bias as they were (one device-side flag, no host sync); the step count still
    advances (it is a host int), and the skip is not counted in `precond.health()`. The
    other parameters get torch's AdamW as it is (a non-finite gradient there reaches its
    moments, as in plain AdamW).

    No host sync on the per-step path (the preconditioner's refresh steps aside). A closure
    is refused: call backward before `step()`.

    Example::

        >>> import torch, torch.nn.functional as F
        >>> import kfac_fast
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
        >>> opt = kfac_fast.EigenAdam(model, lr=1e-2, inv_update_steps=10)
        >>> sched = torch.optim.lr_scheduler.StepLR(opt, step_size=100, gamma=0.5)
        >>> x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
        >>> for _ in range(3):
        ...     opt.zero_grad()
        ...     F.cross_entropy(model(x), y).backward()
        ...     opt.step()
        ...     sched.step()
        >>> opt.state[model[0].weight]["step"]
        3
    """

    def __init__(self, model: nn.Module, *, lr: float, betas: tuple = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, damping: float = 0.01, **kfac: Any) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        lr = _number("lr", lr, 0.0)
        if not isinstance(betas, (tuple, list)) or len(betas) != 2:
            raise ValueError(f"betas must be a pair (b1, b2), got {betas!r}")
        betas = (_number("betas[0]", betas[0], 0.0, high=1.0), _number("betas[1]", betas[1], 0.0, high=1.0))
        eps = _number("eps", eps, 0.0, strict=True)
        weight_decay = _number("weight_decay", weight_decay, 0.0)
        if kfac.get("method", "eigen") != "eigen":
            raise ValueError(f"method must be 'eigen' for EigenAdam (Adam runs in the eigenbasis), "
                             f"got {kfac['method']!r}")
        if kfac.get("kl_clip") is not None:
            raise ValueError(f"kl_clip must be None for EigenAdam (it clips K-FAC's own step, which EigenAdam "
                             f"does not take), got {kfac['kl_clip']!r}")
        options = kfac.get("distributed")
        if isinstance(options, DistributedOptions) and options.strategy == "memory":
            raise NotImplementedError(_MEMORY)
        kfac.update(method="eigen", kl_clip=None)
        # the preconditioner's lr serves only its KL clip, which is off: any positive value
        self.precond = _BasisOnly(model, lr=lr if lr > 0 else 1.0, damping=damping, **kfac)
        driver = self.precond.distributed
        if driver is not None and (driver.strategy == "memory" or driver.sharded is not None):
            self.precond.remove_hooks()
            raise NotImplementedError(_MEMORY if driver.strategy == "memory" else _FSDP)
        self.dense = [layer for layer in self.precond.layers.values()
                      if isinstance(layer.module, nn.Linear) and not layer.diagonal_a]
        if not self.dense:
            self.precond.remove_hooks()
            raise ValueError("model has no nn.Linear layer that K-FAC registers (check skip_layers): "
                             "EigenAdam would be plain AdamW")
        if any(_is_dtensor(p) for layer in self.dense for p in layer.module.parameters()):
            self.precond.remove_hooks()  # FSDP2 on a group of one rank: no driver, DTensor parameters
            raise NotImplementedError(_FSDP)
        for layer in self.dense:
            m = layer.module
            if any(getattr(m, k) is not None and not (isinstance(getattr(m, k), nn.Parameter)
                                                      and m._parameters.get(k) is getattr(m, k))
                   for k in ("weight", "bias")):
                self.precond.remove_hooks()
                raise ValueError(f"model: layer {layer.name!r} has a weight or bias that is not its own "
                                 "nn.Parameter (a parametrization, weight_norm?): EigenAdam writes its update "
                                 "into module.weight / module.bias; remove the parametrization or skip the layer")
        self.precond.owned = frozenset(layer.name for layer in self.dense)
        ids = {id(p) for layer in self.dense for p in layer.module.parameters()}
        rest = [p for p in model.parameters() if id(p) not in ids]
        groups: list[dict] = [{"params": [p for layer in self.dense for p in layer.module.parameters()]}]
        self.adamw = None
        if rest:
            self.adamw = torch.optim.AdamW(rest, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
            groups.append(dict(self.adamw.param_groups[0]))
        # the basis each layer's moments are in, by identity (a refresh or a load makes new tensors)
        self._bases: dict[str, tuple] = {}
        self._ready = False
        super().__init__(groups, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        self._ready = True
        self._share()

    def _share(self) -> None:
        """The inner AdamW uses this optimizer's second group and state (schedulers, state_dict)."""
        if self.adamw is not None:
            self.adamw.param_groups = [self.param_groups[1]]
            self.adamw.state = self.state

    def add_param_group(self, param_group: dict) -> None:
        if self._ready:
            raise NotImplementedError("EigenAdam's parameter groups follow the model (the Linear layers, "
                                      "then the rest): add_param_group is not supported")
        super().add_param_group(param_group)

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], Any]] = None) -> Optional[torch.Tensor]:  # type: ignore[override]
        """One step: the preconditioner's factor update / refresh (and the K-FAC
        preconditioning of the other blocks), Adam in the eigenbasis for the Linear layers,
        AdamW for the rest. Call after backward."""
        if closure is not None:
            raise ValueError("EigenAdam.step: closure is not supported (call backward first)")
        self.precond.step()
        # one device flag (no host sync): a step with a non-finite gradient on any of these
        # layers leaves their moments and weights as they were (None: guard off or no gradient)
        ok = all_finite([g for layer in self.dense for g in layer.param_grads()]) \
            if self.precond.guard_nonfinite else None
        group = self.param_groups[0]
        lr, (b1, b2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
        for layer in self.dense:
            w, b = layer.module.weight, layer.module.bias
            basis = (layer.qa, layer.qg)  # (None, None) before the first refresh: the identity
            s = self.state[w]
            # a basis change is detected by identity: a refresh assigns new tensors
            # (preconditioner/refresh.py _refresh_eigen: layer.qa, layer.qg = eigh's outputs;
            # distributed/data_parallel.py: owners setattr eigh's outputs, the other ranks
            # allocate new tensors in _result_tensors before the broadcast), and so do
            # load_state_dict (preconditioner/state.py). A decomposition kept after a failed eigh
            # keeps its tensor single-process (no rotation); data-parallel, the ranks that do not
            # own it still get a new tensor and rotate m by Q^T Q (the identity up to rounding)
            if s and (basis[0] is not self._bases[layer.name][0] or basis[1] is not self._bases[layer.name][1]):
                s["exp_avg"] = _rotate(s["exp_avg"], self._bases[layer.name], basis)  # a refresh: carry m
            self._bases[layer.name] = basis
            if w.grad is None and (b is None or b.grad is None):
                continue
            if w.grad is None or (b is not None and b.grad is None):
                raise ValueError(f"EigenAdam: layer {layer.name!r} has a gradient for only one of weight and "
                                 "bias; it updates [W | b] together (freeze both or neither)")
            # the moments live in the basis dtype (factor_dtype), the update goes back in the
            # parameter's: for a float32 model with float32 factors both casts are no-ops
            g = (w.grad if b is None else torch.cat([w.grad, b.grad[:, None]], dim=1)).to(self.precond.factor_dtype)
            qa, qg = basis
            if not s:
                s.update(step=0, exp_avg=torch.zeros_like(g), exp_avg_sq=torch.zeros_like(g))
            s["step"] += 1
            t = s["step"]
            r = g if qa is None else qg.T @ g @ qa
            m, v = s["exp_avg"], s["exp_avg_sq"]
            if ok is None:
                m_t, v_t = m.lerp_(r, 1 - b1), v.mul_(b2).addcmul_(r, r, value=1 - b2)
            else:  # the same operations out of place, written back below where the step is finite
                m_t, v_t = torch.lerp(m, r, 1 - b1), v.mul(b2).addcmul_(r, r, value=1 - b2)
            denom = (v_t / (1 - b2 ** t)).sqrt_().add_(eps)
            u = m_t / denom
            if qa is not None:
                u = qg @ u @ qa.T
            u = u.mul_(lr / (1 - b1 ** t)).to(w.dtype)
            decay: Any = 1 - lr * wd
            if ok is not None:
                torch.where(ok, m_t, m, out=m)  # in place: the state keeps its tensors
                torch.where(ok, v_t, v, out=v)
                u = torch.where(ok, u, 0.0)  # p - 0 == p
                if wd != 0:  # p * 1 == p; a 0-dim tensor in p's dtype multiplies as the Python float does
                    decay = torch.where(ok, torch.full((), decay, dtype=w.dtype, device=w.device), 1.0)
            if wd != 0:
                w.mul_(decay)
                if b is not None:
                    b.mul_(decay)
            w.sub_(u[:, :w.shape[1]])
            if b is not None:
                b.sub_(u[:, -1])
        if self.adamw is not None:
            self.adamw.step()
        return None

    def state_dict(self) -> dict[str, Any]:
        """torch's optimizer state (moments, groups) plus the preconditioner's under "kfac"."""
        out = super().state_dict()
        out["kfac"] = self.precond.state_dict()
        return out

    def synced_state_dict(self) -> dict[str, Any]:
        """`state_dict()` with the preconditioner's `synced_state_dict()` (a collective when
        data-parallel: call it on every rank); single-process the same as `state_dict()`."""
        out = super().state_dict()
        out["kfac"] = self.precond.synced_state_dict()
        return out

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore `state_dict()`: checked first (a refused state changes nothing), then the
        preconditioner's state, the moments, and the moments re-attached to the loaded bases."""
        if not isinstance(state_dict, dict) or not {"state", "param_groups", "kfac"} <= set(state_dict):
            raise ValueError("state_dict must come from EigenAdam.state_dict() (with 'state', 'param_groups' "
                             "and the preconditioner's 'kfac')")
        saved = state_dict["param_groups"]
        if len(saved) != len(self.param_groups) or any(
                len(s["params"]) != len(g["params"]) for s, g in zip(saved, self.param_groups)):
            raise ValueError("state_dict's parameter groups do not match this model's (Linear layers, then the rest)")
        index = dict(zip(saved[0]["params"], self.param_groups[0]["params"]))
        for layer in self.dense:
            ids = [i for i, p in index.items() if p is layer.module.weight]
            entry = state_dict["state"].get(ids[0], {}) if ids else {}
            want = (layer.g_dim, layer.a_dim)
            for key in ("exp_avg", "exp_avg_sq"):
                if key in entry and not isinstance(entry[key], torch.Tensor):
                    raise TypeError(f"state_dict: layer {layer.name!r}: {key} must be a tensor, "
                                    f"got {type(entry[key]).__name__}")
                if key in entry and tuple(entry[key].shape) != want:
                    raise ValueError(f"state_dict: layer {layer.name!r} has {key} of shape "
                                     f"{tuple(entry[key].shape)}, this model's needs {want}")
        # torch's part can still raise (its own checks, hooks): then the preconditioner goes
        # back to its state before, and the moments to the bases they were in
        backup = copy.deepcopy(self.precond.state_dict())
        current = {layer.name: (layer.qa, layer.qg) for layer in self.dense}
        self.precond.load_state_dict(state_dict["kfac"])
        rest = {k: v for k, v in state_dict.items() if k != "kfac"}
        try:
            super().load_state_dict(rest)
        except BaseException:
            self.precond.load_state_dict(backup)
            for layer in self.dense:
                basis = self._bases.get(layer.name)
                if basis is not None and all(x is y for x, y in zip(basis, current[layer.name])):
                    self._bases[layer.name] = (layer.qa, layer.qg)  # the same values, new tensors
            raise
        self._share()
        # torch casts the state to each parameter's dtype: the moments live in factor_dtype,
        # so take them from the saved tensors again (a no-op for float32 models and factors)
        for layer in self.dense:
            ids = [i for i, p in index.items() if p is layer.module.weight]
            entry = state_dict["state"].get(ids[0], {}) if ids else {}
            s = self.state[layer.module.weight]
            for key in ("exp_avg", "exp_avg_sq"):
                if key in entry:
                    s[key] = entry[key].to(device=layer.module.weight.device, dtype=self.precond.factor_dtype,
                                           copy=True)
        # the moments were saved in the bases the preconditioner saved with them
        self._bases = {layer.name: (layer.qa, layer.qg) for layer in self.dense}


_MEMORY = ("EigenAdam does not support the preconditioner's strategy 'memory': a rank holds only the "
           "eigenbases it owns, and every rank needs every Linear layer's basis; use strategy 'communication'")
_FSDP = ("EigenAdam does not support FSDP2-sharded layers: Adam in the eigenbasis rotates each Linear layer's "
         "whole gradient [dW | db] and writes its whole update, which FSDP2 shards across ranks")
