"""Small layers shared by every architecture."""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


class Normalize(nn.Module):
    """Per-channel (x - mean) / std inside the model, so that every exported model takes [0, 1] images."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        if len(mean) != len(std):
            raise ValueError(f"normalisation mean {list(mean)} and std {list(std)} differ in length")
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


def pointwise_head(in_channels: int, out_channels: int) -> nn.Sequential:
    """1x1 conv + BN + ReLU: what a NoNN or LCP device (and, with ``head``, a SepNN branch) ends in before
    it pools its map into the vector it sends."""
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, bias=False), nn.BatchNorm2d(out_channels),
                         nn.ReLU(inplace=True))
