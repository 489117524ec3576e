"""Architecture registry: one name per constructor, as the YAML configs name them.

An architecture registers where it is defined (``register_arch`` at the bottom of its definition, as in
``students/networks.py``); importing ``students`` imports every defining module. What the rest of the
code relies on is checked the first time each architecture is built: ``forward_features`` returns
``feature_channels`` channels (partitioning and the students read it), ``forward`` returns the
classes, and the body is a flat ``nn.Sequential`` (model parallelism and HALP cut between its children).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

Builder = Callable[..., nn.Module]  # (in_channels, num_classes, mean, std) -> a FeatureClassifier

ARCHITECTURES: dict[str, Builder] = {}
_CHECKED: set[str] = set()


def register_arch(name: str, builder: Builder) -> None:
    if name in ARCHITECTURES:
        raise ValueError(f"architecture {name!r} is registered twice")
    ARCHITECTURES[name] = builder


def build_model(name: str, in_channels: int, num_classes: int,
                mean: Sequence[float], std: Sequence[float]) -> nn.Module:
    """Build a registered architecture; ``num_classes=0`` leaves out the classifier head."""
    if name not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {name!r}; choose one of: {', '.join(ARCHITECTURES)}")
    if len(mean) != in_channels:
        raise ValueError(f"{name}: {in_channels} input channels but normalisation has {len(mean)}")
    model = ARCHITECTURES[name](in_channels=in_channels, num_classes=num_classes, mean=mean, std=std)
    if name not in _CHECKED:
        _check(name, model, in_channels, num_classes)
        _CHECKED.add(name)
    return model


@torch.no_grad()
def _check(name: str, model: nn.Module, in_channels: int, num_classes: int) -> None:
    if not isinstance(getattr(model, "body", None), nn.Sequential):
        raise TypeError(f"architecture {name!r}: its body must be a flat nn.Sequential of layers")
    was_training = model.training
    x = torch.zeros(1, in_channels, 32, 32)
    fmap, logits = model.eval().forward_features(x), model(x)
    model.train(was_training)
    if fmap.shape[1] != model.feature_channels:
        raise ValueError(f"architecture {name!r}: forward_features gives {fmap.shape[1]} channels, "
                         f"feature_channels says {model.feature_channels}")
    if num_classes and logits.shape[-1] != num_classes:
        raise ValueError(f"architecture {name!r}: {logits.shape[-1]} logits for {num_classes} classes")
