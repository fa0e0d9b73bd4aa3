"""Checksummed, versioned checkpoint files for a KFACPreconditioner's state.

File layout: a magic line naming the format version (`KFAC_FAST_CHECKPOINT v2`), the
sha256 hex digest of the payload, the payload's length, then the payload (a `torch.save`
of {"format": 2, "preconditioner": state_dict, "extra": extra}). A truncated or altered
file is rejected before anything is unpickled, and the payload is read with
`torch.load(..., weights_only=True)`, so a checkpoint cannot run code. Version 1 files
(kfac_fast before the format field) load; a file of a newer version is refused with its
version named.

What `save_checkpoint` writes, `load_checkpoint` loads: `extra` may hold only what
weights_only loading accepts (tensors, None, bool, int, float, str, bytes, torch.dtype,
torch.device, torch.Size and dicts, lists and tuples of those, e.g. a model's or an
optimizer's state_dict); anything else (a numpy array such as
`np.random.get_state()`'s, an arbitrary object) is refused at save time with its place
named, never discovered at resume time. Convert it first (`torch.as_tensor(a)`,
`a.tolist()`; `torch.get_rng_state()` is a tensor).

Writes go to a temporary file unique to the process, thread and call, renamed into
place: a crash mid-save leaves the previous checkpoint intact, and concurrent saves (any
thread, any process) never share a temporary file; the last rename wins.

Data-parallel: saving is not a collective (`precond.state_dict()` is this rank's view);
for an exact resume pass the collective `precond.synced_state_dict()` instead (every rank
calls it, one rank saves), see docs/distributed.md.
"""
from __future__ import annotations

import collections
import hashlib
import io
import os
import re
import threading
import uuid
from typing import Any, Optional

import torch

FORMAT_VERSION = 2
MAGIC = b"KFAC_FAST_CHECKPOINT v2\n"
_MAGIC_ANY = re.compile(rb"KFAC_FAST_CHECKPOINT v(\d+)\n")
_LEAVES = (type(None), bool, int, float, str, bytes, torch.dtype, torch.device, torch.Size)


class CheckpointError(ValueError):
    """A checkpoint file that is not one, is truncated, fails its checksum, or has a
    format version this kfac_fast cannot read."""


def _check_saveable(value: Any, where: str) -> None:
    """TypeError naming the first value weights_only loading would refuse."""
    if isinstance(value, torch.Tensor):
        if type(value) not in (torch.Tensor, torch.nn.Parameter):
            raise TypeError(f"save_checkpoint: {where} is a {type(value).__name__} (a tensor subclass), which "
                            "a weights_only load refuses; store a plain tensor (t.detach().clone())")
        return
    if type(value) in _LEAVES:  # exact types: numpy.float64 is a float subclass weights_only refuses
        return
    if type(value) in (dict, collections.OrderedDict):
        for k, v in value.items():
            if type(k) not in (str, int, float, bool, type(None), tuple):
                raise TypeError(f"save_checkpoint: {where} has a key of type {type(k).__name__}, "
                                "which a weights_only load refuses")
            _check_saveable(v, f"{where}[{k!r}]")
        return
    if type(value) in (list, tuple):
        for i, v in enumerate(value):
            _check_saveable(v, f"{where}[{i}]")
        return
    kind = f"{type(value).__module__}.{type(value).__qualname__}"
    raise TypeError(f"save_checkpoint: {where} is a {kind}, which load_checkpoint could not read back "
                    "(checkpoints load with torch.load(weights_only=True)); convert it to tensors or plain "
                    "Python values first (e.g. torch.as_tensor(array) or array.tolist())")


def _state_of(precond: Any) -> dict:
    if isinstance(precond, dict):
        if not isinstance(precond.get("layers"), dict) or "steps" not in precond:
            raise TypeError("save_checkpoint: precond must be a KFACPreconditioner or a dict from its "
                            "state_dict() / synced_state_dict()")
        return precond
    if not callable(getattr(precond, "state_dict", None)):
        raise TypeError(f"save_checkpoint: precond must be a KFACPreconditioner or its state dict, "
                        f"got {type(precond).__name__}")
    return precond.state_dict()


def save_checkpoint(path: Any, precond: Any, *, extra: Optional[dict] = None) -> None:
    """Write the preconditioner's state (and `extra`, e.g. model and optimizer state dicts)
    to `path` with a sha256 checksum and the format version.

    precond: a KFACPreconditioner (its `state_dict()`, never a collective), or a state
    dict (e.g. the collective `synced_state_dict()` of a data-parallel run).
    Raises TypeError naming what `extra` holds that `load_checkpoint` could not load.
    """
    if extra is not None and not isinstance(extra, dict):
        raise TypeError(f"save_checkpoint: extra must be a dict or None, got {type(extra).__name__}")
    if extra is not None:
        _check_saveable(extra, "extra")
    content = {"format": FORMAT_VERSION, "preconditioner": _state_of(precond), "extra": extra}
    buffer = io.BytesIO()
    torch.save(content, buffer)
    payload = buffer.getvalue()
    try:  # the promise itself: what is written here loads (cheap next to the write)
        torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise TypeError(f"save_checkpoint: the state or extra would not load back with weights_only=True: "
                        f"{exc}") from None
    digest = hashlib.sha256(payload).hexdigest().encode()
    target = os.fspath(path)
    tmp = f"{target}.tmp-{os.getpid()}-{threading.get_ident()}-{uuid.uuid4().hex[:12]}"
    try:
        with open(tmp, "wb") as f:
            f.write(MAGIC + digest + b"\n" + str(len(payload)).encode() + b"\n" + payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def read_checkpoint(path: Any) -> dict:
    """The verified payload of a checkpoint file: {"format", "preconditioner", "extra"}.

    Raises CheckpointError (a ValueError) naming the file when it is not a kfac_fast
    checkpoint, is truncated, fails its checksum, or has a format version other than
    1 or 2 (the version is named).
    """
    with open(path, "rb") as f:
        data = f.read()
    header = _MAGIC_ANY.match(data)
    if header is None:
        raise CheckpointError(f"{os.fspath(path)!r} is not a kfac_fast checkpoint (bad header)")
    version = int(header.group(1))
    if version not in (1, FORMAT_VERSION):
        raise CheckpointError(f"{os.fspath(path)!r} is a kfac_fast checkpoint of format version {version}; "
                              f"this kfac_fast reads versions 1 and {FORMAT_VERSION} (a newer kfac_fast wrote it)")
    digest, _, rest = data[header.end():].partition(b"\n")
    length, _, payload = rest.partition(b"\n")
    try:
        expected = int(length)
    except ValueError:
        raise CheckpointError(f"{os.fspath(path)!r}: damaged header (length {length[:32]!r})") from None
    if len(payload) != expected:
        raise CheckpointError(f"{os.fspath(path)!r} is truncated or padded: payload has {len(payload)} "
                              f"bytes, the header says {expected}")
    if hashlib.sha256(payload).hexdigest().encode() != digest:
        raise CheckpointError(f"{os.fspath(path)!r} fails its sha256 checksum (corrupted or modified)")
    content = torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)
    if not isinstance(content, dict) or "preconditioner" not in content:
        raise CheckpointError(f"{os.fspath(path)!r}: the payload is not a kfac_fast checkpoint's")
    if content.get("format", 1) != version:
        raise CheckpointError(f"{os.fspath(path)!r}: header says format {version}, payload says "
                              f"{content.get('format')!r}")
    content.setdefault("format", 1)
    return content


def load_checkpoint(path: Any, precond: Any) -> Optional[dict]:
    """Verify `path` and load its state into `precond`; returns the saved `extra`.

    The state is checked before anything changes (`KFACPreconditioner.load_state_dict`):
    a mismatch is a ValueError / TypeError naming the layer, and `precond` is untouched.
    """
    content = read_checkpoint(path)
    precond.load_state_dict(content["preconditioner"])
    return content["extra"]
