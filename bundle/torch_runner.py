"""Run an exported NoNN bundle's TorchScript files: PyTorch alone, no project code beyond ``bundle.format``.

Checksums, manifest reading and the failed-device fill come from ``bundle.format``, so both loaders
refuse the same modified bundles and fill failed devices identically.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from bundle.format import check_missing, fill_vectors, parts, read_manifest


class TorchBundle:
    """The TorchScript device models and aggregator of a verified bundle."""

    def __init__(self, root: Path, manifest: dict, devices: list[torch.jit.ScriptModule],
                 aggregator: torch.jit.ScriptModule) -> None:
        self.root = root
        self.manifest = manifest
        self.devices = devices
        self.aggregator = aggregator
        self.fills = [torch.from_numpy(f) for f in fill_vectors(manifest)]

    @classmethod
    def load(cls, path: str | Path, map_location: str | torch.device = "cpu") -> TorchBundle:
        root, manifest = read_manifest(path)
        models = [torch.jit.load(str(root / p["files"]["torchscript"]), map_location=map_location).eval()
                  for p in parts(manifest)]
        return cls(root, manifest, models[:-1], models[-1])

    @torch.inference_mode()
    def predict(self, images: torch.Tensor, missing: Sequence[int] = ()) -> torch.Tensor:
        """Logits for float32 images in [0, 1], [N, C, H, W]; devices in ``missing`` are replaced by their mean."""
        skip = check_missing(missing, len(self.devices))
        columns = [self.fills[i].to(images.device).expand(len(images), -1) if i in skip else d(images)
                   for i, d in enumerate(self.devices)]
        return self.aggregator(torch.cat(columns, dim=1))
