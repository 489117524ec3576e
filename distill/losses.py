"""Distillation losses, each a small named component chosen by ``distill.losses`` in the config.

Every loss takes the same :class:`DistillBatch` and returns a scalar; the total loss is their sum.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class DistillBatch:
    student_logits: torch.Tensor        # [N, classes]
    teacher_logits: torch.Tensor        # [N, classes]
    student_maps: Sequence[torch.Tensor]  # K maps [N, |P_i|, h, w]
    teacher_map: torch.Tensor           # [N, F, h, w]
    partitions: Sequence[torch.Tensor]  # K index tensors into the teacher's F filters
    labels: torch.Tensor                # [N]


class CrossEntropy(nn.Module):
    """Plain supervised loss (the scratch baseline)."""

    def forward(self, b: DistillBatch) -> torch.Tensor:
        return F.cross_entropy(b.student_logits, b.labels)


class KnowledgeDistillation(nn.Module):
    """Hinton KD: alpha * T^2 * KL(p_t^T || p_s^T) + (1 - alpha) * CE(z_s, y).

    KL uses ``batchmean`` (the true KL per example), not the NoNN prototype's element-wise mean,
    which silently divides the soft term by the number of classes.
    """

    def __init__(self, alpha: float = 0.9, temperature: float = 4.0) -> None:
        super().__init__()
        self.alpha, self.temperature = float(alpha), float(temperature)

    def forward(self, b: DistillBatch) -> torch.Tensor:
        t = self.temperature
        student, teacher = b.student_logits.float(), b.teacher_logits.float()  # fp32 even under bf16 autocast
        soft = F.kl_div(F.log_softmax(student / t, dim=1), F.log_softmax(teacher / t, dim=1),
                        reduction="batchmean", log_target=True)
        return self.alpha * t * t * soft + (1.0 - self.alpha) * F.cross_entropy(student, b.labels)


def _unit_rows(x: torch.Tensor) -> torch.Tensor:
    """Each image's whole tensor flattened and L2-normalised: [N, ...] -> [N, D]."""
    return F.normalize(x.float().flatten(1), dim=1)


class FilterTransfer(nn.Module):
    """NoNN's activation transfer, the prototype's reduction (``actTransfer_loss`` in student.py).

    The K student maps are concatenated along channels and the teacher's final map is restricted to
    the partition filters in the same order, so channel j of student i learns teacher filter P_i[j].
    Each image's [channels x h x w] tensor is flattened and L2-normalised; the loss is
    beta * mean over all elements of the squared difference.
    """

    def __init__(self, beta: float = 1.0e4) -> None:
        super().__init__()
        self.beta = float(beta)

    def forward(self, b: DistillBatch) -> torch.Tensor:
        student = torch.cat(list(b.student_maps), dim=1)
        teacher = b.teacher_map.index_select(1, torch.cat(list(b.partitions)))
        return self.beta * (_unit_rows(student) - _unit_rows(teacher)).pow(2).mean()


class FilterTransferPerStudent(nn.Module):
    """Filter-level transfer normalised per student: beta * sum_i mean (S_i/|S_i| - T[P_i]/|T[P_i]|)^2.

    Unlike :class:`FilterTransfer`, one student's scale cannot crowd out another's: each device's
    map is matched to its own filters on its own.
    """

    def __init__(self, beta: float = 1.0e4) -> None:
        super().__init__()
        self.beta = float(beta)

    def forward(self, b: DistillBatch) -> torch.Tensor:
        total = b.teacher_map.new_zeros((), dtype=torch.float32)
        for smap, idx in zip(b.student_maps, b.partitions):
            total = total + (_unit_rows(smap) - _unit_rows(b.teacher_map.index_select(1, idx))).pow(2).mean()
        return self.beta * total


def attention_map(fmap: torch.Tensor) -> torch.Tensor:
    """F(A) = sum_c |A_c|^2 over channels, flattened and L2-normalised (Zagoruyko & Komodakis)."""
    return F.normalize(fmap.float().pow(2).sum(dim=1).flatten(1), dim=1)


class AttentionMapTransfer(nn.Module):
    """Attention-map transfer, one map per student: beta * sum_i mean_n || F(S_i) - F(T[P_i]) ||^2.

    An ablation, not NoNN's loss: summing over channels erases which channel is which, so the
    partition hardly matters to it.
    """

    def __init__(self, beta: float = 10.0) -> None:
        super().__init__()
        self.beta = float(beta)

    def forward(self, b: DistillBatch) -> torch.Tensor:
        total = b.teacher_map.new_zeros((), dtype=torch.float32)
        for smap, idx in zip(b.student_maps, b.partitions):
            diff = attention_map(smap) - attention_map(b.teacher_map.index_select(1, idx))
            total = total + diff.pow(2).sum(dim=1).mean()
        return self.beta * total


class AttentionMapTransferConcat(nn.Module):
    """Attention maps of the concatenated student maps (channel mean of squares), mean squared error.
    An ablation, like :class:`AttentionMapTransfer`."""

    def __init__(self, beta: float = 1.0e4) -> None:
        super().__init__()
        self.beta = float(beta)

    def forward(self, b: DistillBatch) -> torch.Tensor:
        student = torch.cat(list(b.student_maps), dim=1)
        teacher = b.teacher_map.index_select(1, torch.cat(list(b.partitions)))
        student_at = F.normalize(student.float().pow(2).mean(dim=1).flatten(1), dim=1)
        teacher_at = F.normalize(teacher.float().pow(2).mean(dim=1).flatten(1), dim=1)
        return self.beta * (student_at - teacher_at).pow(2).mean()


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
    if not spec:
        raise ValueError(f"distill.losses is empty; name at least one of: {', '.join(LOSSES)}")
    losses = nn.ModuleDict()
    for name, options in spec.items():
        if name not in LOSSES:
            raise ValueError(f"distill.losses: unknown loss {name!r}; choose from {', '.join(LOSSES)}")
        try:
            losses[name] = LOSSES[name](**(options or {}))
        except TypeError as e:
            raise ValueError(f"distill.losses.{name}: bad options {options!r} ({e})") from e
    return losses
