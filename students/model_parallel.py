"""Model-parallel baseline: the teacher split layer by layer across K devices.

Each cut sends a whole intermediate feature map to the next device; NoNN's devices send only their
pooled |P_i|-vectors. Cuts are placed to balance MACs between devices.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from students.complexity import count_macs, count_params, weight_bytes
from students.networks import FeatureClassifier


@dataclass
class Segment:
    layers: str          # which body layers this device runs, e.g. "0-4"
    params: int
    weight_bytes: int
    macs: int
    bytes_sent: int      # fp32 bytes of this device's output per image (logits for the last one)


class ChainSegment(nn.Module):
    """One device's share of a layer-wise split: [normalise] -> body layers -> [pool -> linear head]."""

    def __init__(self, model: FeatureClassifier, start: int, stop: int, first: bool, last: bool) -> None:
        super().__init__()
        self.normalize = model.normalize if first else nn.Identity()
        self.layers = nn.Sequential(*list(model.body.children())[start:stop])
        self.fc = model.fc if last else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layers(self.normalize(x))
        return x if self.fc is None else self.fc(x.mean(dim=(2, 3)))


def _profile(model: FeatureClassifier, image_shape: tuple[int, int, int]) -> tuple[list[int], list[torch.Size]]:
    """MACs and output shape of every body layer for one image."""
    shapes, macs = [], []
    x = torch.zeros(1, *image_shape)
    with torch.no_grad():
        x = model.eval().normalize(x)
        for layer in model.body.children():
            macs.append(count_macs(layer, x.shape[1:]))
            x = layer(x)
            shapes.append(x.shape[1:])
    return macs, shapes


def _bounds(model: FeatureClassifier, num_devices: int, macs: list[int]) -> list[tuple[int, int]]:
    layers = len(macs)
    if not 1 <= num_devices <= layers:
        raise ValueError(f"cannot split {layers} layers across {num_devices} devices")
    cuts = _balanced_cuts(macs, num_devices)
    return list(zip([0, *cuts], [*cuts, layers]))


def split_modules(model: FeatureClassifier, num_devices: int,
                  image_shape: tuple[int, int, int]) -> list[ChainSegment]:
    """The device modules of the MAC-balanced split, in chain order (sharing the model's weights)."""
    macs, _ = _profile(model, image_shape)
    bounds = _bounds(model, num_devices, macs)
    return [ChainSegment(model, a, b, d == 0, d == num_devices - 1) for d, (a, b) in enumerate(bounds)]


def split_layerwise(model: FeatureClassifier, num_devices: int, image_shape: tuple[int, int, int]) -> list[Segment]:
    """Size, MACs and bytes sent of each device of the MAC-balanced split (the analytic MP baseline)."""
    layers = list(model.body.children())
    macs, shapes = _profile(model, image_shape)
    head_macs = count_macs(model.fc, (model.feature_channels,)) if model.num_classes else 0
    segments = []
    for d, (start, stop) in enumerate(_bounds(model, num_devices, macs)):
        last = d == num_devices - 1
        mods = layers[start:stop] + ([model.fc] if last else [])
        sent = model.num_classes * 4 if last else int(torch.Size(shapes[stop - 1]).numel()) * 4
        segments.append(Segment(f"{start}-{stop - 1}", sum(count_params(m) for m in mods),
                                sum(weight_bytes(m) for m in mods), sum(macs[start:stop]) + (head_macs if last else 0),
                                sent))
    return segments


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
