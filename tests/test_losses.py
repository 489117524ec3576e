"""Each loss against values worked out by hand."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from distill.losses import (
    AttentionMapTransfer,
    AttentionMapTransferConcat,
    CrossEntropy,
    DistillBatch,
    FilterTransfer,
    FilterTransferPerStudent,
    KnowledgeDistillation,
    build_losses,
)
from distill.modules import LogitLossModule
from methods.cp import ClassGroups
from students.registry import build_model
from students.split import GatherModel, LogitDevice

LN3 = math.log(3.0)


def batch(student_logits, teacher_logits, student_maps=(), teacher_map=None, partitions=(), labels=(1,)):
    return DistillBatch(torch.tensor(student_logits), torch.tensor(teacher_logits), list(student_maps),
                        teacher_map if teacher_map is not None else torch.zeros(1, 1, 1, 1),
                        [torch.tensor(p) for p in partitions], torch.tensor(labels))


def test_cross_entropy():
    # softmax([0, ln 3]) = [0.25, 0.75]; label 1 -> -ln 0.75
    assert CrossEntropy()(batch([[0.0, LN3]], [[0.0, 0.0]])).item() == pytest.approx(0.2876821, abs=1e-6)


def test_kd_soft_term_is_batchmean_kl_scaled_by_t_squared():
    # teacher p = [0.25, 0.75], student q = [0.5, 0.5]: KL(p||q) = 0.25 ln 0.5 + 0.75 ln 1.5 = 0.1308120
    b = batch([[0.0, 0.0], [0.0, 0.0]], [[0.0, LN3], [0.0, LN3]], labels=(1, 1))
    assert KnowledgeDistillation(alpha=1.0, temperature=1.0)(b).item() == pytest.approx(0.1308120, abs=1e-6)
    # T = 2 on logits doubled gives the same distributions, scaled by T^2 = 4
    b2 = batch([[0.0, 0.0]], [[0.0, 2 * LN3]])
    assert KnowledgeDistillation(alpha=1.0, temperature=2.0)(b2).item() == pytest.approx(4 * 0.1308120, abs=1e-5)


def test_kd_mixes_hard_and_soft_terms():
    b = batch([[0.0, 0.0]], [[0.0, LN3]])
    # 0.9 * KL + 0.1 * CE(q=[.5,.5], y=1) = 0.9 * 0.1308120 + 0.1 * ln 2
    assert KnowledgeDistillation(alpha=0.9, temperature=1.0)(b).item() == pytest.approx(
        0.9 * 0.1308120 + 0.1 * math.log(2), abs=1e-6)


def test_attention_map_transfer_per_student():
    # student 0 map (1 channel, 1x2) [1, 0] -> attention [1, 0]; teacher filter 1 = [0, 2] -> [0, 1]
    # squared distance 2. Student 1 matches teacher filter 0 exactly -> 0. Total beta * 2.
    teacher = torch.tensor([[[[3.0, 4.0]], [[0.0, 2.0]]]])  # [1, 2 filters, 1, 2]
    s0 = torch.tensor([[[[1.0, 0.0]]]])
    s1 = torch.tensor([[[[6.0, 8.0]]]])  # proportional to teacher filter 0: same normalised attention
    b = batch([[0.0, 0.0]], [[0.0, 0.0]], [s0, s1], teacher, [[1], [0]])
    assert AttentionMapTransfer(beta=5.0)(b).item() == pytest.approx(10.0, abs=1e-5)


def test_attention_map_transfer_concatenated():
    # concatenated student maps: channels [1,0] and [0,0] -> mean of squares [0.5, 0] -> normalised [1, 0]
    # teacher filters picked in partition order [1, 0]: [0,2] and [3,4] -> mean squares [4.5, 10] ->
    # normalised [0.41036, 0.91192]; MSE over 2 positions = ((1-0.41036)^2 + 0.91192^2) / 2 = 0.58964
    teacher = torch.tensor([[[[3.0, 4.0]], [[0.0, 2.0]]]])
    s0, s1 = torch.tensor([[[[1.0, 0.0]]]]), torch.tensor([[[[0.0, 0.0]]]])
    b = batch([[0.0, 0.0]], [[0.0, 0.0]], [s0, s1], teacher, [[1], [0]])
    assert AttentionMapTransferConcat(beta=1.0)(b).item() == pytest.approx(0.589641, abs=1e-5)


# Teacher [1 image, 2 filters, 1 x 2]: filter 0 = [3, 4], filter 1 = [0, 2]. Student 0 (1 channel) learns
# filter 1, student 1 learns filter 0 (partitions [[1], [0]]).
TEACHER = torch.tensor([[[[3.0, 4.0]], [[0.0, 2.0]]]])


def test_filter_transfer_prototype_reduction():
    # students concatenated: [1, 0 | 0, 0] -> unit [1, 0, 0, 0]; teacher filters in partition order
    # [0, 2 | 3, 4] -> / sqrt(29). Squared distance 1 + (4 + 9 + 16) / 29 = 2, mean over 4 elements 0.5.
    s0, s1 = torch.tensor([[[[1.0, 0.0]]]]), torch.tensor([[[[0.0, 0.0]]]])
    b = batch([[0.0, 0.0]], [[0.0, 0.0]], [s0, s1], TEACHER, [[1], [0]])
    assert FilterTransfer(beta=3.0)(b).item() == pytest.approx(1.5, abs=1e-5)


def test_filter_transfer_per_student():
    # student 0: unit [1, 0] vs filter 1 unit [0, 1] -> squared distance 2, mean over 2 elements 1.0;
    # student 1: all zeros (normalises to zeros) vs filter 0 unit [0.6, 0.8] -> 1, mean 0.5. Sum 1.5.
    s0, s1 = torch.tensor([[[[1.0, 0.0]]]]), torch.tensor([[[[0.0, 0.0]]]])
    b = batch([[0.0, 0.0]], [[0.0, 0.0]], [s0, s1], TEACHER, [[1], [0]])
    assert FilterTransferPerStudent(beta=2.0)(b).item() == pytest.approx(3.0, abs=1e-5)
    # a student map proportional to its filters costs nothing, whatever its scale
    b = batch([[0.0, 0.0]], [[0.0, 0.0]], [TEACHER[:, 1:] * 7, TEACHER[:, :1] * 0.1], TEACHER, [[1], [0]])
    assert FilterTransferPerStudent(beta=2.0)(b).item() == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("loss", [FilterTransfer(), FilterTransferPerStudent()])
def test_filter_transfer_knows_which_channel_is_which(loss):
    """Swapping two channels of a student moves the filter-level loss; attention maps cannot see it."""
    g = torch.Generator().manual_seed(0)
    teacher = torch.rand(2, 6, 3, 3, generator=g)
    parts = [[4, 0, 2], [1, 5, 3]]
    students = [teacher[:, p] + 0.05 * torch.rand(2, 3, 3, 3, generator=g) for p in parts]
    swapped = [students[0][:, [1, 0, 2]], students[1]]
    b, b_swapped = (batch([[0.0, 0.0]] * 2, [[0.0, 0.0]] * 2, s, teacher, parts, labels=(0, 1))
                    for s in (students, swapped))
    assert loss(b_swapped).item() > 10 * loss(b).item()
    for attention in (AttentionMapTransfer(), AttentionMapTransferConcat()):
        assert attention(b_swapped).item() == pytest.approx(attention(b).item(), rel=1e-5)


def test_registry_builds_named_losses_and_refuses_unknown():
    losses = build_losses({"kd": {"alpha": 0.5}, "filter_transfer": {"beta": 10}})
    assert list(losses) == ["kd", "filter_transfer"] and losses["kd"].alpha == 0.5
    assert losses["filter_transfer"].beta == 10.0
    with pytest.raises(ValueError, match="unknown loss 'fitnet'"):
        build_losses({"fitnet": {}})
    with pytest.raises(ValueError, match="distill.losses.kd: bad options"):
        build_losses({"kd": {"gamma": 1}})


@pytest.mark.parametrize("schedule,factors", [("constant", (1.0, 1.0, 1.0)), ("linear", (1.0, 0.75, 0.0)),
                                              ("cosine", (1.0, 0.8535534, 0.0))])
def test_transfer_weight_follows_its_schedule_over_training(schedule, factors):
    """beta * factor(progress): the per-student transfer of ``test_filter_transfer_per_student`` (3.0 at beta 2)."""
    s0, s1 = torch.tensor([[[[1.0, 0.0]]]]), torch.tensor([[[[0.0, 0.0]]]])
    loss = FilterTransferPerStudent(beta=2.0, schedule=schedule)
    for progress, factor in zip((0.0, 0.25, 1.0), factors):
        b = batch([[0.0, 0.0]], [[0.0, 0.0]], [s0, s1], TEACHER, [[1], [0]])
        b.progress = progress
        assert loss(b).item() == pytest.approx(3.0 * factor, abs=1e-5)
    with pytest.raises(ValueError, match="distill.losses.filter_transfer_per_student: bad options"):
        build_losses({"filter_transfer_per_student": {"schedule": "exponential"}})


def test_distill_module_tells_the_losses_how_far_training_is():
    from types import SimpleNamespace

    from distill.modules import DistillModule

    module = DistillModule(torch.nn.Linear(1, 1), {}, {}, 2)
    assert module.progress(3) == 0.0  # outside a Trainer
    module._trainer = SimpleNamespace(max_epochs=4, num_training_batches=10, current_epoch=1)
    assert module.progress(5) == pytest.approx(0.375)  # epoch 1 of 4, half way through it


@pytest.mark.parametrize("spec,message", [
    ({"kd": {"temperature": 0}}, r"distill.losses.kd: bad options .*temperature = 0.0 must be above 0"),
    ({"kd": {"temperature": -2}}, r"temperature = -2.0 must be above 0"),
    ({"kd": {"alpha": 5}}, r"alpha = 5.0 must be in \[0, 1\]"),
    ({"kd": {"alpha": "abc"}}, r"distill.losses.kd: bad options .*alpha = 'abc' must be a finite number"),
    ({"filter_transfer": {"beta": -1}}, r"beta = -1.0 must be 0 or more"),
    ({"kd": [1, 2]}, r"distill.losses.kd: options must be a mapping"),
    (["kd", "ce"], r"distill.losses must name at least one loss"),
    ({}, r"distill.losses must name at least one loss"),
])
def test_loss_options_out_of_range_are_refused_before_training(spec, message):
    with pytest.raises(ValueError, match=message):
        build_losses(spec)


def test_class_groups_train_any_logit_loss_on_the_assembled_scores():
    """CP (through the shared logit-loss module) trains the registered losses on the class scores the
    aggregator assembles: its loss is exactly those losses on ``model(x)``, and CE alone needs no teacher."""
    torch.manual_seed(0)
    groups = [[0, 2], [1, 3]]
    devices = [LogitDevice(build_model("wrn_10_1", 1, 2, [0.5], [0.25])) for _ in groups]
    model = GatherModel(devices, ClassGroups(groups), 4).eval()
    teacher = build_model("wrn_10_1", 1, 4, [0.5], [0.25]).eval()
    x, y = torch.rand(6, 1, 16, 16), torch.tensor([0, 1, 2, 3, 0, 1])
    kd = {"kd": {"alpha": 0.7, "temperature": 3.0}}
    module = LogitLossModule(model, {"groups": groups}, kd, {"lr": 0.1}, 4, teacher, channels_last=False)
    with torch.no_grad():
        expected = KnowledgeDistillation(0.7, 3.0)(DistillBatch(model(x), teacher(x), (), None, (), y))
        assert module.training_step((x, y), 0) == pytest.approx(float(expected), rel=1e-5)
    ce_only = LogitLossModule(model, {"groups": groups}, {"ce": None}, {"lr": 0.1}, 4, teacher, channels_last=False)
    assert ce_only.teacher is None
    with torch.no_grad():
        assert ce_only.training_step((x, y), 0) == pytest.approx(float(F.cross_entropy(model(x), y)), rel=1e-5)
