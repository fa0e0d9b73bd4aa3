"""`WeightsOnlyLoadPlanner`: a torch.distributed.checkpoint load planner for checkpoints
holding `KFACState` (kfac_fast.distributed.dcp), built on first use (importing
torch.distributed.checkpoint costs about 0.6 s, which `import kfac_fast` does not pay).

- Trust: DCP writes every non-tensor value with torch.save and its DefaultLoadPlanner reads
  them back with `torch.load(weights_only=False)`, so a crafted checkpoint runs code inside
  `dcp.load`. This planner reads them with weights_only=True: a value it refuses is a
  ValueError naming its key.
- kfac_fast's messages: before DCP plans the reads, each KFACState in the state dict is
  checked against the checkpoint's metadata (which layers, which tensors, their shapes), so
  a checkpoint of another method, of a KFACPreconditioner loaded into a KFAC, without a layer
  of the model, or of a resized layer is a ValueError saying so, instead of DCP's
  "Missing key in checkpoint state_dict" / "Size mismatch".

Both errors come out of `dcp.load` inside DCP's CheckpointException (a BaseException) on
every rank when a process group runs (DCP gathers the ranks' failures).
"""
from __future__ import annotations

import functools
import io
from typing import Any

import torch

_META = ".preconditioner.meta"


def _method_of(tensors: set) -> str:
    """The method whose state tensors these are (of a layer; factors alone: 'eigen')."""
    if tensors & {"a_inv", "g_inv"}:
        return "inverse"
    return "ekfac" if "scales" in tensors else "eigen"


def _layers(keys: Any, prefix: str) -> dict:
    out: dict = {}
    for key in keys:
        if key.startswith(prefix):
            name, tensor = key[len(prefix):].rsplit(".", 1)
            out.setdefault(name, {})[tensor] = key
    return out


def check_kfac_template(template: dict, saved: dict) -> None:
    """Raise ValueError (kfac_fast's words) where a KFACState in the flattened `template`
    (DCP key -> value) asks for what the checkpoint's `saved` (key -> storage metadata)
    lacks or holds at another shape."""
    for meta_key in [k for k in template if isinstance(k, str) and k.endswith(_META)]:
        root = meta_key[:-len(_META)]
        if meta_key not in saved:
            raise ValueError(f"KFACState: the checkpoint holds no K-FAC state under {root!r} (no {meta_key!r})")
        if f"{root}.optimizer" in template and f"{root}.optimizer" not in saved:
            raise ValueError("KFACState: the checkpoint holds a KFACPreconditioner's state, not a KFAC's "
                             f"(no {root + '.optimizer'!r} entry)")
        prefix = f"{root}.preconditioner.layers."
        want, have = _layers(template, prefix), _layers(saved, prefix)
        missing = sorted(set(want) - set(have))
        if missing:
            raise ValueError(f"KFACState: model layers missing from the checkpoint: {missing}")
        saved_method = _method_of({t for tensors in have.values() for t in tensors})
        for name, tensors in want.items():
            absent = set(tensors) - set(have[name])
            if absent:
                raise ValueError(f"KFACState: the checkpoint was saved with method={saved_method!r}, this "
                                 f"preconditioner has method={_method_of(absent)!r} (layer {name!r} has no "
                                 f"{sorted(absent)} there)")
            for t, key in tensors.items():
                size, need = tuple(getattr(saved[key], "size", ())), tuple(template[key].shape)
                if size != need:
                    raise ValueError(f"KFACState: layer {name!r}: {t} has shape {size} in the checkpoint, this "
                                     f"model's layer needs {need} (a layer whose size differs)")


@functools.cache
def _weights_only_planner() -> type:
    from torch.distributed.checkpoint import DefaultLoadPlanner
    from torch.distributed.checkpoint._traverse import set_element

    class WeightsOnlyLoadPlanner(DefaultLoadPlanner):
        """DCP's DefaultLoadPlanner, except that every non-tensor value of the checkpoint
        (DCP writes them with torch.save) is read back with `torch.load(weights_only=True)`
        instead of DCP's `weights_only=False`, so a crafted checkpoint cannot run code during
        `dcp.load`: `dcp.load(state, checkpoint_id=path, planner=WeightsOnlyLoadPlanner())`.
        A value weights_only refuses is a ValueError naming its key; a KFACState the
        checkpoint cannot fill is a ValueError in kfac_fast's words (module docstring)."""

        def create_local_plan(self) -> Any:
            if self.flatten_state_dict and self.metadata is not None:
                check_kfac_template(self.state_dict, self.metadata.state_dict_metadata)
            return super().create_local_plan()

        def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
            fqn = read_item.dest_index.fqn
            try:
                obj = torch.load(value, map_location="cpu", weights_only=True)
            except Exception as exc:
                why = [line.strip() for line in str(exc).splitlines() if "WeightsUnpickler error" in line]
                raise ValueError(f"WeightsOnlyLoadPlanner: the checkpoint's value {fqn!r} does not load with "
                                 f"weights_only=True ({why[0] if why else f'{type(exc).__name__}: {exc}'})") from None
            if self.flatten_state_dict:
                set_element(self.original_state_dict, self.mappings[fqn], obj)
            else:
                self.state_dict[fqn] = obj

    WeightsOnlyLoadPlanner.__module__, WeightsOnlyLoadPlanner.__qualname__ = __name__, "WeightsOnlyLoadPlanner"
    return WeightsOnlyLoadPlanner
