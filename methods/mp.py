"""Model parallelism: the teacher itself cut layer-wise at MAC-balanced points, one segment per device.
Each device sends its whole feature map to the next; nothing is trained, and any failed device
leaves the chain without an answer."""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from bundle.export import export_chain
from methods.base import Method, register
from students.model_parallel import split_modules


@register
class ModelParallel(Method):
    name = "mp"
    label = "model parallelism (teacher split layer-wise)"
    sends = "its whole feature map to the next device"
    options = {"devices": 2}
    trains = False
    mp_baseline = False  # it is that split
    transports = ("fp32",)

    @classmethod
    def check_options(cls, opts: dict) -> None:
        if opts["devices"] < 1:
            raise ValueError(f"method_options.mp.devices = {opts['devices']}: must be at least 1")

    def plan(self) -> dict:
        return {"devices": self.opts["devices"]}

    def build(self, plan: dict) -> nn.Sequential:
        return nn.Sequential(*split_modules(self.teacher, plan["devices"], self.dm.image_shape))

    def device_entries(self, plan: dict) -> list[dict]:
        return [{"arch": f"{self.config['teacher']['arch']} layers {s.layer_span}"} for s in self.build(plan)]

    def describe(self, plan: dict) -> dict:
        return {"layers": [s.layer_span for s in self.build(plan)]}

    def summary(self, plan: dict) -> str:
        return f"teacher layers {', '.join(self.describe(plan)['layers'])}"

    def export(self, model: nn.Module, plan: dict, out_dir: Path, calibration: torch.Tensor, extra: dict) -> dict:
        return export_teacher_chain(self, len(model), out_dir, calibration, extra)


def export_teacher_chain(method: Method, num_devices: int, out_dir: Path, calibration: torch.Tensor,
                         extra: dict) -> dict:
    """The teacher's MAC-balanced chain bundle over ``num_devices``; the export stage also writes one beside
    every other method's bundle (``export_mp/``), the baseline its report compares bytes against."""
    dm, arch = method.dm, method.config["teacher"]["arch"]
    segments = split_modules(method.teacher, num_devices, dm.image_shape)
    return export_chain(segments, out_dir, image_shape=dm.image_shape, class_names=dm.class_names,
                        calibration_images=calibration, opset=method.config["export"]["opset"],
                        device_entries=[{"arch": f"{arch} layers {s.layer_span}"} for s in segments],
                        extra={**extra, "method": "mp", "teacher_arch": arch})
