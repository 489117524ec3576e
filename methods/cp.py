"""Class parallelism: the classes split into K groups, one device per group scoring only its own
classes. The aggregator puts the scores back in class order; a lost device loses its classes (they
get a score no class can lose to). Trained jointly: the registered logit losses (KD by default; CE
alone, or any other that reads logits) on the assembled class scores, the answer the aggregator gives."""
from __future__ import annotations

import torch

from distill.modules import LogitLossModule
from methods.base import Method, register
from students.networks import batched
from students.registry import build_model
from students.split import Combiner, GatherModel, LogitDevice

LOST_CLASS_SCORE = -1.0e4  # what a missing device's classes score (finite, so fp16 transport keeps it)
GROUPINGS = ("contiguous", "confusion")


class ClassGroups(Combiner):
    """The concatenated group scores, reordered into class order."""

    kind = "class_groups"

    def __init__(self, groups: list[list[int]]) -> None:
        super().__init__([len(g) for g in groups])
        flat = [c for g in groups for c in g]
        self.register_buffer("order", torch.tensor([flat.index(c) for c in range(len(flat))], dtype=torch.long))

    def fill_vector(self) -> torch.Tensor:
        return torch.full((sum(self.widths),), LOST_CLASS_SCORE)

    def combine(self, z: torch.Tensor) -> torch.Tensor:
        return z.float().index_select(1, self.order)


def group_classes(num_classes: int, k: int, grouping: str, confusion: torch.Tensor | None = None) -> list[list[int]]:
    """K groups whose sizes differ by at most one: consecutive classes, or classes the teacher confuses
    placed together (pairs by decreasing mutual confusion, each class where its confusions already are),
    so the hard distinctions are made on one device."""
    sizes = [num_classes // k + (1 if i < num_classes % k else 0) for i in range(k)]
    if grouping == "contiguous":
        bounds = [sum(sizes[:i]) for i in range(k + 1)]
        return [list(range(a, b)) for a, b in zip(bounds[:-1], bounds[1:])]
    mutual = (confusion + confusion.T).double()
    groups: list[list[int]] = [[] for _ in range(k)]
    placed: dict[int, int] = {}

    def best_group(classes: list[int]) -> int | None:
        fits = [g for g in range(k) if sizes[g] - len(groups[g]) >= len(classes)]
        return max(fits, key=lambda g: (float(mutual[classes][:, groups[g]].sum()) if groups[g] else 0.0,
                                        sizes[g] - len(groups[g]), -g), default=None)

    def put(c: int, g: int) -> None:
        groups[g].append(c)
        placed[c] = g

    pairs = sorted(((float(mutual[a, b]), a, b) for a in range(num_classes) for b in range(a + 1, num_classes)),
                   key=lambda p: (-p[0], p[1], p[2]))
    for weight, a, b in pairs:
        if weight <= 0:
            break
        if a not in placed and b not in placed and (g := best_group([a, b])) is not None:
            put(a, g)
            put(b, g)
        elif (a in placed) != (b in placed):
            other, g = (b, placed[a]) if a in placed else (a, placed[b])
            if len(groups[g]) < sizes[g]:
                put(other, g)
    for c in range(num_classes):
        if c not in placed:
            put(c, best_group([c]))
    return sorted(sorted(g) for g in groups)


@register
class ClassParallel(Method):
    name = "cp"
    label = "class parallelism"
    sends = "the scores of its own classes"
    options = {"groups": 2, "grouping": "contiguous", "arch": "wrn_10_1"}
    takes_maps = False  # its devices score their own classes: no map to compare with the teacher's
    default_losses = {"kd": {"alpha": 0.9, "temperature": 4.0}}

    @classmethod
    def check_options(cls, opts: dict) -> None:
        if opts["groups"] < 1:
            raise ValueError(f"method_options.cp.groups = {opts['groups']}: must be at least 1")
        if opts["grouping"] not in GROUPINGS:
            raise ValueError(f"method_options.cp.grouping = {opts['grouping']!r}; choose one of {', '.join(GROUPINGS)}")

    def plan(self) -> dict:

        dm, k = self.dm, self.opts["groups"]
        if k > dm.num_classes:
            raise ValueError(f"method_options.cp.groups = {k}: more groups than the {dm.num_classes} classes")
        confusion = None
        if self.opts["grouping"] == "confusion":  # the teacher's confusions on the validation split
            images, labels = dm.val[0].float().div(255.0), dm.val[1]
            pred = batched(self.teacher.eval(), images).argmax(1)
            confusion = torch.zeros(dm.num_classes, dm.num_classes)
            confusion.index_put_((labels, pred), torch.ones(len(labels)), accumulate=True)
            confusion.fill_diagonal_(0)
        return {"groups": group_classes(dm.num_classes, k, self.opts["grouping"], confusion)}

    def build(self, plan: dict) -> GatherModel:
        dm = self.dm
        devices = [LogitDevice(build_model(self.opts["arch"], dm.image_shape[0], len(g), dm.mean, dm.std))
                   for g in plan["groups"]]
        return GatherModel(devices, ClassGroups(plan["groups"]), dm.num_classes)

    def module(self, model: GatherModel, plan: dict) -> LogitLossModule:
        """The losses read the assembled class scores, the answer the aggregator gives."""
        return LogitLossModule(model, plan, self.config["distill"]["losses"], self.optim, self.dm.num_classes,
                               self.teacher, self.channels_last)

    def device_entries(self, plan: dict) -> list[dict]:
        names = self.dm.class_names
        return [{"arch": self.opts["arch"], "classes": g, "class_names": [names[c] for c in g]} for g in plan["groups"]]

    def describe(self, plan: dict) -> dict:
        return {"grouping": self.opts["grouping"], "groups": plan["groups"]}

    def summary(self, plan: dict) -> str:
        return f"{self.opts['grouping']} class groups {plan['groups']}"
