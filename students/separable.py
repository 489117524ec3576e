"""Separable networks (Lin & Wang, arXiv 2111.02489): K narrow branches, one per device, that exchange
a fraction of their channels at a few points mid-network.

Each branch is a Wide ResNet body cut into stages at its exchange points (after a block). At an
exchange, device ``j`` receives the first ``m`` channels of its peer ``route[j]``'s map and averages
them with its own: ``x[:, :m] = (x[:, :m] + peer[:, :m]) / 2``; its other channels are unchanged. A
message that does not arrive (a device down, a late or dropped exchange) leaves ``x`` unchanged, the
same as averaging ``x`` with itself. After the last stage each branch pools its map into a vector
(with ``head``, after a 1x1 conv + BN + ReLU, the head LCP's and NoNN's devices end in), and a shared
classifier over the concatenated vectors gives the logits, as in NoNN and LCP; a failed device's vector
is replaced by its training mean (NoNN's ``Aggregator``).

An :class:`ExchangePolicy` says where the branches talk, with whom and how much; the bytes it costs
per inference follow from the maps' shapes (:meth:`SeparableNet.exchange_bytes`).
"""
from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from students.layers import pointwise_head
from students.networks import wide_resnet
from students.split import average_channels
from students.unified import Aggregator

# the share of a map's channels an exchange sends: the paper's 50 % to 100 % in 9 steps, and below them 1/8
# and 1/4, without which no exchange of a WRN-10-1 branch at 28 px comes under a fifth of MP's bytes
FRACTIONS = (0.125, 0.25, *(round(0.5 + i / 16, 4) for i in range(9)))


@dataclass(frozen=True)
class Exchange:
    """One exchange point: device ``j`` receives from ``route[j]`` the first ``fraction`` of the channels."""

    route: tuple[int, ...]
    fraction: float

    def channels(self, width: int) -> int:
        return max(1, math.ceil(self.fraction * width))


@dataclass(frozen=True)
class ExchangePolicy:
    """Exchange point (index into the branch's candidate points) -> its exchange; no entry: no exchange."""

    exchanges: dict[int, Exchange] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {str(p): {"route": list(e.route), "fraction": e.fraction} for p, e in sorted(self.exchanges.items())}

    @classmethod
    def from_dict(cls, spec: dict, num_points: int, num_devices: int) -> ExchangePolicy:
        """A policy from its JSON/YAML form, checked: points in range, a route that sends no device its own
        map, fractions in (0, 1]. Errors name the point."""
        exchanges = {}
        for key, e in spec.items():
            if not str(key).isdigit() or not isinstance(e, dict) or set(e) != {"route", "fraction"}:
                raise ValueError(f"exchange point {key!r}: give a point number and {{route: [device per device], "
                                 f"fraction: f}}, got {e!r}")
            point = int(key)
            if not 0 <= point < num_points:
                raise ValueError(f"exchange point {point}: the branches have points 0..{num_points - 1}")
            route, fraction = tuple(int(r) for r in e["route"]), float(e["fraction"])
            if sorted(route) != list(range(num_devices)) or any(r == j for j, r in enumerate(route)):
                raise ValueError(f"exchange point {point}: route {list(route)} must give each of the {num_devices} "
                                 "devices one other device's map (a permutation without fixed points)")
            if not 0 < fraction <= 1:
                raise ValueError(f"exchange point {point}: fraction {fraction} must be in (0, 1]")
            exchanges[point] = Exchange(route, fraction)
        return cls(exchanges)

    @classmethod
    def everywhere(cls, num_points: int, num_devices: int) -> ExchangePolicy:
        """Every point, all channels, each device from the next one: the most any policy sends."""
        route = tuple((j + 1) % num_devices for j in range(num_devices))
        return cls({p: Exchange(route, 1.0) for p in range(num_points)})

    @classmethod
    def sample(cls, rng: random.Random, num_points: int, num_devices: int) -> ExchangePolicy:
        """A random policy: each point on or off, a random derangement as the route, a random fraction."""
        exchanges = {}
        for point in range(num_points):
            if rng.random() < 0.5:
                exchanges[point] = Exchange(_derangement(rng, num_devices), rng.choice(FRACTIONS))
        return cls(exchanges)


def _derangement(rng: random.Random, n: int) -> tuple[int, ...]:
    while True:
        route = list(range(n))
        rng.shuffle(route)
        if all(r != j for j, r in enumerate(route)):
            return tuple(route)


class SeparableNet(nn.Module):
    """K Wide ResNet branches cut at their exchange points, plus the shared classifier."""

    def __init__(self, num_devices: int, depth: int, width: int, in_channels: int, num_classes: int,
                 mean: Sequence[float], std: Sequence[float], head: bool = False) -> None:
        super().__init__()
        if num_devices < 2:
            raise ValueError(f"a separable network needs at least 2 branches, got {num_devices}")
        branches = [wide_resnet(depth, width, in_channels, 0, mean, std) for _ in range(num_devices)]
        self.normalize = branches[0].normalize
        # stage s runs body layers cuts[s]..cuts[s+1]; an exchange point follows every block but the last
        layers = len(branches[0].body)
        self.cuts = [0, *range(2, layers - 1), layers]  # the stem and the first block form stage 0
        self.out_width = branches[0].feature_channels
        self.stages = nn.ModuleList(nn.ModuleList(nn.Sequential(*b.body[a:z]) for a, z in zip(self.cuts, self.cuts[1:]))
                                    for b in branches)
        if head:  # part of the last stage, so the device runs it and the bundle needs no other change
            for stages in self.stages:
                stages[-1].extend(pointwise_head(self.out_width, self.out_width))
        self.aggregator = Aggregator([self.out_width] * num_devices, num_classes)
        self.num_devices = num_devices
        self.policy = ExchangePolicy()

    @property
    def num_points(self) -> int:
        return len(self.cuts) - 2

    def forward(self, x: torch.Tensor, missing: Sequence[int] = (), policy: ExchangePolicy | None = None,
                dropped: Sequence[int] = ()) -> torch.Tensor:
        """Logits with ``policy`` (default: ``self.policy``). ``missing`` devices send nothing (their vector
        is replaced by its training mean and their maps reach no peer); points in ``dropped`` carry no message."""
        z = torch.cat(self.vectors(x, missing, policy, dropped), dim=1)
        return self.aggregator(self.aggregator.fill_missing(z, missing))

    def vectors(self, x: torch.Tensor, missing: Sequence[int] = (), policy: ExchangePolicy | None = None,
                dropped: Sequence[int] = ()) -> list[torch.Tensor]:
        policy = self.policy if policy is None else policy
        maps = [self.normalize(x)] * self.num_devices
        for s in range(len(self.cuts) - 1):
            maps = [stages[s](m) for stages, m in zip(self.stages, maps)]
            exchange = policy.exchanges.get(s)
            if exchange is not None and s not in dropped:
                maps = [average_in(m, maps[exchange.route[j]], exchange.fraction, exchange.route[j] in missing)
                        for j, m in enumerate(maps)]
        return [torch.zeros_like(m[:, :, 0, 0]) if j in missing else m.mean(dim=(2, 3)) for j, m in enumerate(maps)]

    def device_stages(self, policy: ExchangePolicy) -> list[list[nn.Module]]:
        """What each device runs under ``policy``, cut only where it exchanges: the first stage takes the image
        in [0, 1], the last returns the pooled vector (the modules are this net's own, not copies)."""
        active = sorted(policy.exchanges)
        bounds = [0, *(p + 1 for p in active), len(self.cuts) - 1]
        return [[BranchStage(list(stages)[a:z], self.normalize if a == 0 else None, z == len(stages))
                 for a, z in zip(bounds, bounds[1:])] for stages in self.stages]

    def stage_exchanges(self, policy: ExchangePolicy, image_shape: Sequence[int]) -> list[dict]:
        """``policy`` in the terms of ``device_stages``: after stage ``after_stage`` device j averages in the
        first ``channels`` channels of device ``route[j]``'s map."""
        shapes = self.point_shapes(image_shape)
        return [{"after_stage": s, "route": list(policy.exchanges[p].route),
                 "channels": policy.exchanges[p].channels(shapes[p][0])}
                for s, p in enumerate(sorted(policy.exchanges))]

    @torch.no_grad()
    def exchange_bytes(self, policy: ExchangePolicy, image_shape: Sequence[int], itemsize: int = 4) -> int:
        """Bytes the devices send each other per image under ``policy`` (mid-network messages only)."""
        shapes = self.point_shapes(image_shape)
        return sum(self.num_devices * e.channels(shapes[p][0]) * shapes[p][1] * shapes[p][2] * itemsize
                   for p, e in policy.exchanges.items())

    @torch.no_grad()
    def point_shapes(self, image_shape: Sequence[int]) -> list[tuple[int, int, int]]:
        """(channels, rows, columns) of a branch's map at each exchange point."""
        m, shapes = self.normalize(torch.zeros(1, *image_shape)), []
        was_training = self.training
        self.eval()
        for stage in list(self.stages[0])[:-1]:
            m = stage(m)
            shapes.append(tuple(m.shape[1:]))
        self.train(was_training)
        return shapes


class BranchStage(nn.Module):
    """A run of a branch's stages between two exchanges: the first normalises the image, the last pools."""

    def __init__(self, stages: Sequence[nn.Module], normalize: nn.Module | None, pool: bool) -> None:
        super().__init__()
        self.normalize = normalize
        self.body = nn.Sequential(*stages)
        self.pool = pool

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.body(x if self.normalize is None else self.normalize(x))
        return x.mean(dim=(2, 3)) if self.pool else x


def average_in(own: torch.Tensor, peer: torch.Tensor, fraction: float, peer_missing: bool = False) -> torch.Tensor:
    """``own`` with its first ``ceil(fraction * C)`` channels averaged with ``peer``'s; unchanged when the
    peer's message is missing."""
    return own if peer_missing else average_channels(own, peer[:, :Exchange((), fraction).channels(own.shape[1])])


@torch.no_grad()
def recalibrate_batchnorm(net: SeparableNet, images: torch.Tensor, policy: ExchangePolicy, batch_size: int = 256) -> None:
    """Set every BatchNorm's running statistics to what ``policy`` produces on ``images`` (training images,
    float in [0, 1]). The supernet's statistics mix every policy it trained on; one policy's own maps differ
    (the exchanges shift them), so each is measured with its own, as one-shot searches do."""
    norms = [m for m in net.modules() if isinstance(m, nn.BatchNorm2d)]
    saved = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # a cumulative average over the batches below
    was_training = net.training
    net.train()
    try:
        for i in range(0, len(images), batch_size):
            net.vectors(images[i:i + batch_size], policy=policy)
    finally:
        for m, momentum in zip(norms, saved):
            m.momentum = momentum
        net.train(was_training)


@torch.no_grad()
def rank_policies(net: SeparableNet, images: torch.Tensor, labels: torch.Tensor,
                  policies: Sequence[ExchangePolicy], itemsize: int = 4, batch_size: int = 500,
                  calibration: torch.Tensor | None = None) -> list[dict]:
    """Each policy's accuracy on ``images`` (float in [0, 1]) and the bytes it sends per image, in the
    order given: the weight-sharing search's scores (read on the validation split, never the test set).
    With ``calibration`` (training images) each policy is scored with its own BatchNorm statistics
    (``recalibrate_batchnorm``); the net's own are put back afterwards."""
    was_training = net.training
    state = {k: v.clone() for k, v in net.state_dict().items()} if calibration is not None else None
    rows = []
    for policy in policies:
        if calibration is not None:
            recalibrate_batchnorm(net, calibration, policy)
        net.eval()
        correct = sum(int((net(images[i:i + batch_size], policy=policy).argmax(1) == labels[i:i + batch_size]).sum())
                      for i in range(0, len(images), batch_size))
        rows.append({"policy": policy.to_dict(), "accuracy": correct / len(images),
                     "exchange_bytes": net.exchange_bytes(policy, images.shape[1:], itemsize)})
    if state is not None:
        net.load_state_dict(state)
    net.train(was_training)
    return rows


def pareto_front(rows: Sequence[dict]) -> list[dict]:
    """The rows no other row beats on both accuracy and bytes (ties kept once), cheapest first."""
    front = []
    for row in sorted(rows, key=lambda r: (r["exchange_bytes"], -r["accuracy"])):
        if not front or row["accuracy"] > front[-1]["accuracy"]:
            front.append(row)
    return front
