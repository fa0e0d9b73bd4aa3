"""KFAC on FSDP2 (`fully_shard`) models: its step on the unsharded parameters.

KFAC's Fisher products differentiate the closure's graph twice. Under `fully_shard` that
graph runs on the unsharded copies FSDP2 all-gathers for the forward, not on the sharded
DTensor parameters, and FSDP2 frees those copies after the forward and the backward
(probed on torch 2.13: the double backward then fails with 'setStorage: ... out of
bounds for storage of size 0'). So for the duration of `KFAC.step` (`ShardedStep.during`)
KFAC turns FSDP2's resharding off for its modules and runs the whole step on the
unsharded parameters, exactly as under plain data parallelism: the products, the
n-weighted gradient all-reduce, the preconditioner (its layers then hold whole
gradients), the updates and the closure's re-evaluations. At the end of the step each
rank adds its rows of the update (the parameter's own torch.chunk share on its 1-D mesh,
cast to the shard's dtype) to its shard; then the modules' own resharding settings come
back (also when the step raises) and they reshard, so outside `step` the parameters are
sharded and FSDP2 behaves as configured (an eval forward reshards as usual).

Mixed precision (`MixedPrecisionPolicy(param_dtype=torch.bfloat16)`): the step is computed
in param_dtype on the unsharded copies (gradients, directions, the update), and the update
is added to the float32 shards, which stay float32 masters (not rounded to the bf16 grid).
Parameters outside every `fully_shard` (plain replicated tensors) are updated in place, as
under plain data parallelism. A DTensor parameter that is not Shard(0) on a 1-D mesh
(HSDP, tensor parallelism) is refused at construction.

Memory: during the step every rank holds the whole model, its gradient, the directions
and (with momentum) the previous update, as under DDP; KFAC's state (the previous update)
is kept whole, keyed by the sharded parameter.
"""
from __future__ import annotations

import contextlib
from typing import Any, Iterator, Optional

import torch
from torch import nn

from .distributed.sharded_grads import chunk_rows


def fsdp2_modules(model: nn.Module) -> list:
    """The FSDP2 (`fully_shard`) modules of `model`, outermost first (none without FSDP2)."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:
        return []
    return [m for m in model.modules() if isinstance(m, FSDPModule)]


def _dtensor_type() -> Any:
    from torch.distributed.tensor import DTensor
    return DTensor


def shard_rows(name: str, p: Any) -> tuple[int, int]:
    """(first row, row count) of this rank's shard of the DTensor parameter `p`, from its
    own mesh and placement; NotImplementedError naming `name` unless Shard(0) on a 1-D mesh."""
    from torch.distributed.tensor import Shard
    mesh, placements = p.device_mesh, tuple(p.placements)
    if mesh.ndim != 1 or len(placements) != 1 or type(placements[0]) is not Shard or placements[0].dim != 0:
        raise NotImplementedError(
            f"kfac_fast.KFAC on an FSDP2 model: parameter {name!r} is placed {placements} on a {mesh.ndim}-D mesh; "
            "only Shard(0) on a 1-D mesh (fully_shard on a 1-D mesh) is supported (not HSDP, not tensor parallelism)")
    start, rows = chunk_rows(p.shape[0] if p.dim() else 1, mesh.size(), mesh.get_local_rank())
    if p.dim() == 0 or tuple(p.to_local().shape) != (rows, *p.shape[1:]):
        raise NotImplementedError(f"kfac_fast.KFAC on an FSDP2 model: parameter {name!r}'s local shard "
                                  f"{tuple(p.to_local().shape)} is not torch.chunk's rows {start}:{start + rows}")
    return start, rows


def _reshard_settings(module: Any) -> tuple:
    """What `set_reshard_after_forward/backward` change on one FSDP2 module (torch
    internals, read to restore them exactly: an int reshard_after_forward, the root's)."""
    state = module._get_fsdp_state()
    groups = list(state._fsdp_param_groups)
    return state, state._auto_reshard_after_forward, [(g, g.post_forward_mesh_info, g.reshard_after_backward)
                                                      for g in groups]


class ShardedStep:
    """KFAC's view of an FSDP2 model: the unsharded parameters of a step, and the write-back.

    Args:
        model: the model; its FSDP2 modules stop resharding during `step` (module docstring).
        named: KFAC's parameters (name, parameter), sharded DTensors or plain tensors, in
            model.parameters() order.
    """

    def __init__(self, model: nn.Module, named: list) -> None:
        dtensor = _dtensor_type()
        self.model = model
        self.modules = fsdp2_modules(model)
        self.sharded = [p for _, p in named]
        # every DTensor parameter is checked here, K-FAC layer or not
        self._rows = {id(p): shard_rows(n, p) for n, p in named if isinstance(p, dtensor)}
        self._keys: dict = {}
        self._pairs: list = []

    @contextlib.contextmanager
    def during(self) -> Iterator[None]:
        """The body of one `KFAC.step`: the modules keep their unsharded parameters inside;
        their settings are restored and they reshard on the way out (also on an error)."""
        saved, seen = [], set()
        for m in self.modules:
            settings = _reshard_settings(m)
            if id(settings[0]) not in seen:
                seen.add(id(settings[0]))
                saved.append(settings)
        for m in self.modules:
            m.set_reshard_after_forward(False, recurse=False)
            m.set_reshard_after_backward(False, recurse=False)
        try:
            yield
        finally:
            for state, auto, groups in saved:
                state._auto_reshard_after_forward = auto
                for g, post_forward, after_backward in groups:
                    # a root left on auto does not reshard after forward (FSDP2's lazy init)
                    g.post_forward_mesh_info = None if auto and state._is_root else post_forward
                    g.reshard_after_backward = after_backward
            for u, _ in self._pairs:
                u.grad = None
            self._pairs, self._keys = [], {}
            for m in self.modules:
                m.reshard()

    def unsharded(self) -> list:
        """The parameters the closure's forward ran on, unsharded, in KFAC's order (after
        the forward); each is mapped to its sharded parameter for `key`."""
        dtensor = _dtensor_type()
        params = [p for p in self.model.parameters() if p.requires_grad]
        if len(params) != len(self.sharded) or any(
                (isinstance(p, dtensor) or tuple(p.shape) != tuple(s.shape)) if isinstance(s, dtensor) else p is not s
                for p, s in zip(params, self.sharded)):
            raise RuntimeError("kfac_fast.KFAC: the FSDP2 model's parameters after the forward are not the "
                               "unsharded copies of KFAC's parameters (did the closure run the model's forward?)")
        self._pairs = list(zip(params, self.sharded))
        self._keys = {id(p): s for p, s in self._pairs}
        return params

    def key(self, p: torch.Tensor) -> torch.Tensor:
        """The sharded parameter KFAC's state for the unsharded `p` is kept under."""
        return self._keys[id(p)]

    @torch.no_grad()
    def end(self, live: list, update: list) -> None:
        """Add this rank's rows of the step's `update` (the net change of each of the
        unsharded `live` parameters) to its shards; plain parameters already hold it."""
        for u, d in zip(live, update):
            s = self._keys[id(u)]
            rows = self._rows.get(id(s))
            if rows is not None and rows[1]:
                local = s.to_local()
                local.add_(d[rows[0]:rows[0] + rows[1]].to(local.dtype))


def sharded_step(model: nn.Module, params: list, driver: Optional[Any], *, strategy: str,
                 average_decay: Optional[float]) -> Optional[ShardedStep]:
    """A `ShardedStep` for an FSDP2 model (None for any other); NotImplementedError for
    what it does not cover: no data-parallel driver, strategy "memory", average_decay,
    a DTensor parameter not Shard(0) on a 1-D mesh."""
    if not fsdp2_modules(model):
        return None
    if driver is None:
        raise NotImplementedError("kfac_fast.KFAC on an FSDP2 model needs data parallelism over the mesh's ranks "
                                  "(distributed=None or True, torch.distributed initialised)")
    if strategy != "communication":
        raise NotImplementedError("kfac_fast.KFAC on an FSDP2 model supports strategy='communication' only")
    if average_decay is not None:
        raise NotImplementedError("kfac_fast.KFAC on an FSDP2 model does not keep an iterate average "
                                  "(average_decay must be None)")
    names = {id(p): n for n, p in model.named_parameters()}
    return ShardedStep(model, [(names.get(id(p), "?"), p) for p in params])
