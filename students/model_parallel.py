"""Model-parallel baseline: the teacher split layer by layer across K devices.

Each cut sends a whole intermediate feature map to the next device; NoNN's devices send only their
pooled |P_i|-vectors. Cuts are placed to balance MACs between devices. ``bundle.export.export_chain``
turns the segments into a chain bundle that the evaluate stage and ``nonn deploy`` run for real.
"""
from __future__ import annotations

import torch
from torch import nn

from students.complexity import count_macs
from students.networks import FeatureClassifier


class ChainSegment(nn.Module):
    """One device's share of a layer-wise split: [normalise] -> body layers -> [pool -> linear head]."""

    def __init__(self, model: FeatureClassifier, start: int, stop: int, first: bool, last: bool) -> None:
        super().__init__()
        self.layer_span = f"{start}-{stop - 1}"  # which body layers, for the manifest and the report
        self.normalize = model.normalize if first else nn.Identity()
        self.layers = nn.Sequential(*list(model.body.children())[start:stop])
        self.fc = model.fc if last else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layers(self.normalize(x))
        return x if self.fc is None else self.fc(x.mean(dim=(2, 3)))


def _layer_macs(model: FeatureClassifier, image_shape: tuple[int, int, int]) -> list[int]:
    """MACs of every body layer for one image."""
    macs = []
    x = torch.zeros(1, *image_shape)
    with torch.no_grad():
        x = model.eval().normalize(x)
        for layer in model.body.children():
            macs.append(count_macs(layer, x.shape[1:]))
            x = layer(x)
    return macs


def _bounds(num_devices: int, macs: list[int]) -> list[tuple[int, int]]:
    layers = len(macs)
    if not 1 <= num_devices <= layers:
        raise ValueError(f"cannot split {layers} layers across {num_devices} devices")
    cuts = _balanced_cuts(macs, num_devices)
    return list(zip([0, *cuts], [*cuts, layers]))


def split_modules(model: FeatureClassifier, num_devices: int,
                  image_shape: tuple[int, int, int]) -> list[ChainSegment]:
    """The device modules of the MAC-balanced split, in chain order (sharing the model's weights)."""
    macs = _layer_macs(model, image_shape)
    bounds = _bounds(num_devices, macs)
    return [ChainSegment(model, a, b, d == 0, d == num_devices - 1) for d, (a, b) in enumerate(bounds)]


def _balanced_cuts(macs: list[int], parts: int) -> list[int]:
    """Layer indices where device d+1 starts, placing each cut nearest to an equal share of MACs."""
    total = sum(macs)
    prefix = torch.tensor(macs, dtype=torch.float64).cumsum(0)
    cuts: list[int] = []
    for d in range(1, parts):
        target = total * d / parts
        lo = (cuts[-1] + 1) if cuts else 1
        hi = len(macs) - (parts - d)
        best = min(range(lo, hi + 1), key=lambda i: abs(float(prefix[i - 1]) - target))
        cuts.append(best)
    return cuts
