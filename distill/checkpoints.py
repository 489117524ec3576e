"""Loading our Lightning checkpoints safely (``weights_only=True``) into freshly built models."""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn


class CheckpointError(ValueError):
    """A checkpoint is missing, corrupt, or does not fit the model the config describes."""


def _read(path: Path, what: str) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling/zip error means the file is unusable
        first = (str(e).strip().splitlines() or [""])[0][:160]  # torch's messages run to many lines
        raise CheckpointError(f"{path}: corrupt or unreadable {what} checkpoint ({type(e).__name__}: {first}); "
                              "delete it and rerun the stage with --force") from e


def checkpoint_epoch(path: Path, what: str) -> int:
    """The last finished epoch recorded in a Lightning checkpoint (to resume after it)."""
    ckpt = _read(path, what)
    if "epoch" not in ckpt:
        raise CheckpointError(f"{path}: {what} checkpoint has no epoch; delete it and rerun the stage with --force")
    return int(ckpt["epoch"])


def load_weights(model: nn.Module, path: Path, prefix: str, what: str) -> None:
    """Load the ``prefix``-ed entries of a Lightning checkpoint's state_dict into ``model`` (strict)."""
    if not path.is_file():
        raise CheckpointError(f"{path}: {what} checkpoint not found; run the stage that trains it first")
    ckpt = _read(path, what)
    if "state_dict" not in ckpt:
        raise CheckpointError(f"{path}: not a {what} checkpoint (no state_dict); point the config at a best.ckpt")
    state = ckpt["state_dict"]
    weights = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    try:
        model.load_state_dict(weights, strict=True)
    except RuntimeError as e:
        first = str(e).strip().splitlines()
        raise CheckpointError(f"{path}: {what} checkpoint does not match the architecture in the config "
                              f"({first[0] if first else e}); fix the config or retrain with --force") from e


def checkpoint_entry(path: Path, key: str, what: str):
    """One top-level entry of one of our checkpoints (None when it has none)."""
    return _read(path, what).get(key)
