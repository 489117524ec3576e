"""One student with a classifier, on one device: the KD, attention-transfer and scratch baselines.

Built like a NoNN student with K=1 learning every teacher filter in order (so the attention and
filter-level transfer losses apply unchanged); ``distill.losses`` picks KD, AT or plain CE.
"""
from __future__ import annotations

from methods.base import Method, register
from methods.nonn import NoNN


@register
class Single(NoNN):
    name = "single"
    label = "single student"
    sends = "its pooled feature vector to the aggregator's classifier (which could run on the device itself)"
    uses_partition = False

    def plan(self) -> dict:
        return {"partitions": [list(range(self.teacher.feature_channels))]}

    check_plan = Method.check_plan  # NoNN's names the partition file, which a single student does not read

    def describe(self, plan: dict) -> dict:
        return {"losses": sorted(self.config["distill"]["losses"])}

    def summary(self, plan: dict) -> str:
        return f"losses {', '.join(sorted(self.config['distill']['losses']))}"
