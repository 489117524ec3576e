"""Variant parallelism (Asadi & Goudarzi 2023): V lighter variants of one model family, differing in
width and input resolution, each predicting every class on its own device. A device sends only its
top-k (class, probability) pairs, 2k numbers; the aggregator adds the scattered probabilities, so any
non-empty subset of devices still predicts. Trained jointly: each variant's CE, or KD from the teacher.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from distill.modules import LogitLossModule
from methods.base import Method, register
from students.networks import FeatureClassifier
from students.registry import ARCHITECTURES, build_model
from students.split import Combiner, GatherModel

MIN_RESOLUTION = 8  # px: the students' strided stages need at least this much input


class VariantDevice(nn.Module):
    """Images -> resized to this variant's resolution -> classifier -> top-k as [k class indices, k probabilities]."""

    def __init__(self, net: FeatureClassifier, resolution: int, top_k: int) -> None:
        super().__init__()
        self.net = net
        self.resolution = int(resolution)
        self.top_k = int(top_k)
        self.out_width = 2 * self.top_k

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.resolution or x.shape[-2] != self.resolution:
            x = F.interpolate(x, size=(self.resolution, self.resolution), mode="bilinear", align_corners=False)
        return self.net(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        probs, classes = torch.softmax(self.logits(x).float(), dim=1).topk(self.top_k, dim=1)
        return torch.cat([classes.to(probs.dtype), probs], dim=1)


class TopKSum(Combiner):
    """Class scores = the sum over devices of their top-k probabilities, scattered to their classes.
    A missing device sends zeros: no class gets anything from it."""

    kind = "topk_sum"

    def __init__(self, num_devices: int, top_k: int, num_classes: int) -> None:
        super().__init__([2 * top_k] * num_devices)
        self.top_k = int(top_k)
        self.register_buffer("classes", torch.arange(num_classes, dtype=torch.float32))

    def fill_vector(self) -> torch.Tensor:
        return torch.zeros(sum(self.widths))

    def combine(self, z: torch.Tensor) -> torch.Tensor:
        pairs = z.float().reshape(z.shape[0], len(self.widths), 2, self.top_k)
        hits = (pairs[:, :, 0].round().unsqueeze(-1) == self.classes).to(torch.float32)  # [N, V, k, C]
        return (hits * pairs[:, :, 1].unsqueeze(-1)).sum(dim=(1, 2))


class VariantModule(LogitLossModule):
    """Every variant is a whole classifier: the losses read each one's own logits."""

    def loss_logits(self, x: torch.Tensor, batch_idx: int) -> dict[str, torch.Tensor]:
        return {f"variant_{i}": device.logits(x) for i, device in enumerate(self.model.devices)}


@register
class VariantParallel(Method):
    name = "vp"
    label = "variant parallelism"
    sends = "its top-k (class, probability) pairs, 2k numbers"
    # scale: the variant's input side as a fraction of the dataset's (Fashion-MNIST: 1.0 -> 28 px, 0.72 -> 20 px)
    options = {"variants": [{"arch": "wrn_10_1", "scale": 1.0}, {"arch": "wrn_10_1", "scale": 0.72}], "top_k": 3}
    takes_maps = False  # its devices are whole classifiers: no map to compare with the teacher's
    default_losses = {"kd": {"alpha": 0.9, "temperature": 4.0}}

    @classmethod
    def check_options(cls, opts: dict) -> None:
        if not opts["variants"]:
            raise ValueError("method_options.vp.variants is empty; list at least one {arch, resolution}")
        for i, v in enumerate(opts["variants"]):
            if not isinstance(v, dict) or set(v) != {"arch", "scale"}:
                raise ValueError(f"method_options.vp.variants[{i}] = {v!r}: give exactly arch and scale")
            if v["arch"] not in ARCHITECTURES:
                raise ValueError(f"method_options.vp.variants[{i}].arch: unknown architecture {v['arch']!r}; "
                                 f"choose from {', '.join(ARCHITECTURES)}")
            if isinstance(v["scale"], bool) or not isinstance(v["scale"], (int, float)) or not 0 < v["scale"] <= 1:
                raise ValueError(f"method_options.vp.variants[{i}].scale = {v['scale']!r}: "
                                 "a fraction of the input size in (0, 1]")
        if opts["top_k"] < 1:
            raise ValueError(f"method_options.vp.top_k = {opts['top_k']}: must be at least 1")

    def plan(self) -> dict:
        """The variants' resolutions on this data set; options it cannot honour are refused, never clamped,
        so that config.yaml always says what was trained."""
        side, classes, top_k = self.dm.image_shape[-1], self.dm.num_classes, self.opts["top_k"]
        if top_k > classes:
            raise ValueError(f"method_options.vp.top_k = {top_k}: the data set has {classes} classes; "
                             f"choose 1 to {classes}")
        variants = [{"arch": v["arch"], "resolution": round(side * v["scale"])} for v in self.opts["variants"]]
        for i, v in enumerate(variants):
            if v["resolution"] < MIN_RESOLUTION:
                raise ValueError(f"method_options.vp.variants[{i}].scale = {self.opts['variants'][i]['scale']}: "
                                 f"{v['resolution']} px of the data set's {side}; the smallest variant is "
                                 f"{MIN_RESOLUTION} px (scale >= {MIN_RESOLUTION / side:.2f})")
        return {"variants": variants, "top_k": top_k}

    def build(self, plan: dict) -> GatherModel:
        dm = self.dm
        devices = [VariantDevice(build_model(v["arch"], dm.image_shape[0], dm.num_classes, dm.mean, dm.std),
                                 v["resolution"], plan["top_k"]) for v in plan["variants"]]
        return GatherModel(devices, TopKSum(len(devices), plan["top_k"], dm.num_classes), dm.num_classes)

    def module(self, model: GatherModel, plan: dict) -> VariantModule:
        return VariantModule(model, plan, self.config["distill"]["losses"], self.optim, self.dm.num_classes,
                             self.teacher, self.channels_last)

    def device_entries(self, plan: dict) -> list[dict]:
        return [{"arch": f"{v['arch']} @{v['resolution']}px", "resolution": v["resolution"], "top_k": plan["top_k"]}
                for v in plan["variants"]]

    def describe(self, plan: dict) -> dict:
        return {"variants": [f"{v['arch']} @{v['resolution']}px" for v in plan["variants"]], "top_k": plan["top_k"]}

    def summary(self, plan: dict) -> str:
        d = self.describe(plan)
        return f"variants {', '.join(d['variants'])}, top-{d['top_k']}"
