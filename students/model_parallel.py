"""Model-parallel baseline: the teacher split layer by layer across K devices.

Each cut sends a whole intermediate feature map to the next device; NoNN's devices send only their
pooled |P_i|-vectors. Cuts are placed to balance MACs between devices.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from students.complexity import count_macs, count_params, weight_bytes
from students.networks import FeatureClassifier


@dataclass
class Segment:
    layers: str          # which body layers this device runs, e.g. "0-4"
    params: int
    weight_bytes: int
    macs: int
    bytes_sent: int      # fp32 bytes of this device's output per image (logits for the last one)


def split_layerwise(model: FeatureClassifier, num_devices: int, image_shape: tuple[int, int, int]) -> list[Segment]:
    layers = list(model.body.children())
    if not 1 <= num_devices <= len(layers):
        raise ValueError(f"cannot split {len(layers)} layers across {num_devices} devices")
    shapes, macs = [], []
    x = torch.zeros(1, *image_shape)
    with torch.no_grad():
        x = model.eval().normalize(x)
        for layer in layers:
            macs.append(count_macs(layer, x.shape[1:]))
            x = layer(x)
            shapes.append(x.shape[1:])
    head_macs = count_macs(model.fc, (model.feature_channels,)) if model.num_classes else 0
    cuts = _balanced_cuts(macs, num_devices)
    segments = []
    for d, (start, stop) in enumerate(zip([0, *cuts], [*cuts, len(layers)])):
        mods = layers[start:stop] + ([model.fc] if d == num_devices - 1 else [])
        last = d == num_devices - 1
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
