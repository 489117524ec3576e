import pytest
import torch

from students.registry import ARCHITECTURES, build_model

FEATURES = {"wrn_10_1": 64, "wrn_16_1": 64, "wrn_16_2": 128, "wrn_16_4": 256, "wrn_16_8": 512, "wrn_28_4": 256,
            "wrn_28_10": 640, "wrn_40_2": 128, "wrn_40_4": 256, "resnet20": 64, "resnet56": 64,
            "mobilenetv2": 1280, "mobilenetv2_x0.5": 1280, "mobilenetv2_x0.25": 1280}


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
@pytest.mark.parametrize("channels,size,spatial", [(1, 28, 7), (3, 32, 8)])
def test_logits_and_feature_map_shapes(name, channels, size, spatial):
    model = build_model(name, channels, 10, [0.5] * channels, [0.25] * channels).eval()
    x = torch.rand(2, channels, size, size)
    with torch.no_grad():
        fmap, logits = model.forward_features(x), model(x)
    expected_spatial = spatial if not name.startswith("mobilenet") else -(-spatial // 2)
    assert fmap.shape == (2, FEATURES[name], expected_spatial, expected_spatial)
    assert logits.shape == (2, 10)
    assert (fmap >= 0).all(), "the final map is taken after the last BN+ReLU"


def test_headless_model_returns_pooled_features():
    model = build_model("wrn_10_1", 1, 0, [0.5], [0.25]).eval()
    x = torch.rand(3, 1, 16, 16)
    with torch.no_grad():
        assert torch.allclose(model(x), model.forward_features(x).mean(dim=(2, 3)))


def test_unknown_architecture_is_refused():
    with pytest.raises(ValueError, match="unknown architecture 'wrn_99'.*wrn_16_1"):
        build_model("wrn_99", 1, 10, [0.5], [0.25])


def test_normalisation_must_match_channels():
    with pytest.raises(ValueError, match="3 input channels"):
        build_model("resnet20", 3, 10, [0.5], [0.25])
