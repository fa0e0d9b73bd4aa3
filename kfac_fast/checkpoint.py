"""Checksummed checkpoint files for a KFACPreconditioner's state.

File layout: a magic line, the sha256 hex digest of the payload, the payload's length,
then the payload (a `torch.save` of {"preconditioner": state_dict, "extra": extra}).
A truncated or altered file is rejected before anything is unpickled, and the payload
is read with `torch.load(..., weights_only=True)`, so a checkpoint cannot run code.
Writes go to a temporary file renamed into place: a crash mid-save leaves the previous
checkpoint intact.
"""
from __future__ import annotations

import hashlib
import io
import os
from typing import Optional

import torch

MAGIC = b"KFAC_FAST_CHECKPOINT v1\n"


class CheckpointError(ValueError):
    """A checkpoint file that is not one, is truncated, or fails its checksum."""


def save_checkpoint(path, precond, *, extra: Optional[dict] = None) -> None:
    """Write `precond.state_dict()` (and `extra`, e.g. model and optimizer state dicts of
    tensors and plain Python values) to `path` with a sha256 checksum."""
    if extra is not None and not isinstance(extra, dict):
        raise TypeError(f"save_checkpoint: extra must be a dict or None, got {type(extra).__name__}")
    buffer = io.BytesIO()
    torch.save({"preconditioner": precond.state_dict(), "extra": extra}, buffer)
    payload = buffer.getvalue()
    digest = hashlib.sha256(payload).hexdigest().encode()
    tmp = f"{os.fspath(path)}.tmp-{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(MAGIC + digest + b"\n" + str(len(payload)).encode() + b"\n" + payload)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_checkpoint(path) -> dict:
    """The verified payload of a checkpoint file: {"preconditioner": ..., "extra": ...}.

    Raises CheckpointError (a ValueError) naming the file when it is not a kfac_fast
    checkpoint, is truncated, or its checksum does not match.
    """
    with open(path, "rb") as f:
        data = f.read()
    if not data.startswith(MAGIC):
        raise CheckpointError(f"{os.fspath(path)!r} is not a kfac_fast checkpoint (bad header)")
    digest, _, rest = data[len(MAGIC):].partition(b"\n")
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
    return torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)


def load_checkpoint(path, precond) -> Optional[dict]:
    """Verify `path` and load its state into `precond`; returns the saved `extra`."""
    content = read_checkpoint(path)
    precond.load_state_dict(content["preconditioner"])
    return content["extra"]
