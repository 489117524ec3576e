"""The unified student splits into device models + aggregator without changing its output."""
from __future__ import annotations

import pytest
import torch

from students.unified import UnifiedStudent


@pytest.fixture
def model() -> UnifiedStudent:
    torch.manual_seed(0)
    m = UnifiedStudent.build(["wrn_10_1", "resnet20"], [5, 7], in_channels=1, num_classes=4, mean=[0.5],
                             std=[0.25], out_size=(4, 4))
    m.train()
    for _ in range(3):  # move BN statistics and the aggregator's running mean off their initial values
        m(torch.rand(8, 1, 16, 16))
    return m.eval()


def test_devices_plus_aggregator_equal_the_joint_model(model):
    x = torch.rand(6, 1, 16, 16)
    with torch.no_grad():
        vectors = [device(x) for device in model.devices]  # what each device would send
        assert [v.shape for v in vectors] == [(6, 5), (6, 7)]
        split = model.aggregator(torch.cat(vectors, dim=1))
        joint = model(x)
        from_maps = model.logits_from_maps(model.forward_maps(x))
    torch.testing.assert_close(split, joint)
    torch.testing.assert_close(from_maps, joint)


def test_missing_device_is_filled_with_its_training_mean(model):
    x = torch.rand(6, 1, 16, 16)
    with torch.no_grad():
        z = torch.cat([d(x) for d in model.devices], dim=1)
        z[:, 5:] = model.aggregator.feature_mean[5:]
        torch.testing.assert_close(model(x, missing=[1]), model.aggregator.fc(z))
    assert model.aggregator.feature_mean.abs().sum() > 0


def test_student_dropout_mask_replaces_whole_vectors(model):
    x = torch.rand(4, 1, 16, 16)
    with torch.no_grad():
        maps = model.forward_maps(x)
        drop = torch.tensor([[True, False], [False, False], [False, True], [True, True]])
        logits = model.logits_from_maps(maps, drop)
        for i in range(4):
            missing = [k for k in range(2) if drop[i, k]]
            torch.testing.assert_close(logits[i:i + 1], model(x[i:i + 1], missing=missing))


def test_maps_are_resized_to_the_teacher_size():
    m = UnifiedStudent.build(["wrn_10_1"], [3, 3], 1, 4, [0.5], [0.25], out_size=(2, 2)).eval()
    assert [t.shape for t in m.forward_maps(torch.rand(2, 1, 16, 16))] == [(2, 3, 2, 2)] * 2


def test_bad_student_lists_are_refused():
    with pytest.raises(ValueError, match="one name for all students or one per student"):
        UnifiedStudent.build(["wrn_10_1", "wrn_10_1"], [3, 3, 3], 1, 4, [0.5], [0.25], (4, 4))
    with pytest.raises(ValueError, match="at least one filter"):
        UnifiedStudent.build(["wrn_10_1"], [3, 0], 1, 4, [0.5], [0.25], (4, 4))
