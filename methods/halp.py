"""HALP (Li, Iosifidis & Zhang, ICC 2022): the teacher itself, split by rows of the image.

The teacher is cut after one of its body layers. Up to the cut, device i computes rows [a_i, b_i) of
the cut's feature map from the image rows their receptive field reaches (the halo), so its map equals
the teacher's on those rows exactly: zeros are padded only at the image's true top and bottom, and
halo rows whose values the crop's own edge spoils are computed and thrown away. The aggregator (the
host) stitches the segments in row order and runs the rest of the teacher. Nothing is trained.

What this file chose where the paper is silent (its layer choices and ratio formula are not public):
- the halo is the plain redundant one (each device computes its own overlap rows from the image);
- rows are shared in proportion to ``capacities`` (the cut map's rows, largest remainder);
- the default cut (``cut: -1``) minimises a latency model: the slowest device's compute and upload
  at ``device_gmacs`` and ``link_mbps``, plus the host's compute of the rest at ``host_gmacs``;
- a failed device's segment is replaced by its training mean (as NoNN's vectors are) instead of
  leaving the request unanswered; the failure table measures what that is worth.
"""
from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from methods.base import Method, register
from students.complexity import count_macs
from students.networks import FeatureClassifier
from students.split import Combiner, CombineRule, GatherModel

FILL_IMAGES = 256  # training images whose mean segment stands in for a failed device


@dataclass(frozen=True)
class Reach:
    """How far one output row of a stack of layers reaches into the image: output row j depends on
    image rows [stride*j - up, stride*j + down] at most (summed over every conv and pool it runs, a
    bound that holds on any path through residual blocks)."""

    up: int
    down: int
    stride: int
    out_shape: tuple[int, int, int]  # (channels, rows, columns) of the output map


def layer_reach(model: FeatureClassifier, cut: int, image_shape: tuple[int, int, int]) -> Reach:
    height = image_shape[1]
    up = down = 0
    refused: list[str] = []

    def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...], _output: torch.Tensor) -> None:
        nonlocal up, down
        padding = module.padding
        if isinstance(padding, str):
            refused.append(f"{type(module).__name__} with padding={padding!r}")
            return
        first = lambda v: v[0] if isinstance(v, (tuple, list)) else v  # noqa: E731 (the row axis)
        k, p = first(module.kernel_size), first(padding)
        d = first(getattr(module, "dilation", 1))
        jump = height // inputs[0].shape[-2]
        up += p * jump
        down += ((k - 1) * d - p) * jump

    layers = list(model.body.children())[:cut]
    handles = [m.register_forward_hook(hook) for layer in layers for m in layer.modules()
               if isinstance(m, (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d))]
    try:
        with torch.no_grad():
            out = nn.Sequential(*layers).eval()(torch.zeros(1, *image_shape))
    finally:
        for h in handles:
            h.remove()
    if refused:
        raise ValueError(f"method halp: cannot split rows through {refused[0]}; choose an earlier method_options.halp.cut")
    rows = out.shape[-2]
    if height % rows:
        raise ValueError(f"method halp: the map after layer {cut - 1} has {rows} rows, which do not divide the "
                         f"image's {height}; choose another method_options.halp.cut")
    return Reach(up, down, height // rows, tuple(out.shape[1:]))


def share_rows(rows: int, capacities: Sequence[float]) -> list[tuple[int, int]]:
    """[a_i, b_i) per device: ``rows`` shared in proportion to ``capacities`` (largest remainder, each >= 1)."""
    k = len(capacities)
    if rows < k:
        raise ValueError(f"method halp: the cut's map has {rows} rows, too few for {k} devices; cut earlier")
    total = float(sum(capacities))
    exact = [rows * c / total for c in capacities]
    counts = [max(1, math.floor(e)) for e in exact]
    order = sorted(range(k), key=lambda i: exact[i] - math.floor(exact[i]), reverse=True)
    i = 0
    while sum(counts) != rows:
        j = order[i % k]
        step = 1 if sum(counts) < rows else -1
        if counts[j] + step >= 1:
            counts[j] += step
        i += 1
    bounds = [0, *itertools.accumulate(counts)]
    return list(zip(bounds[:-1], bounds[1:]))


class RowDevice(nn.Module):
    """Image in [0, 1] -> the teacher's cut map on rows [a, b), flattened: it crops the image rows
    [lo, hi) its rows reach, runs the teacher's first layers, and keeps the exact rows."""

    def __init__(self, model: FeatureClassifier, cut: int, reach: Reach, span: tuple[int, int], height: int) -> None:
        super().__init__()
        a, b = span
        s = reach.stride
        self.lo = max(0, (s * a - reach.up) // s * s)
        self.hi = min(height, -(-(s * (b - 1) + reach.down + 1) // s) * s)
        self.keep = (a - self.lo // s, b - self.lo // s)
        self.span = (a, b)                               # its rows of the cut map
        self.halo_rows = (self.hi - self.lo) - (b - a) * s  # image rows it computes beyond its share
        self.normalize = model.normalize
        self.layers = nn.Sequential(*list(model.body.children())[:cut])
        channels, _, columns = reach.out_shape
        self.out_shape = (channels, b - a, columns)
        self.out_width = channels * (b - a) * columns

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fmap = self.layers(self.normalize(x[:, :, self.lo:self.hi]))
        return fmap[:, :, self.keep[0]:self.keep[1]].flatten(1)


class RowStitcher(Combiner):
    """The host: the devices' row segments stitched in order, then the rest of the teacher."""

    kind = "stitch_rows"

    def __init__(self, model: FeatureClassifier, cut: int, shapes: Sequence[tuple[int, int, int]]) -> None:
        super().__init__([c * r * w for c, r, w in shapes])
        self.shapes = [tuple(s) for s in shapes]
        self.layers = nn.Sequential(*list(model.body.children())[cut:])
        self.fc = model.fc
        self.register_buffer("fill", torch.zeros(sum(self.widths)))

    def fill_vector(self) -> torch.Tensor:
        return self.fill

    def combine(self, z: torch.Tensor) -> torch.Tensor:
        parts = [z[:, span].reshape(-1, *shape) for span, shape in zip(self.slices(), self.shapes)]
        return self.fc(self.layers(torch.cat(parts, dim=2)).mean(dim=(2, 3)))


@register
class Halp(Method):
    name = "halp"
    label = "HALP (teacher split by image rows)"
    sends = "its rows of the teacher's feature map at the cut"
    options = {"devices": 2, "cut": -1, "capacities": None, "device_gmacs": 1.0, "host_gmacs": 1.0,
               "link_mbps": 10.0}
    trains = False
    transports = ("fp32", "fp16")

    @classmethod
    def check_options(cls, opts: dict) -> None:
        if opts["devices"] < 1:
            raise ValueError(f"method_options.halp.devices = {opts['devices']}: must be at least 1")
        caps = opts["capacities"]
        if caps is not None and (len(caps) != opts["devices"] or any(not float(c) > 0 for c in caps)):
            raise ValueError(f"method_options.halp.capacities = {caps}: give {opts['devices']} positive numbers "
                             "(one per device) or null for equal shares")
        for key in ("device_gmacs", "host_gmacs", "link_mbps"):
            if not opts[key] > 0:
                raise ValueError(f"method_options.halp.{key} = {opts[key]}: must be positive")

    def capacities(self) -> list[float]:
        return [float(c) for c in self.opts["capacities"] or [1.0] * self.opts["devices"]]

    def plan(self) -> dict:
        layers = len(list(self.teacher.body.children()))
        cut = self.opts["cut"]
        if cut == -1:
            feasible = [c for c in range(1, layers + 1)
                        if layer_reach(self.teacher, c, self.dm.image_shape).out_shape[1] >= self.opts["devices"]]
            cut = min(feasible, key=self.latency_seconds)
        elif not 1 <= cut <= layers:
            raise ValueError(f"method_options.halp.cut = {cut}: the teacher has body layers 0..{layers - 1}; "
                             f"cut after 1..{layers} of them, or -1 to choose by the latency model")
        reach = layer_reach(self.teacher, cut, self.dm.image_shape)
        return {"cut": cut, "rows": [list(s) for s in share_rows(reach.out_shape[1], self.capacities())]}

    def latency_seconds(self, cut: int) -> float:
        """Modelled seconds per image for a cut: the slowest device's compute and upload (in the transport
        dtype), then the host's compute of the rest. Device i runs at ``device_gmacs`` x its capacity."""
        o, shape = self.opts, self.dm.image_shape
        bits = 16 if self.config["export"]["transport"] == "fp16" else 32
        _, devices, host = self._split(cut, None)
        slowest = max(count_macs(d, shape) / (o["device_gmacs"] * 1e9 * cap) + d.out_width * bits / (o["link_mbps"] * 1e6)
                      for d, cap in zip(devices, self.capacities()))
        return slowest + count_macs(CombineRule(host), (sum(host.widths),)) / (o["host_gmacs"] * 1e9)

    def _split(self, cut: int, rows: Sequence[Sequence[int]] | None) -> tuple[Reach, list[RowDevice], RowStitcher]:
        """The reach of the first ``cut`` layers, the devices for ``rows`` (None: shared by capacity) and the host."""
        reach = layer_reach(self.teacher, cut, self.dm.image_shape)
        rows = share_rows(reach.out_shape[1], self.capacities()) if rows is None else rows
        devices = [RowDevice(self.teacher, cut, reach, (a, b), self.dm.image_shape[1]) for a, b in rows]
        return reach, devices, RowStitcher(self.teacher, cut, [d.out_shape for d in devices])

    def build(self, plan: dict) -> GatherModel:
        _, devices, host = self._split(plan["cut"], plan["rows"])
        model = GatherModel(devices, host, self.dm.num_classes).eval()
        with torch.no_grad():
            images = self.dm.train[0][:FILL_IMAGES].float().div(255.0)
            host.fill.copy_(model.vectors(images).mean(dim=0))
        return model

    def device_entries(self, plan: dict) -> list[dict]:
        arch = self.config["teacher"]["arch"]
        return [{"arch": f"{arch} layers 0-{plan['cut'] - 1}, map rows {d.span[0]}-{d.span[1] - 1}",
                 "image_rows": [d.lo, d.hi], "halo_rows": d.halo_rows}
                for d in self._split(plan["cut"], plan["rows"])[1]]

    def describe(self, plan: dict) -> dict:
        reach, devices, _ = self._split(plan["cut"], plan["rows"])
        height = self.dm.image_shape[1]
        return {"cut_after_layer": plan["cut"] - 1, "map_rows": plan["rows"], "cut_map_shape": list(reach.out_shape),
                "image_rows": [[d.lo, d.hi] for d in devices],
                # rows each device computes beyond its share of the image, over the image's height
                "halo_overhead": [round((d.hi - d.lo) / ((d.span[1] - d.span[0]) * reach.stride) - 1, 4)
                                  for d in devices],
                "redundant_image_rows": sum(d.hi - d.lo for d in devices) - height,
                "modelled_latency_ms": round(1000 * self.latency_seconds(plan["cut"]), 3),
                "latency_model": {k: self.opts[k] for k in ("device_gmacs", "host_gmacs", "link_mbps")}}

    def summary(self, plan: dict) -> str:
        return f"cut after teacher layer {plan['cut'] - 1}, map rows {plan['rows']}"
