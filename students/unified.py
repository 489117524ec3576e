"""The unified NoNN student: K device networks and one shared classifier over their vectors.

Device i runs ``DeviceStudent`` i: a small backbone, a 1x1 conv to |P_i| channels + BN + ReLU (the
teacher filters it learns), resized to the teacher's final spatial size. It sends only the spatial
mean of that map, a |P_i|-vector. The ``Aggregator`` concatenates the vectors in device order and
applies one linear layer; a missing device's vector is replaced by its training mean.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from students.layers import pointwise_head
from students.networks import FeatureClassifier
from students.registry import build_model
from students.split import Combiner, GatherModel


class DeviceStudent(nn.Module):
    """What one device runs: images in [0, 1] -> pooled |P_i|-vector."""

    def __init__(self, backbone: FeatureClassifier, out_channels: int, out_size: tuple[int, int]) -> None:
        super().__init__()
        self.backbone = backbone
        self.adapter = pointwise_head(backbone.feature_channels, out_channels)
        self.out_channels = out_channels
        self.out_width = out_channels  # it sends the spatial mean of each of its channels
        self.out_size = tuple(out_size)

    def forward_map(self, x: torch.Tensor) -> torch.Tensor:
        fmap = self.adapter(self.backbone.forward_features(x))
        if tuple(fmap.shape[-2:]) == self.out_size:
            return fmap
        if fmap.shape[-2] > self.out_size[0]:
            return F.adaptive_avg_pool2d(fmap, self.out_size)
        return F.interpolate(fmap, size=self.out_size, mode="bilinear", align_corners=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_map(x).mean(dim=(2, 3))


class Aggregator(Combiner):
    """Concatenated device vectors -> logits by one linear layer. Keeps a running mean of each feature,
    which stands in for a failed device."""

    kind = "concat_linear"

    def __init__(self, widths: Sequence[int], num_classes: int, momentum: float = 0.01) -> None:
        super().__init__(widths)
        self.fc = nn.Linear(sum(widths), num_classes)
        self.momentum = momentum
        self.register_buffer("feature_mean", torch.zeros(sum(widths)))

    def fill_vector(self) -> torch.Tensor:
        return self.feature_mean

    def combine(self, z: torch.Tensor) -> torch.Tensor:
        return self.fc(z)

    def forward(self, z: torch.Tensor, drop: torch.Tensor | None = None) -> torch.Tensor:
        """``drop`` [N, K] bool (training with student dropout) replaces those vectors with the mean."""
        if self.training:
            with torch.no_grad():
                self.feature_mean.lerp_(z.detach().float().mean(0), self.momentum)
        if drop is not None:
            mask = drop.repeat_interleave(torch.tensor(self.widths, device=z.device), dim=1)
            z = torch.where(mask, self.feature_mean.to(z.dtype), z)
        return self.fc(z)


def device_archs(archs: Sequence[str], k: int) -> list[str]:
    """One architecture name per device: a single name serves all K, otherwise there must be K."""
    if len(archs) == 1:
        return list(archs) * k
    if len(archs) != k:
        raise ValueError(f"distill.students names {len(archs)} architectures for {k} partitions; "
                         "give one name for all students or one per student")
    return list(archs)


class UnifiedStudent(GatherModel):
    """K devices + aggregator, trained as one model; ``devices`` and ``aggregator`` are the per-device parts."""

    def __init__(self, devices: Sequence[DeviceStudent], num_classes: int) -> None:
        super().__init__(devices, Aggregator([d.out_channels for d in devices], num_classes), num_classes)

    @classmethod
    def build(cls, archs: Sequence[str], widths: Sequence[int], in_channels: int, num_classes: int,
              mean: Sequence[float], std: Sequence[float], out_size: tuple[int, int]) -> UnifiedStudent:
        archs = device_archs(archs, len(widths))
        if any(w < 1 for w in widths):
            raise ValueError(f"every partition needs at least one filter, got sizes {list(widths)}")
        devices = [DeviceStudent(build_model(a, in_channels, 0, mean, std), w, out_size)
                   for a, w in zip(archs, widths)]
        return cls(devices, num_classes)

    def forward_maps(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [d.forward_map(x) for d in self.devices]

    def logits_from_maps(self, maps: Sequence[torch.Tensor], drop: torch.Tensor | None = None) -> torch.Tensor:
        """Logits from the device maps. ``drop`` [N, K] bool replaces those vectors with the running mean."""
        return self.aggregator(torch.cat([m.mean(dim=(2, 3)) for m in maps], dim=1), drop)
