"""Peak inference memory from an ONNX graph (hand-worked on small graphs), the allocator counter that checks
it against ONNX Runtime, and the energy model's arithmetic and config checks."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from bundle.memory import (
    CONV_NODE_BYTES,
    CONV_WORKSPACE_BYTES,
    OTHER_NODE_BYTES,
    SESSION_BYTES,
    measure_ort,
    peak_memory,
)
from core.energy import EnergyModel
from pipeline.config import ConfigError, load_config


def _save(nodes, inputs, outputs, initializers, path) -> str:
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(model, str(path))
    return str(path)


def _residual_conv(path, channels: int = 4, side: int = 8) -> str:
    """images -> Conv(3x3, same) -> Relu -> Add(images) -> out, float32, a dynamic batch axis."""
    w = numpy_helper.from_array(np.ones((channels, channels, 3, 3), np.float32), "w")
    b = numpy_helper.from_array(np.zeros(channels, np.float32), "b")
    shape = ["batch", channels, side, side]
    return _save([helper.make_node("Conv", ["images", "w", "b"], ["c"], pads=[1, 1, 1, 1]),
                  helper.make_node("Relu", ["c"], ["r"]),
                  helper.make_node("Add", ["r", "images"], ["out"])],
                 [helper.make_tensor_value_info("images", TensorProto.FLOAT, shape)],
                 [helper.make_tensor_value_info("out", TensorProto.FLOAT, shape)], [w, b], path)


def test_activation_peak_is_the_largest_live_set(tmp_path):
    # one map is 4 x 8 x 8 x 4 B = 1024 B. The input lives until the Add, so at the Relu three maps are live
    # (images, c, r), and at the Add three again (images, r, out): peak 3072 B.
    memory = peak_memory(_residual_conv(tmp_path / "m.onnx"))
    assert memory["weights"] == 4 * 4 * 9 * 4 + 4 * 4 == 592
    assert memory["activations"] == 3072
    assert memory["runtime"] == SESSION_BYTES + CONV_NODE_BYTES + 2 * OTHER_NODE_BYTES + CONV_WORKSPACE_BYTES
    assert memory["total"] == 592 + 3072 + memory["runtime"]


def test_weights_count_in_the_dtype_the_file_stores(tmp_path):
    """An int8 weight and its scale (as in an int8-weight model), and a Constant node, are weights."""
    q = numpy_helper.from_array(np.ones((256, 16), np.int8), "q")
    scale = numpy_helper.from_array(np.array(0.5, np.float32), "s")
    const = helper.make_node("Constant", [], ["k"], value=numpy_helper.from_array(np.ones(16, np.float32)))
    path = _save([helper.make_node("DequantizeLinear", ["q", "s"], ["w"]),
                  const,
                  helper.make_node("MatMul", ["x", "w"], ["y0"]),
                  helper.make_node("Add", ["y0", "k"], ["y"])],
                 [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 256])],
                 [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 16])], [q, scale], tmp_path / "q.onnx")
    memory = peak_memory(path)
    assert memory["weights"] == 256 * 16 + 4 + 16 * 4
    # the dequantized weight is an activation: at the MatMul, x (1 KiB), w (16 KiB) and y0 (64 B) are live
    assert memory["activations"] == 1024 + 256 * 16 * 4 + 64


def test_shapes_computed_from_data_come_from_a_batch_1_run(tmp_path):
    """NonZero's output shape depends on the data: its size is taken from a reference run on zeros
    (no nonzero element: [2, 0], 0 bytes), so the peak is the input's 32 bytes."""
    path = _save([helper.make_node("NonZero", ["x"], ["i"]), helper.make_node("Transpose", ["i"], ["y"])],
                 [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8])],
                 [helper.make_tensor_value_info("y", TensorProto.INT64, None)], [], tmp_path / "dyn.onnx")
    assert peak_memory(path)["activations"] == 32


def test_unreadable_models_and_unknowable_sizes_are_refused_in_one_line(tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a model")
    with pytest.raises(ValueError, match="bad.onnx: not a readable ONNX model"):
        peak_memory(bad)
    node = helper.make_node("Mystery", ["x"], ["y"], domain="com.example")
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.example", 1)])
    onnx.save(model, str(tmp_path / "custom.onnx"))
    with pytest.raises(ValueError, match="custom.onnx: 1 tensor.* no static shape .* batch-1 reference run failed"):
        peak_memory(tmp_path / "custom.onnx")


def test_allocator_counter_sees_what_onnx_runtime_holds(tmp_path):
    """A 1 MiB weight is held while the session lives; the run adds its activations; the estimate is
    within 20% of what the allocator counted."""
    w = numpy_helper.from_array(np.ones((512, 512), np.float32), "w")
    path = _save([helper.make_node("MatMul", ["x", "w"], ["y"])],
                 [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 512])],
                 [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 512])], [w], tmp_path / "mm.onnx")
    measured = measure_ort(path)
    assert measured["loaded"] >= 512 * 512 * 4
    assert measured["peak"] >= measured["loaded"]
    estimate = peak_memory(path)["total"]
    assert abs(estimate - measured["peak"]) <= 0.2 * measured["peak"], (estimate, measured)
    # repeatable: the same model counts the same bytes, give or take a few small allocations (on a loaded
    # machine ONNX Runtime's thread pool made 4,192 B of them once: 16 KiB is 1.5 % of this model's peak)
    assert abs(measure_ort(path)["peak"] - measured["peak"]) <= 16384


def test_energy_is_macs_times_pj_plus_bits_times_nj():
    model = EnergyModel.from_config({"compute": "cpu_core", "link": "wifi", "pj_per_mac": None, "nj_per_bit": None})
    # 1e6 MACs x 70 pJ = 70 µJ; 100 B = 800 bits x 645 nJ = 516 µJ
    assert model.joules(1e6, 100) == pytest.approx(70e-6 + 516e-6)
    mine = EnergyModel.from_config({"compute": "cpu_core", "link": "wifi", "pj_per_mac": 1.0, "nj_per_bit": 2.0})
    assert mine.joules(1e6, 100) == pytest.approx(1e-6 + 1.6e-6)
    assert mine.describe()["estimate"] is True


@pytest.mark.parametrize("override,message", [
    (["--evaluate.energy.link", "lora"], "evaluate.energy.link = 'lora'; choose one of wifi, bluetooth"),
    (["--evaluate.energy.compute", "gpu"], "evaluate.energy.compute = 'gpu'; choose one of cpu_core"),
    (["--evaluate.energy.pj_per_mac", "-1"], "evaluate.energy.pj_per_mac = -1: must be a number above 0"),
    (["--evaluate.energy.nj_per_bit", "fast"], "evaluate.energy.nj_per_bit = 'fast': must be a number above 0"),
])
def test_bad_energy_settings_are_refused_in_one_line(override, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        load_config(None, override)
