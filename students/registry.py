"""Architecture registry: one name per constructor, as the YAML configs name them."""
from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial

from students.networks import FeatureClassifier, cifar_resnet, mobilenet_v2, wide_resnet

Builder = Callable[..., FeatureClassifier]

ARCHITECTURES: dict[str, Builder] = {
    **{f"wrn_{d}_{k}": partial(wide_resnet, d, k)
       for d, k in ((10, 1), (16, 1), (16, 2), (16, 4), (16, 8), (28, 4), (28, 10), (40, 2), (40, 4))},
    "resnet20": partial(cifar_resnet, 20),
    "resnet56": partial(cifar_resnet, 56),
    "mobilenetv2": partial(mobilenet_v2, 1.0),
    "mobilenetv2_x0.5": partial(mobilenet_v2, 0.5),
    "mobilenetv2_x0.25": partial(mobilenet_v2, 0.25),
}


def build_model(name: str, in_channels: int, num_classes: int,
                mean: Sequence[float], std: Sequence[float]) -> FeatureClassifier:
    """Build a registered architecture; ``num_classes=0`` leaves out the classifier head."""
    if name not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {name!r}; choose one of: {', '.join(ARCHITECTURES)}")
    if len(mean) != in_channels:
        raise ValueError(f"{name}: {in_channels} input channels but normalisation has {len(mean)}")
    return ARCHITECTURES[name](in_channels=in_channels, num_classes=num_classes, mean=mean, std=std)
