"""Each loss against values worked out by hand."""
from __future__ import annotations

import math

import pytest
import torch

from distill.losses import (AttentionTransferPaper, AttentionTransferPrototype, CrossEntropy, DistillBatch,
                            KnowledgeDistillation, build_losses)

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


def test_attention_transfer_paper_form():
    # student 0 map (1 channel, 1x2) [1, 0] -> attention [1, 0]; teacher filter 1 = [0, 2] -> [0, 1]
    # squared distance 2. Student 1 matches teacher filter 0 exactly -> 0. Total beta * 2.
    teacher = torch.tensor([[[[3.0, 4.0]], [[0.0, 2.0]]]])  # [1, 2 filters, 1, 2]
    s0 = torch.tensor([[[[1.0, 0.0]]]])
    s1 = torch.tensor([[[[6.0, 8.0]]]])  # proportional to teacher filter 0: same normalised attention
    b = batch([[0.0, 0.0]], [[0.0, 0.0]], [s0, s1], teacher, [[1], [0]])
    assert AttentionTransferPaper(beta=5.0)(b).item() == pytest.approx(10.0, abs=1e-5)


def test_attention_transfer_prototype_form():
    # concatenated student maps: channels [1,0] and [0,0] -> mean of squares [0.5, 0] -> normalised [1, 0]
    # teacher filters picked in partition order [1, 0]: [0,2] and [3,4] -> mean squares [4.5, 10] ->
    # normalised [0.41036, 0.91192]; MSE over 2 positions = ((1-0.41036)^2 + 0.91192^2) / 2 = 0.58964
    teacher = torch.tensor([[[[3.0, 4.0]], [[0.0, 2.0]]]])
    s0, s1 = torch.tensor([[[[1.0, 0.0]]]]), torch.tensor([[[[0.0, 0.0]]]])
    b = batch([[0.0, 0.0]], [[0.0, 0.0]], [s0, s1], teacher, [[1], [0]])
    assert AttentionTransferPrototype(beta=1.0)(b).item() == pytest.approx(0.589641, abs=1e-5)


def test_registry_builds_named_losses_and_refuses_unknown():
    losses = build_losses({"kd": {"alpha": 0.5}, "at_paper": {"beta": 10}})
    assert list(losses) == ["kd", "at_paper"] and losses["kd"].alpha == 0.5
    with pytest.raises(ValueError, match="unknown loss 'fitnet'"):
        build_losses({"fitnet": {}})
    with pytest.raises(ValueError, match="distill.losses.kd: bad options"):
        build_losses({"kd": {"gamma": 1}})
