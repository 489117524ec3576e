"""HALP's row split: for any cut and any share of rows, the devices' stitched segments equal the
teacher's map exactly, and the host's answer equals the teacher's."""
from __future__ import annotations

import pytest
import torch

from methods.halp import RowDevice, RowStitcher, layer_reach, share_rows
from students.registry import build_model
from students.split import GatherModel


def _teacher(arch: str, channels: int) -> torch.nn.Module:
    torch.manual_seed(0)
    model = build_model(arch, channels, 10, [0.5] * channels, [0.25] * channels).eval()
    for m in model.modules():  # statistics far from the identity, so a wrong row shows
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.bias.data.uniform_(-0.2, 0.2)
    return model


@pytest.mark.parametrize("arch, shape", [("wrn_16_2", (1, 28, 28)), ("resnet20", (3, 32, 32)),
                                         ("mobilenetv2_x0.25", (3, 32, 32))])
@pytest.mark.parametrize("capacities", [[1, 1], [1, 2, 1]])
def test_stitched_rows_are_the_teachers_at_every_cut(arch, shape, capacities):
    model = _teacher(arch, shape[0])
    x = torch.rand(4, *shape)
    layers = len(list(model.body.children()))
    every = 4 if layers > 12 else 1  # MobileNetV2's 19 layers: every 4th cut keeps the test short
    with torch.no_grad():
        expected = model(x)
        for cut in range(1, layers + 1, every):
            reach = layer_reach(model, cut, shape)
            if reach.out_shape[1] < len(capacities):
                continue
            devices = [RowDevice(model, cut, reach, span, shape[1]) for span in share_rows(reach.out_shape[1], capacities)]
            split = GatherModel(devices, RowStitcher(model, cut, [d.out_shape for d in devices]), 10)
            assert torch.allclose(split(x), expected, atol=1e-5, rtol=0), (arch, cut)


def test_early_cuts_need_a_halo_of_a_few_rows_only():
    model = _teacher("wrn_16_2", 3)
    reach = layer_reach(model, 1, (3, 32, 32))  # the stem: one 3x3 conv
    assert (reach.up, reach.down, reach.stride) == (1, 1, 1)
    top, bottom = [RowDevice(model, 1, reach, span, 32) for span in share_rows(32, [1, 1])]
    assert (top.lo, top.hi, bottom.lo, bottom.hi) == (0, 17, 15, 32)
    # stage 2 opens with a stride-2 conv: 1 (stem) + 4 (stage 1) + 1 + 2 (first block of stage 2) rows
    assert layer_reach(model, 4, (3, 32, 32)).up == 8


def test_rows_are_shared_by_capacity():
    assert share_rows(14, [1, 1]) == [(0, 7), (7, 14)]
    assert share_rows(7, [1, 1]) == [(0, 4), (4, 7)]
    assert share_rows(8, [1, 3]) == [(0, 2), (2, 8)]
    assert share_rows(3, [1, 1, 100]) == [(0, 1), (1, 2), (2, 3)]  # each device keeps a row
    with pytest.raises(ValueError, match="too few for 3 devices"):
        share_rows(2, [1, 1, 1])
