"""Class parallelism: the classes split into K groups, one device per group scoring only its own
classes. The aggregator puts the scores back in class order; a lost device loses its classes (they
get a score no class can lose to). Trained jointly: CE over the assembled scores, plus KD from the
teacher's logits restricted to each group."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from distill.losses import check_kd_options
from distill.modules import DistillModule
from methods.base import Method, register
from students.networks import FeatureClassifier, batched
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


class GroupDistillation(nn.Module):
    """(1 - alpha) CE over the assembled scores + alpha T^2 sum_i KL(teacher's group-i logits || device i's),
    each at temperature T over its own group's classes; alpha = 0 is CE alone."""

    def __init__(self, alpha: float = 0.9, temperature: float = 4.0) -> None:  # the kd loss's defaults
        super().__init__()
        self.alpha, self.temperature = check_kd_options(alpha, temperature)

    def forward(self, scores: list[torch.Tensor], combined: torch.Tensor, teacher_logits: torch.Tensor | None,
                groups: list[torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
        loss = (1.0 - self.alpha) * F.cross_entropy(combined, labels)
        if self.alpha > 0:
            t = self.temperature
            for s, g in zip(scores, groups):
                soft = F.kl_div(F.log_softmax(s.float() / t, dim=1),
                                F.log_softmax(teacher_logits.index_select(1, g).float() / t, dim=1),
                                reduction="batchmean", log_target=True)
                loss = loss + self.alpha * t * t * soft
        return loss


class ClassGroupModule(DistillModule):
    def __init__(self, model: GatherModel, plan: dict, loss: GroupDistillation, optim_cfg: dict, num_classes: int,
                 teacher: FeatureClassifier, channels_last: bool) -> None:
        super().__init__(model, plan, optim_cfg, num_classes, teacher if loss.alpha > 0 else None, channels_last)
        self.loss = loss
        for i, g in enumerate(plan["groups"]):
            self.register_buffer(f"group_{i}", torch.tensor(g, dtype=torch.long), persistent=False)

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        x, y, t = self.unpack(batch)
        teacher_logits = None if t is None else t.logits
        scores = [d(x) for d in self.model.devices]
        combined = self.model.aggregator.combine(torch.cat(scores, dim=1))
        groups = [getattr(self, f"group_{i}") for i in range(len(scores))]
        loss = self.loss(scores, combined, teacher_logits, groups, y)
        self.log("train/loss", loss, prog_bar=True)
        return loss


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

    def module(self, model: GatherModel, plan: dict) -> ClassGroupModule:
        losses = self.config["distill"]["losses"]
        kd = losses.get("kd")
        loss = GroupDistillation(**(kd or {})) if kd is not None else GroupDistillation(0.0, 1.0)
        return ClassGroupModule(model, plan, loss, self.optim, self.dm.num_classes, self.teacher, self.channels_last)

    def device_entries(self, plan: dict) -> list[dict]:
        names = self.dm.class_names
        return [{"arch": self.opts["arch"], "classes": g, "class_names": [names[c] for c in g]} for g in plan["groups"]]

    def describe(self, plan: dict) -> dict:
        return {"grouping": self.opts["grouping"], "groups": plan["groups"]}

    def summary(self, plan: dict) -> str:
        return f"{self.opts['grouping']} class groups {plan['groups']}"
