"""What every side-by-side split has in common (all methods but model parallelism's chain).

K device modules each turn the image into one vector (``out_width`` numbers: a pooled feature vector,
top-k pairs, class-group scores) and an aggregator combines the vectors, concatenated in device order,
into class scores. A missing device's vector is replaced by the aggregator's fill vector, the same
way in training, evaluation, the exported bundle and the runtime.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


class Combiner(nn.Module):
    """An aggregator: the device widths, what stands in for a missing device, and the combining rule."""

    kind: str  # recorded in the bundle manifest: how the aggregator combines the vectors

    def __init__(self, widths: Sequence[int]) -> None:
        super().__init__()
        self.widths = [int(w) for w in widths]

    def fill_vector(self) -> torch.Tensor:
        """[sum(widths)]: each device's slice replaces that device's vector when it is missing."""
        raise NotImplementedError

    def combine(self, z: torch.Tensor) -> torch.Tensor:
        """[N, sum(widths)] concatenated vectors -> [N, classes] scores (what the exported aggregator computes)."""
        raise NotImplementedError

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """In training an aggregator may also keep statistics (NoNN's running mean); ``combine`` never does."""
        return self.combine(z)

    def slices(self) -> list[slice]:
        bounds = torch.tensor([0, *self.widths]).cumsum(0).tolist()
        return [slice(a, b) for a, b in zip(bounds[:-1], bounds[1:])]

    def fill_missing(self, z: torch.Tensor, missing: Sequence[int]) -> torch.Tensor:
        if not missing:
            return z
        z = z.clone()
        fill = self.fill_vector().to(z.dtype)
        for i in missing:
            span = self.slices()[i]
            z[:, span] = fill[span]
        return z


class LogitDevice(nn.Module):
    """A device that is a whole classifier and sends its logits (or, with fewer classes, its group's scores)."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net
        self.out_width = net.num_classes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class GatherModel(nn.Module):
    """K devices side by side on the same image, and the aggregator over their vectors."""

    def __init__(self, devices: Sequence[nn.Module], aggregator: Combiner, num_classes: int) -> None:
        super().__init__()
        widths = [d.out_width for d in devices]
        if widths != aggregator.widths:
            raise ValueError(f"device widths {widths} do not match the aggregator's {aggregator.widths}")
        self.devices = nn.ModuleList(devices)
        self.aggregator = aggregator
        self.num_classes = int(num_classes)

    def vectors(self, x: torch.Tensor) -> torch.Tensor:
        """What the K devices send, concatenated in device order: [N, sum(widths)]."""
        return torch.cat([d(x) for d in self.devices], dim=1)

    def forward(self, x: torch.Tensor, missing: Sequence[int] = ()) -> torch.Tensor:
        return self.aggregator(self.aggregator.fill_missing(self.vectors(x), missing))


def average_channels(own: torch.Tensor, received: torch.Tensor) -> torch.Tensor:
    """A mid-network exchange (SepNN): ``own``'s first ``received.shape[1]`` channels averaged with the
    channels a peer sent, the rest unchanged. ``bundle.format.average_channels`` is its numpy twin."""
    m = received.shape[1]
    return torch.cat([(own[:, :m] + received.to(own.dtype)) / 2, own[:, m:]], dim=1)


class CombineRule(nn.Module):
    """An aggregator's combining rule alone, as a module (to count its MACs without its training-time state)."""

    def __init__(self, aggregator: Combiner) -> None:
        super().__init__()
        self.aggregator = aggregator

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.aggregator.combine(z)
