"""A tiny K=2 student with trained-looking statistics, shared by the export and runtime tests."""
from __future__ import annotations

from pathlib import Path

import torch

from students.unified import UnifiedStudent

IMAGE_SHAPE = (1, 16, 16)
WIDTHS = [5, 7]
PARTITIONS = [[0, 3, 4, 8, 9], [1, 2, 5, 6, 7, 10, 11]]
DEVICE_ENTRIES = [{"arch": "wrn_10_1", "teacher_filters": p} for p in PARTITIONS]  # what NoNN records per device
CLASSES = ["a", "b", "c", "d"]


def _perturb_batchnorm(model: torch.nn.Module, gen: torch.Generator) -> None:
    """Trained-looking BN statistics, so that an export that ignores them (train mode) would be caught."""
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            c = m.num_features
            m.running_mean.copy_(torch.rand(c, generator=gen) * 0.4 - 0.2)
            m.running_var.copy_(torch.rand(c, generator=gen) + 0.5)
            m.weight.data.copy_(torch.rand(c, generator=gen) + 0.5)
            m.bias.data.copy_(torch.rand(c, generator=gen) * 0.2 - 0.1)


def images(n: int, seed: int) -> torch.Tensor:
    return torch.rand(n, *IMAGE_SHAPE, generator=torch.Generator().manual_seed(seed))


def tiny_student() -> UnifiedStudent:
    """Two wrn_10_1 devices (widths 5 and 7), 4 classes; logits centred on the mean vector, so the
    predicted class depends on the image and a missing device changes answers."""
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    m = UnifiedStudent.build(["wrn_10_1"], WIDTHS, in_channels=1, num_classes=4, mean=[0.5], std=[0.25],
                             out_size=(4, 4))
    _perturb_batchnorm(m, gen)
    m.eval()
    with torch.no_grad():
        fc, mean = m.aggregator.fc, m.aggregator.feature_mean
        mean.copy_(torch.cat([d(images(64, seed=9)) for d in m.devices], 1).mean(0))
        fc.weight.mul_(20)
        fc.bias.copy_(-fc.weight @ mean)
    return m


def key_pair(folder: Path, name: str) -> tuple[Path, Path]:
    """An Ed25519 key pair as PEM files, as openssl genpkey / openssl pkey -pubout write them."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    key = Ed25519PrivateKey.generate()
    private, public = folder / f"{name}.pem", folder / f"{name}.pub.pem"
    private.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))
    public.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                     serialization.PublicFormat.SubjectPublicKeyInfo))
    return private, public
