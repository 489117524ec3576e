"""Per-device latency, memory and communication of an exported NoNN bundle, with ONNX Runtime.

What a device would see: each model runs alone in one ONNX Runtime session (1 intra-op thread by
default, like a small IoT core). Latency is the median of repeated runs after warm-up, at batch 1
(one image arriving) and batch 64 (throughput). Activation memory is estimated from the ONNX graph:
shapes by ONNX shape inference at batch 1, nodes run in graph order, a tensor freed after its last
consumer; weights excluded. ONNX Runtime's planner reuses and shares buffers, so this is an estimate.

    PYTHONPATH=. python benchmarks/bench_latency.py --synthetic --out benchmarks/results_latency.md
    PYTHONPATH=. python benchmarks/bench_latency.py --bundle runs/x/export --teacher teacher.onnx
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort

from bundle.format import Bundle, median_ms, parts
from core.hardware import cpu_name

BYTES_PER_NUMBER = {"fp32": 4, "fp16": 2, "int8": 1}
BATCHES = (1, 64)


def build_synthetic(root: Path) -> tuple[Path, Path]:
    """Untrained WRN-10-1 x 2 NoNN at 1x28x28 (Fashion-MNIST size) and a WRN-16-2 teacher; timing ignores weights."""
    import torch

    from bundle.export import ExportFormat, export_bundle, export_onnx
    from students.registry import build_model
    from students.unified import UnifiedStudent

    torch.manual_seed(0)
    shape, mean, std = (1, 28, 28), [0.2860], [0.3530]
    teacher = build_model("wrn_16_2", 1, 10, mean, std).eval()  # final map: 128 filters at 7x7
    student = UnifiedStudent.build(["wrn_10_1"], [64, 64], 1, 10, mean, std, out_size=(7, 7)).eval()
    images = torch.rand(64, *shape)
    export_bundle(student, root / "export", image_shape=shape, class_names=[str(i) for i in range(10)],
                  calibration_images=images, form=ExportFormat(int8_weights=True))
    export_onnx(teacher, images[:2], root / "teacher.onnx", ("images", "logits"), opset=17)
    return root / "export", root / "teacher.onnx"


def latencies(session: ort.InferenceSession, sample: Callable[[int], np.ndarray], repeats: int) -> list[float]:
    """Median ms per batch for each of BATCHES (fewer repeats at the large batch, which is slow and steady)."""
    name = session.get_inputs()[0].name
    return [median_ms(lambda x=sample(b): session.run(None, {name: x}), max(3, repeats // (1 + b // 16)))
            for b in BATCHES]


def graph_stats(path: Path) -> dict[str, int]:
    """Counted from the ONNX graph at batch 1, so every model (teacher and int8 files included) is measured alike.

    weight_bytes: initializers as stored; macs: Conv/Gemm/MatMul (and their integer forms);
    largest / peak: the biggest intermediate tensor, and the largest sum of tensors alive at once when
    nodes run in graph order (input included, weights excluded).
    """
    model = onnx.load(str(path))
    for value in [*model.graph.input, *model.graph.output]:
        value.type.tensor_type.shape.dim[0].dim_value = 1
    graph = onnx.shape_inference.infer_shapes(model).graph
    shapes = {v.name: _shape(v) for v in [*graph.input, *graph.value_info, *graph.output]}
    shapes.update({t.name: list(t.dims) for t in graph.initializer})
    dtypes = {v.name: v.type.tensor_type.elem_type for v in [*graph.input, *graph.value_info, *graph.output]}
    sizes = {n: _nbytes(shapes[n], dtypes[n]) for n in dtypes}
    weights = {t.name for t in graph.initializer} | {o for n in graph.node if n.op_type == "Constant" for o in n.output}
    last_use = {name: k for k, node in enumerate(graph.node) for name in node.input}
    outputs = {v.name for v in graph.output}
    live = {v.name for v in graph.input if v.name not in weights}
    peak = sum(sizes.get(n, 0) for n in live)
    for k, node in enumerate(graph.node):
        live |= {o for o in node.output if o not in weights}
        peak = max(peak, sum(sizes.get(n, 0) for n in live))
        live -= {n for n in node.input if last_use.get(n) == k and n not in outputs}
    return {"weight_bytes": sum(_nbytes(list(t.dims), t.data_type) for t in graph.initializer),
            "macs": sum(_macs(node, shapes) for node in graph.node),
            "largest": max(size for n, size in sizes.items() if n not in weights), "peak": peak}


def _shape(value: onnx.ValueInfoProto) -> list[int]:
    return [d.dim_value for d in value.type.tensor_type.shape.dim]


def _nbytes(shape: list[int], elem_type: int) -> int:
    if any(d <= 0 for d in shape):
        return 0  # unknown shape: only shape tensors and scalars here, negligible
    return int(np.prod(shape)) * onnx.helper.tensor_dtype_to_np_dtype(elem_type).itemsize


def _macs(node: onnx.NodeProto, shapes: dict[str, list[int]]) -> int:
    """Conv: output elements x (input channels / groups) x kernel area; matrix products: M x N x K."""
    if node.op_type in ("Conv", "ConvInteger"):
        weight = shapes[node.input[1]]
        return int(np.prod(shapes[node.output[0]])) * int(np.prod(weight[1:]))
    if node.op_type in ("Gemm", "MatMul", "MatMulInteger"):
        a, out = shapes[node.input[0]], shapes[node.output[0]]
        k = a[-2] if node.op_type == "Gemm" and any(x.name == "transA" and x.i for x in node.attribute) else a[-1]
        return int(np.prod(out)) * k
    return 0


def _sampler(session: ort.InferenceSession, rng: np.random.Generator) -> Callable[[int], np.ndarray]:
    """Random inputs of the session's input type and shape, batch first."""
    info = session.get_inputs()[0]
    dtype = np.dtype({"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(uint8)": "uint8"}[info.type])
    shape = list(info.shape[1:])
    if dtype == np.uint8:
        return lambda b: rng.integers(0, 256, (b, *shape), dtype=np.uint8)
    return lambda b: rng.random((b, *shape), dtype=np.float32).astype(dtype)


def measure_models(bundle: Bundle, teacher: Path | None, threads: int, repeats: int) -> list[dict[str, Any]]:
    """Every model file: the devices and the aggregator (float and int8-weight files), then the teacher."""
    rng = np.random.default_rng(0)
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    entries = [(p.get("name", "aggregator"), kind, bundle.root / f) for p in parts(bundle.manifest)
               for kind, f in p["files"].items() if kind != "torchscript"]
    if teacher is not None:
        entries.append(("teacher", "onnx", teacher))
    results = []
    for name, kind, path in entries:
        session = ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])
        b1, b64 = latencies(session, _sampler(session, rng), repeats)
        results.append({"name": name, "int8": kind == "onnx_int8", "file_bytes": path.stat().st_size,
                        **graph_stats(path), "b1": b1, "b64": b64})
    return results


def model_rows(results: list[dict[str, Any]]) -> list[list[str]]:
    return [[r["name"], "int8 weights" if r["int8"] else "fp32", _kib(r["file_bytes"]), _kib(r["weight_bytes"]),
             f"{r['macs'] / 1e6:.3g}", _kib(r["largest"]), _kib(r["peak"]), f"{r['b1']:.3g}", f"{r['b64']:.3g}",
             f"{r['b64'] / 64:.3g}"] for r in results]


def summary(results: list[dict[str, Any]]) -> str:
    """Compute latency of one image through the system: the devices run in parallel, then the aggregator."""
    fp32 = {r["name"]: r for r in results if not r["int8"]}
    devices = [r for n, r in fp32.items() if n.startswith("device_")]
    slowest, aggregator = max(r["b1"] for r in devices), fp32["aggregator"]["b1"]
    text = (f"One image, fp32 models, network time excluded: slowest device {slowest:.3g} ms + aggregator "
            f"{aggregator:.3g} ms = {slowest + aggregator:.3g} ms")
    if "teacher" in fp32:
        t = fp32["teacher"]
        text += (f"; teacher alone {t['b1']:.3g} ms. Largest device vs teacher: "
                 f"{t['weight_bytes'] / max(r['weight_bytes'] for r in devices):.1f}x fewer weight bytes, "
                 f"{t['peak'] / max(r['peak'] for r in devices):.1f}x less peak activation memory, "
                 f"{t['macs'] / max(r['macs'] for r in devices):.1f}x fewer MACs")
    return text + "."


def transport_rows(manifest: dict) -> list[list[str]]:
    widths = [d["output_width"] for d in manifest["devices"]]
    rows = [[d["name"], str(w), *(str(w * n) for n in BYTES_PER_NUMBER.values())]
            for d, w in zip(manifest["devices"], widths)]
    return rows + [["all devices", str(sum(widths)), *(str(sum(widths) * n) for n in BYTES_PER_NUMBER.values())]]


def _kib(n: int) -> str:
    return f"{n / 1024:.1f}"


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def report(bundle_dir: Path, label: str, teacher: Path | None, threads: int, repeats: int) -> str:
    bundle = Bundle.load(bundle_dir)  # verifies every checksum before anything is measured
    manifest = bundle.manifest
    shape = manifest["input"]["shape"]
    results = measure_models(bundle, teacher, threads, repeats)
    models = _table(["model", "weights", "file KiB", "stored weight KiB", "MMACs/image", "largest tensor KiB",
                     "peak live activations KiB", "latency b1 ms", "latency b64 ms", "ms/image at b64"],
                    model_rows(results))
    transport = _table(["device", "numbers sent", "fp32 bytes", "fp16 bytes", "int8 bytes"], transport_rows(manifest))
    image_bytes = int(np.prod(shape))
    return "\n\n".join([
        f"Command: `{' '.join(['python', *sys.argv])}`",
        f"Bundle: {label} (input {shape}, transport of this export: {manifest['transport']['name']}). "
        f"ONNX Runtime {ort.__version__}, {threads} intra-op thread(s); {cpu_name()}, {os.cpu_count()} logical CPUs, "
        f"{platform.platform()}; load average at the end {os.getloadavg()[0]:.1f}.",
        "Latency: median of repeated `session.run` calls after 5 warm-up runs. Weights, MACs and activation "
        "memory are counted in the ONNX graph at batch 1 (shape inference): *largest tensor* is the biggest "
        "single intermediate; *peak live* is the largest sum of tensors alive at once when the nodes run in "
        "graph order (input included, weights excluded) - an estimate, ONNX Runtime's allocator reuses "
        "buffers and may differ.",
        models,
        summary(results),
        "Bytes each device sends per inference (one image), by transport:",
        transport,
        f"For comparison, sending the raw image to a hub: {image_bytes} bytes as uint8, {4 * image_bytes} as float32.",
    ]) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--bundle", type=Path, help="an export folder (with manifest.json)")
    source.add_argument("--synthetic", action="store_true",
                        help="export an untrained WRN-10-1 x 2 NoNN and a WRN-16-2 teacher at 1x28x28 and measure them")
    parser.add_argument("--teacher", type=Path, help="teacher ONNX (input 'images') to compare with")
    parser.add_argument("--threads", type=int, default=1, help="ONNX Runtime intra-op threads per model")
    parser.add_argument("--repeats", type=int, default=200, help="timed runs at batch 1 (fewer at batch 64)")
    parser.add_argument("--out", type=Path, help="also write the markdown here")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        if args.synthetic:
            bundle_dir, teacher = build_synthetic(Path(tmp))
            label = "synthetic, untrained WRN-10-1 students with 64 + 64 filters and a WRN-16-2 teacher"
        else:
            bundle_dir, teacher, label = args.bundle, args.teacher, f"`{args.bundle}`"
        text = report(bundle_dir, label, teacher, args.threads, args.repeats)
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
