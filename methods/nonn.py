"""NoNN (the default): K students, each learning one community of the teacher's final-layer filters,
trained jointly with one shared classifier over their pooled vectors. The plan is the partition stage's."""
from __future__ import annotations

from distill.modules import NoNNModule
from methods.base import Method, register
from partitioning.artifacts import read_partition
from students.unified import UnifiedStudent, device_archs


@register
class NoNN(Method):
    name = "nonn"
    label = "NoNN"
    sends = "its pooled feature vector (one number per teacher filter it learned)"
    uses_partition = True
    transports = ("fp32", "fp16", "int8")

    def plan(self) -> dict:
        return {"partitions": self.partition_file()["partitions"]}

    def partition_file(self) -> dict:

        return read_partition(self.setting.run_dir / "partition" / "partition.json",
                              teacher_sha256=self.setting.teacher_sha256,
                              num_filters=self.teacher.feature_channels)

    def check_plan(self, plan: dict) -> None:
        if plan != self.plan():
            raise RuntimeError(f"{self.setting.run_dir / 'partition' / 'partition.json'} no longer lists the filters "
                               "the students were trained on; rerun `nonn distill` (or `nonn run`)")

    def archs(self, k: int) -> list[str]:
        """One architecture per device, from ``distill.students``."""
        return device_archs(self.config["distill"]["students"], k)

    def build(self, plan: dict) -> UnifiedStudent:
        return self._build([len(p) for p in plan["partitions"]])

    def _build(self, widths: list[int]) -> UnifiedStudent:
        dm = self.dm
        return UnifiedStudent.build(self.config["distill"]["students"], widths, dm.image_shape[0], dm.num_classes,
                                    dm.mean, dm.std, self.teacher.map_size(dm.image_shape))

    def module(self, model: UnifiedStudent, plan: dict) -> NoNNModule:
        d = self.config["distill"]
        return NoNNModule(self.teacher, model, plan.get("partitions", []), d["losses"], d, self.dm.num_classes,
                          self.channels_last, plan)

    def device_entries(self, plan: dict) -> list[dict]:
        return [{"arch": arch, "teacher_filters": list(p)}
                for arch, p in zip(self.archs(len(plan["partitions"])), plan["partitions"])]

    def describe(self, plan: dict) -> dict:
        return {"partition_mode": self.config["partition"]["mode"],
                "partition_sizes": [len(p) for p in plan["partitions"]]}

    def summary(self, plan: dict) -> str:
        return f"{self.config['partition']['mode']} partition, sizes {[len(p) for p in plan['partitions']]}"
