"""Per-image, per-filter activations of the teacher's final feature map (DESIGN.md section 1, step 2).

Only the spatially pooled [N, F] matrix is kept: the full maps of a validation split would not fit
in memory for a large teacher, and the filter graph needs nothing else.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from tqdm.auto import tqdm

from students.networks import FeatureClassifier

POOLINGS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "mean": lambda maps: maps.mean(dim=(2, 3)),
    "max": lambda maps: maps.amax(dim=(2, 3)),
}


def collect_activations(model: FeatureClassifier, batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
                        pooling: str = "mean", max_images: int | None = None,
                        progress: bool = True) -> torch.Tensor:
    """Pooled, non-negative activations a_i(n) as a float32 [N, F] tensor on the CPU.

    The model runs in eval mode (BatchNorm statistics must not move) and gets its training flag
    back afterwards, so this can be called in the middle of a pipeline.
    """
    if pooling not in POOLINGS:
        raise ValueError(f"unknown pooling {pooling!r}; choose one of: {', '.join(POOLINGS)}")
    if max_images is not None and max_images < 1:
        raise ValueError(f"max_images must be a positive integer or None, got {max_images!r}")
    pool = POOLINGS[pooling]
    device = next(model.parameters()).device
    total = len(batches) if hasattr(batches, "__len__") else None
    rows: list[torch.Tensor] = []
    seen = 0
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for images, _ in tqdm(batches, total=total, desc="activations", disable=not progress):
                if max_images is not None:
                    images = images[:max_images - seen]
                maps = model.forward_features(images.to(device))
                rows.append(pool(maps).clamp_min(0).float().cpu())
                seen += len(images)
                if max_images is not None and seen >= max_images:
                    break  # before the loader produces a batch nobody needs
    finally:
        model.train(was_training)
    if not rows:
        return torch.zeros(0, model.feature_channels)
    return torch.cat(rows)  # outside inference mode: an ordinary tensor callers may modify
