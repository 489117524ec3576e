"""Loading our Lightning checkpoints safely (``weights_only=True``) into freshly built models."""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn


class CheckpointError(ValueError):
    """A checkpoint is missing, corrupt, or does not fit the model the config describes."""


def load_weights(model: nn.Module, path: Path, prefix: str, what: str) -> None:
    """Load the ``prefix``-ed entries of a Lightning checkpoint's state_dict into ``model`` (strict)."""
    if not path.is_file():
        raise CheckpointError(f"{path}: {what} checkpoint not found; run the stage that trains it first")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        state = ckpt["state_dict"]
    except Exception as e:  # noqa: BLE001 - any unpickling/zip error means the file is unusable
        raise CheckpointError(f"{path}: corrupt or unreadable {what} checkpoint ({type(e).__name__}: {e}); "
                              "delete it and rerun the stage with --force") from e
    weights = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    try:
        model.load_state_dict(weights, strict=True)
    except RuntimeError as e:
        first = str(e).strip().splitlines()
        raise CheckpointError(f"{path}: {what} checkpoint does not match the architecture in the config "
                              f"({first[0] if first else e}); fix the config or retrain with --force") from e
