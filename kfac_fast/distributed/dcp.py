"""K-FAC state in `torch.distributed.checkpoint` (DCP) checkpoints, next to FSDP2's.

`KFACState(precond)` (a KFACPreconditioner, or a `kfac_fast.KFAC`) is a DCP `Stateful`:

    dcp.save({"model": model_sd, "optim": optim_sd, "kfac": KFACState(precond)}, checkpoint_id=path)
    dcp.load({"model": model_sd, "optim": optim_sd, "kfac": KFACState(precond)}, checkpoint_id=path)

on every rank (both are collectives: `state_dict()` averages or gathers as below).

Layout: one tensor per (layer, state tensor), key `<key>.layers.<layer name>.<tensor>`
(e.g. `kfac.layers.fc1.qa`), for every tensor the method holds (`EXPECTED`: the factors,
plus qa/da/qg/dg for "eigen", a_inv/g_inv for "inverse", and scales for "ekfac"); one not
held yet (before the first factor update or refresh) is written as zeros of its shape and
marked absent. Everything else (step count, counts, kinds, health counters and
refresh_stats of every rank, curvature extensions' state, the world size and strategy) is
one `bytes` value, `<key>.meta` (a `torch.save` of CPU copies, read back with weights_only=True).

Trust: DCP itself torch.save's every non-tensor value and its DefaultLoadPlanner reads them
back with `torch.load(weights_only=False)`, so a crafted checkpoint runs code inside
`dcp.load`, before any check of ours. Pass `planner=WeightsOnlyLoadPlanner()` to `dcp.load`
(it reads every such value with weights_only=True); without it, load trusted checkpoints only. The
key set depends on the model and method only, never on the world size, so a checkpoint
loads on any number of ranks and under either strategy (the owners are re-derived).

- single process, or strategy "communication": the state is the collective
  `synced_state_dict()`, the same on every rank; every rank lists every tensor and DCP's
  dedup writes each once (spread over the ranks).
- strategy "memory": no gather. Factors are first made global where they are not
  (`before_owned_state_dict`: averaged under factor_sync="inverse" without FSDP2); each
  rank lists the decompositions of the layers it owns (`owners()`: deterministic from the
  layers' sizes and the world size), and the factors of those layers on FSDP2 (where only
  owners hold them) or of every layer otherwise (identical after the averaging; dedup).
  On load each rank reads the keys it would write. DCP's default load planner does not
  coordinate the ranks' requests (`create_default_global_load_plan` keeps each rank's
  plan), so ranks may read different keys; every key read must exist in the checkpoint.

Loading rebuilds a `state_dict()` and hands it to `load_state_dict` (KFACPreconditioner's,
or KFAC's): its checks apply (layers, kinds, shapes, finiteness; a ValueError naming the
layer), so this is a mapping of that format (`kfac_fast.checkpoint.FORMAT_VERSION`), not a
second one. What DCP itself must read is checked earlier: with `WeightsOnlyLoadPlanner`
(kfac_fast.distributed.dcp_planner), a checkpoint of another method, a KFACPreconditioner's
checkpoint loaded into a KFAC, a model layer absent from the checkpoint or a resized layer
is a ValueError saying so, raised while DCP plans the reads (inside DCP's
CheckpointException, on every rank); with DCP's default planner these surface as DCP's
"Missing key in checkpoint state_dict" / "Size mismatch" instead. Each rank gets back its own health counters and
refresh_stats when the world size is the saved one, rank 0's otherwise (as a file
checkpoint loaded on every rank). Data-parallel, each rank's load (which reads only its
share under "memory") is followed by one small agreement: a failure on one rank (e.g. a
non-finite tensor only its owner reads) is a RuntimeError on every rank ("... failed on
rank(s) [r]"), not one rank running on alone. For `kfac_fast.KFAC`, its torch optimizer
state and MC seed are one more `bytes` value (`<key>.optimizer`, CPU copies: torch.save
bytes name each tensor's device; torch's load_state_dict moves them to the parameters'),
checked to be the same on every rank at save time (KFAC's state holds whole, replicated
tensors, under FSDP2 too: it steps on the unsharded parameters).
"""
from __future__ import annotations

import hashlib
import io
from typing import Any

import torch

from ..checkpoint import FORMAT_VERSION, _check_saveable
from ..layers.base import METHODS
from ..preconditioner.state import StateMixin, _expected_shapes
from .checkpoint_sync import result_names
from .collectives import _dist
from .dcp_planner import _weights_only_planner

LAYOUT = "kfac_fast.distributed.dcp v1"
FACTORS = ("a_factor", "g_factor")
RESULTS = {m: result_names(m) for m in METHODS}
EXPECTED = {m: FACTORS + r + (("scales",) if m == "ekfac" else ()) for m, r in RESULTS.items()}


def _wanted(precond: Any, name: str, t: str) -> bool:
    """Whether this rank writes (and reads) tensor `t` of layer `name`."""
    d = precond.distributed
    if d is None or d.strategy != "memory":
        return True
    if t in FACTORS and d.sharded_memory is None:
        return True
    return d.owners()[(name, "a")] == d.rank


def _host(obj: Any) -> Any:
    """`obj` with every tensor replaced by a CPU copy (a fresh storage even for a CPU tensor):
    torch.save bytes name each storage's device, so what is hashed or gathered across ranks
    must not hold cuda:<rank> tensors (and a blob written from CPU copies loads anywhere)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: _host(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        items = [_host(v) for v in obj]
        return type(obj)(*items) if hasattr(obj, "_fields") else type(obj)(items)
    return obj


def _to_bytes(obj: Any) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def _from_bytes(value: Any, what: str) -> Any:
    if not isinstance(value, (bytes, bytearray)):
        raise ValueError(f"KFACState: the checkpoint's {what} is a {type(value).__name__}, not the bytes "
                         "kfac_fast.distributed.dcp writes (not a kfac_fast DCP checkpoint?)")
    try:
        return torch.load(io.BytesIO(bytes(value)), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ValueError(f"KFACState: the checkpoint's {what} does not load ({exc})") from None


def _gather(precond: Any, obj: Any, what: str) -> list:
    """Every rank's `obj` (a host-side all_gather_object on the driver's gloo-capable group)."""
    d = precond.distributed
    if d is None:
        return [obj]
    out: list = [None] * d.world_size
    with d._collective(what):
        _dist().all_gather_object(out, _host(obj), group=d.meta_group)
    return out


def precond_state(precond: Any) -> dict:
    """The DCP view of a KFACPreconditioner (module docstring); a collective when it runs
    data-parallel."""
    d = precond.distributed
    if d is None or d.strategy != "memory":
        state = precond.synced_state_dict()
    else:
        d.before_owned_state_dict()
        state = precond.state_dict()
    method = state["method"]
    if method not in EXPECTED:
        raise ValueError(f"KFACState: method {method!r} has no DCP layout (one of {sorted(EXPECTED)})")
    tensors: dict = {}
    layers: dict = {}
    for name, layer in precond.layers.items():
        entry = state["layers"][name]
        extra = [t for t, v in entry.items() if isinstance(v, torch.Tensor) and t not in EXPECTED[method]]
        if extra:
            raise ValueError(f"KFACState: layer {name!r} holds {extra}, which method {method!r} does not "
                             "(no DCP key for them)")
        mine = {t for t in EXPECTED[method] if _wanted(precond, name, t)}
        device = layer.module.weight.device
        tensors[name] = {t: entry[t] if entry.get(t) is not None
                         else torch.zeros(_expected_shapes(layer)[t], dtype=precond.factor_dtype, device=device)
                         for t in EXPECTED[method] if t in mine}
        layers[name] = {"present": sorted(t for t in mine if entry.get(t) is not None),
                        **{c: entry[c] for c in StateMixin._COUNTS if c in entry},
                        "kind": entry["kind"], "has_bias": entry["has_bias"]}
    mine_only = {k: v for k, v in state.items() if k not in ("steps", "method", "layers", "distributed")}
    ranks = _gather(precond, {"layers": layers, **mine_only}, "the DCP checkpoint's metadata gather")
    merged = {}
    for name in precond.layers:  # each layer's entry from the rank that writes its decomposition
        writer = 0 if d is None or d.strategy != "memory" else d.owners()[(name, "a")]
        merged[name] = ranks[writer]["layers"][name]
    meta = {"layout": LAYOUT, "format": FORMAT_VERSION, "steps": state["steps"], "method": method,
            "world_size": 1 if d is None else d.world_size, "strategy": None if d is None else d.strategy,
            "layers": merged, "ranks": [{k: v for k, v in r.items() if k != "layers"} for r in ranks]}
    return {"meta": _to_bytes(meta), "layers": tensors}


def load_precond_state(precond: Any, view: dict) -> tuple[dict, set]:
    """(the state dict to load, the ready set) from a DCP view `precond_state` filled by
    `dcp.load`; raises ValueError for a checkpoint of another layout."""
    meta = _from_bytes(view.get("meta"), "meta")
    if not isinstance(meta, dict) or meta.get("layout") != LAYOUT:
        found = meta.get("layout") if isinstance(meta, dict) else type(meta).__name__
        raise ValueError(f"KFACState: the checkpoint's layout is {found!r}, this kfac_fast reads {LAYOUT!r}")
    if meta.get("format") != FORMAT_VERSION:
        raise ValueError(f"KFACState: the checkpoint's state format is {meta.get('format')!r}, this kfac_fast "
                         f"reads {FORMAT_VERSION}")
    d = precond.distributed
    rank, world = (0, 1) if d is None else (d.rank, d.world_size)
    per_rank = meta["ranks"][rank if world == meta["world_size"] else 0]
    layers, ready = {}, set()
    for name, entry in meta["layers"].items():
        present = set(entry["present"])
        got = view["layers"].get(name, {})
        layers[name] = {**{k: v for k, v in entry.items() if k != "present"},
                        **{t: got[t] for t in present if t in got and _wanted(precond, name, t)}}
        if all(t in present for t in RESULTS.get(meta["method"], ())):
            ready.add(name)
    return {"steps": meta["steps"], "method": meta["method"], "layers": layers, **per_rank}, ready


def __getattr__(name: str) -> Any:
    """`WeightsOnlyLoadPlanner`, built on first use (importing torch.distributed.checkpoint
    costs about 0.6 s, which `import kfac_fast` does not pay)."""
    if name == "WeightsOnlyLoadPlanner":
        return _weights_only_planner()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class KFACState:
    """A `torch.distributed.checkpoint.stateful.Stateful` for a KFACPreconditioner or a
    `kfac_fast.KFAC` (module docstring). `state_dict()` is a collective: call dcp.save /
    dcp.load on every rank."""

    def __init__(self, obj: Any) -> None:
        from ..optimizer import KFAC
        from ..preconditioner import KFACPreconditioner
        if isinstance(obj, KFAC):
            self.precond, self.optimizer = obj.preconditioner, obj
        elif isinstance(obj, KFACPreconditioner):
            self.precond, self.optimizer = obj, None
        else:
            raise TypeError(f"KFACState: obj must be a KFACPreconditioner or a kfac_fast.KFAC, "
                            f"got {type(obj).__name__}")

    def state_dict(self) -> dict:
        out = {"preconditioner": precond_state(self.precond)}
        if self.optimizer is not None:
            torch_state = torch.optim.Optimizer.state_dict(self.optimizer)
            try:
                _check_saveable(torch_state, "KFAC's optimizer state")
            except TypeError as exc:
                raise TypeError(f"KFACState: {exc}") from None
            blob = _to_bytes(_host({"optimizer": torch_state, "mc_seed": self.optimizer.mc_seed}))
            digests = _gather(self.precond, hashlib.sha256(blob).hexdigest(), "the DCP optimizer-state check")
            if len(set(digests)) > 1:
                raise ValueError("KFACState: KFAC's torch optimizer state differs across ranks "
                                 f"(sha256 per rank: {[h[:12] for h in digests]}); it is saved once, so it "
                                 "must be replicated")
            out["optimizer"] = blob
        return out

    def load_state_dict(self, state_dict: dict) -> None:
        if not isinstance(state_dict, dict) or "preconditioner" not in state_dict:
            raise ValueError("KFACState.load_state_dict: state_dict must be KFACState.state_dict()'s")
        d = self.precond.distributed
        if d is None:
            self._load(state_dict)
        else:  # a rank's failure (e.g. a damaged tensor only its owner reads) raises on every rank
            ready = d._local_work("the DCP load of K-FAC's state", lambda: self._load(state_dict))
            d.after_owned_load(ready)

    def _load(self, state_dict: dict) -> set:
        state, ready = load_precond_state(self.precond, state_dict["preconditioner"])
        if self.optimizer is None:
            self.precond.load_state_dict(state)
        else:
            if "optimizer" not in state_dict:
                raise ValueError("KFACState: the checkpoint holds a KFACPreconditioner's state, not a KFAC's "
                                 "(no 'optimizer' entry)")
            saved = _from_bytes(state_dict["optimizer"], "optimizer state")
            self.optimizer.load_state_dict({**saved["optimizer"], "preconditioner": state,
                                            "mc_seed": saved["mc_seed"]})
        return ready
