"""Distillation losses, each a small named component chosen by ``distill.losses`` in the config.

Every loss takes the same :class:`DistillBatch` and returns a scalar; the total loss is their sum.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class DistillBatch:
    student_logits: torch.Tensor        # [N, classes]
    teacher_logits: torch.Tensor | None  # [N, classes]; None when no loss reads the teacher
    student_maps: Sequence[torch.Tensor]  # K maps [N, |P_i|, h, w]
    teacher_map: torch.Tensor | None    # [N, F, h, w]
    partitions: Sequence[torch.Tensor]  # K index tensors into the teacher's F filters
    labels: torch.Tensor                # [N]
    progress: float = 0.0               # fraction of training done, in [0, 1]: weight schedules read it


class CrossEntropy(nn.Module):
    """Plain supervised loss (the scratch baseline)."""

    reads_teacher = False
    reads_maps = False

    def forward(self, b: DistillBatch) -> torch.Tensor:
        return F.cross_entropy(b.student_logits, b.labels)


def _number(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} = {value!r} must be a finite number")
    return float(value)


def check_kd_options(alpha: object, temperature: object) -> tuple[float, float]:
    """KD's weight and temperature, refused outside 0 <= alpha <= 1 and temperature > 0 (a zero
    temperature divides the logits by zero and trains on NaN)."""
    alpha, temperature = _number("alpha", alpha), _number("temperature", temperature)
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha = {alpha} must be in [0, 1] (the soft term's share of the loss)")
    if temperature <= 0:
        raise ValueError(f"temperature = {temperature} must be above 0")
    return alpha, temperature


class KnowledgeDistillation(nn.Module):
    """Hinton KD: alpha * T^2 * KL(p_t^T || p_s^T) + (1 - alpha) * CE(z_s, y).

    KL uses ``batchmean`` (the true KL per example), not the NoNN prototype's element-wise mean,
    which silently divides the soft term by the number of classes.
    """

    reads_teacher = True
    reads_maps = False

    def __init__(self, alpha: float = 0.9, temperature: float = 4.0) -> None:
        super().__init__()
        self.alpha, self.temperature = check_kd_options(alpha, temperature)

    def forward(self, b: DistillBatch) -> torch.Tensor:
        t = self.temperature
        student, teacher = b.student_logits.float(), b.teacher_logits.float()  # fp32 even under bf16 autocast
        soft = F.kl_div(F.log_softmax(student / t, dim=1), F.log_softmax(teacher / t, dim=1),
                        reduction="batchmean", log_target=True)
        return self.alpha * t * t * soft + (1.0 - self.alpha) * F.cross_entropy(student, b.labels)


def _unit_rows(x: torch.Tensor) -> torch.Tensor:
    """Each image's whole tensor flattened and L2-normalised: [N, ...] -> [N, D]."""
    return F.normalize(x.float().flatten(1), dim=1)


def attention_map(fmap: torch.Tensor) -> torch.Tensor:
    """F(A) = sum_c |A_c|^2 over channels, flattened and L2-normalised (Zagoruyko & Komodakis)."""
    return F.normalize(fmap.float().pow(2).sum(dim=1).flatten(1), dim=1)


def _mean_squared(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return (s - t).pow(2).mean()


def _squared_distance(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Per-image squared L2 distance, averaged over the batch."""
    return (s - t).pow(2).sum(dim=1).mean()


# beta's schedule over training: the weight's factor at progress p in [0, 1]
BETA_SCHEDULES: dict[str, Callable[[float], float]] = {
    "constant": lambda p: 1.0,
    "linear": lambda p: 1.0 - p,                              # decays to 0 at the end
    "cosine": lambda p: 0.5 * (1.0 + math.cos(math.pi * p)),  # decays to 0 at the end, slowly at first
}


class _Transfer(nn.Module):
    """What every transfer loss shares: a signal of the student maps matched to the same signal of the
    teacher's partition filters (in partition order), either per student and summed, or once over
    the K maps concatenated along channels; beta * distance, beta following ``schedule`` over training
    (constant, or decaying to 0: the transfer guides early training and leaves the end to KD)."""

    reads_teacher = True
    reads_maps = True
    per_student: bool
    signal: Callable[[torch.Tensor], torch.Tensor]
    distance: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    default_beta: float

    def __init__(self, beta: float | None = None, schedule: str = "constant") -> None:
        super().__init__()
        if schedule not in BETA_SCHEDULES:
            raise ValueError(f"beta schedule {schedule!r}; choose one of {', '.join(BETA_SCHEDULES)}")
        self.beta = _number("beta", self.default_beta if beta is None else beta)
        if self.beta < 0:
            raise ValueError(f"beta = {self.beta} must be 0 or more")
        self.schedule = schedule

    def forward(self, b: DistillBatch) -> torch.Tensor:
        pairs = list(zip(b.student_maps, b.partitions)) if self.per_student else \
            [(torch.cat(list(b.student_maps), dim=1), torch.cat(list(b.partitions)))]
        total = b.teacher_map.new_zeros((), dtype=torch.float32)
        for smap, idx in pairs:
            total = total + self.distance(self.signal(smap), self.signal(b.teacher_map.index_select(1, idx)))
        return self.beta * BETA_SCHEDULES[self.schedule](min(max(b.progress, 0.0), 1.0)) * total


class FilterTransfer(_Transfer):
    """NoNN's activation transfer, the prototype's reduction (``actTransfer_loss`` in student.py).

    The K student maps are concatenated along channels and the teacher's final map is restricted to
    the partition filters in the same order, so channel j of student i learns teacher filter P_i[j].
    Each image's [channels x h x w] tensor is flattened and L2-normalised; the loss is
    beta * mean over all elements of the squared difference.
    """

    per_student = False
    signal = staticmethod(_unit_rows)
    distance = staticmethod(_mean_squared)
    default_beta = 1.0e4


class FilterTransferPerStudent(_Transfer):
    """Filter-level transfer normalised per student: beta * sum_i mean (S_i/|S_i| - T[P_i]/|T[P_i]|)^2.

    Unlike :class:`FilterTransfer`, one student's scale cannot crowd out another's: each device's
    map is matched to its own filters on its own.
    """

    per_student = True
    signal = staticmethod(_unit_rows)
    distance = staticmethod(_mean_squared)
    default_beta = 1.0e4


class AttentionMapTransfer(_Transfer):
    """Attention-map transfer, one map per student: beta * sum_i mean_n || F(S_i) - F(T[P_i]) ||^2.

    An ablation, not NoNN's loss: summing over channels erases which channel is which, so the
    partition hardly matters to it.
    """

    per_student = True
    signal = staticmethod(attention_map)
    distance = staticmethod(_squared_distance)
    default_beta = 10.0


class AttentionMapTransferConcat(_Transfer):
    """Attention map of the concatenated student maps, mean squared error over positions.
    An ablation, like :class:`AttentionMapTransfer`."""

    per_student = False
    signal = staticmethod(attention_map)
    distance = staticmethod(_mean_squared)
    default_beta = 1.0e4


LOSSES: dict[str, Callable[..., nn.Module]] = {
    "ce": CrossEntropy,
    "kd": KnowledgeDistillation,
    "filter_transfer": FilterTransfer,
    "filter_transfer_per_student": FilterTransferPerStudent,
    "attention_map": AttentionMapTransfer,
    "attention_map_concat": AttentionMapTransferConcat,
}


def build_losses(spec: dict) -> nn.ModuleDict:
    """``{"kd": {"alpha": 0.9}, "filter_transfer": {"beta": 1e4}}`` -> named loss modules."""
    if not spec or not isinstance(spec, dict):
        raise ValueError(f"distill.losses must name at least one loss with its options, e.g. "
                         f"{{kd: {{alpha: 0.9}}}}; got {spec!r} (choose from {', '.join(LOSSES)})")
    losses = nn.ModuleDict()
    for name, options in spec.items():
        if options is not None and not isinstance(options, dict):
            raise ValueError(f"distill.losses.{name}: options must be a mapping such as {{beta: 1000.0}}, "
                             f"got {options!r}")
        if name not in LOSSES:
            raise ValueError(f"distill.losses: unknown loss {name!r}; choose from {', '.join(LOSSES)}")
        try:
            losses[name] = LOSSES[name](**(options or {}))
        except (TypeError, ValueError) as e:
            raise ValueError(f"distill.losses.{name}: bad options {options!r} ({e})") from e
    return losses
