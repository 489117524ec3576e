"""CIFAR-style classifiers: Wide ResNet, ResNet-20/56 and MobileNetV2.

Every network is a :class:`FeatureClassifier`: ``forward_features`` returns the final convolutional
feature map after its last BN+ReLU (what partitioning reads and students imitate), ``forward`` the
logits. With ``num_classes=0`` the network has no classifier head (a NoNN student needs none).
"""
from __future__ import annotations

from collections.abc import Sequence
from functools import partial

import torch
from torch import nn

from students.layers import Normalize
from students.registry import register_arch


class FeatureClassifier(nn.Module):
    """Normalise -> body -> final feature map -> global average pool -> linear head."""

    feature_layer = "body"

    def __init__(self, body: nn.Module, feature_channels: int, num_classes: int,
                 mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.normalize = Normalize(mean, std)
        self.body = body
        self.feature_channels = feature_channels
        self.num_classes = num_classes
        self.fc = nn.Linear(feature_channels, num_classes) if num_classes > 0 else nn.Identity()
        _init_weights(self)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(self.normalize(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.forward_features(x).mean(dim=(2, 3)))

    @torch.no_grad()
    def map_size(self, image_shape: Sequence[int]) -> tuple[int, int]:
        """(rows, columns) of the final feature map for images of ``image_shape`` (C, H, W)."""
        return tuple(self.eval().forward_features(torch.zeros(1, *image_shape)).shape[-2:])


@torch.no_grad()
def batched(fn, images: torch.Tensor, batch_size: int = 500) -> torch.Tensor:
    """``fn`` over ``images`` in batches (bounded memory on the whole test split), concatenated."""
    return torch.cat([fn(images[i:i + batch_size]) for i in range(0, len(images), batch_size)])


def _init_weights(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.zeros_(m.bias)


def _bn_relu(channels: int) -> nn.Sequential:
    return nn.Sequential(nn.BatchNorm2d(channels), nn.ReLU(inplace=True))


# --- Wide ResNet (Zagoruyko & Komodakis), pre-activation blocks -------------------------------

class _WideBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.pre = _bn_relu(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.post = _bn_relu(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.shortcut = None if cin == cout and stride == 1 else nn.Conv2d(cin, cout, 1, stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        o = self.pre(x)
        skip = x if self.shortcut is None else self.shortcut(o)
        return skip + self.conv2(self.post(self.conv1(o)))


def wide_resnet(depth: int, width: int, in_channels: int, num_classes: int,
                mean: Sequence[float], std: Sequence[float]) -> FeatureClassifier:
    if (depth - 4) % 6:
        raise ValueError(f"WRN depth must be 6n+4, got {depth}")
    n = (depth - 4) // 6
    widths = [16, 16 * width, 32 * width, 64 * width]
    layers: list[nn.Module] = [nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False)]
    for stage, stride in enumerate((1, 2, 2)):
        for i in range(n):
            layers.append(_WideBlock(widths[stage] if i == 0 else widths[stage + 1], widths[stage + 1],
                                     stride if i == 0 else 1))
    layers.append(_bn_relu(widths[3]))
    return FeatureClassifier(nn.Sequential(*layers), widths[3], num_classes, mean, std)


for _d, _k in ((10, 1), (16, 1), (16, 2), (16, 4), (16, 8), (28, 4), (28, 10), (40, 2), (40, 4)):
    register_arch(f"wrn_{_d}_{_k}", partial(wide_resnet, _d, _k))


# --- CIFAR ResNet (He et al. 2016, option B shortcuts) -------------------------------------

class _BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.residual = nn.Sequential(
            nn.Conv2d(cin, cout, 3, stride, 1, bias=False), _bn_relu(cout),
            nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout))
        self.shortcut = nn.Identity() if cin == cout and stride == 1 else nn.Sequential(
            nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.residual(x) + self.shortcut(x))


def cifar_resnet(depth: int, in_channels: int, num_classes: int,
                 mean: Sequence[float], std: Sequence[float]) -> FeatureClassifier:
    if (depth - 2) % 6:
        raise ValueError(f"CIFAR ResNet depth must be 6n+2, got {depth}")
    n = (depth - 2) // 6
    layers: list[nn.Module] = [nn.Conv2d(in_channels, 16, 3, 1, 1, bias=False), _bn_relu(16)]
    cin = 16
    for cout, stride in ((16, 1), (32, 2), (64, 2)):
        for i in range(n):
            layers.append(_BasicBlock(cin, cout, stride if i == 0 else 1))
            cin = cout
    return FeatureClassifier(nn.Sequential(*layers), 64, num_classes, mean, std)


register_arch("resnet20", partial(cifar_resnet, 20))
register_arch("resnet56", partial(cifar_resnet, 56))


# --- MobileNetV2, CIFAR variant (stride 1 stem, stride 1 in the second stage) ----------------

class _InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = cin * expand
        layers: list[nn.Module] = []
        if expand != 1:
            layers += [nn.Conv2d(cin, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6(inplace=True)]
        layers += [nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False), nn.BatchNorm2d(hidden),
                   nn.ReLU6(inplace=True), nn.Conv2d(hidden, cout, 1, bias=False), nn.BatchNorm2d(cout)]
        self.block = nn.Sequential(*layers)
        self.use_skip = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.block(x) if self.use_skip else self.block(x)


def _make_divisible(v: float, divisor: int = 8) -> int:
    return max(divisor, int(v + divisor / 2) // divisor * divisor)


_MBV2_CIFAR = ((1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1),
               (6, 160, 3, 2), (6, 320, 1, 1))  # (expansion, channels, repeats, first stride)


def mobilenet_v2(width_mult: float, in_channels: int, num_classes: int,
                 mean: Sequence[float], std: Sequence[float]) -> FeatureClassifier:
    cin = _make_divisible(32 * width_mult)
    last = _make_divisible(1280 * max(1.0, width_mult))
    layers: list[nn.Module] = [nn.Conv2d(in_channels, cin, 3, 1, 1, bias=False), nn.BatchNorm2d(cin),
                               nn.ReLU6(inplace=True)]
    for t, c, n, s in _MBV2_CIFAR:
        cout = _make_divisible(c * width_mult)
        for i in range(n):
            layers.append(_InvertedResidual(cin, cout, s if i == 0 else 1, t))
            cin = cout
    layers += [nn.Conv2d(cin, last, 1, bias=False), _bn_relu(last)]
    return FeatureClassifier(nn.Sequential(*layers), last, num_classes, mean, std)


register_arch("mobilenetv2", partial(mobilenet_v2, 1.0))
register_arch("mobilenetv2_x0.5", partial(mobilenet_v2, 0.5))
register_arch("mobilenetv2_x0.25", partial(mobilenet_v2, 0.25))
