"""``nonn evaluate``: accuracy of the teacher and of the exported bundle, size, compute, bytes sent,
and accuracy when devices fail. Writes ``report.json``, ``report.md`` and ``failures.png``."""
from __future__ import annotations

import itertools
import random
import tempfile
from pathlib import Path

import numpy as np
import torch

from bundle.export import export_onnx
from bundle.format import Bundle, model_files
from bundle.memory import estimate_entry
from core.energy import EnergyModel
from core.io import atomic_path, read_json, write_json_atomic, write_text_atomic
from distill.tracking import Tracker
from pipeline.context import Context
from pipeline.loading import load_trained
from pipeline.records import mark_done
from pipeline.report import render_markdown
from students.complexity import count_macs, count_params, weight_bytes
from students.networks import batched


def failure_subsets(num_devices: int, max_random: int, seed: int) -> list[tuple[int, ...]]:
    """Every subset of failed devices (at least one device left) for K <= 4, random ones beyond."""
    subsets: list[tuple[int, ...]] = [()]
    rng = random.Random(seed)
    for count in range(1, num_devices):
        combos = list(itertools.combinations(range(num_devices), count))
        if num_devices > 4 and len(combos) > max_random:
            combos = sorted(rng.sample(combos, max_random))
        subsets += combos
    return subsets


def bundle_vectors(bundle, images: torch.Tensor, batch_size: int = 500) -> list[np.ndarray]:
    parts = [bundle.device_vectors(images[i:i + batch_size].numpy()) for i in range(0, len(images), batch_size)]
    return [np.concatenate(per_device) for per_device in zip(*parts)]


def model_parallel_report(bundle_dir: Path, images: torch.Tensor, labels: torch.Tensor) -> dict:
    """The teacher cut layer-wise (the export stage's chain bundle), run in ONNX Runtime like NoNN's:
    its accuracy and, per device, size, MACs and bytes sent. It has no answer when any device fails."""
    bundle = Bundle.load(bundle_dir)
    logits = bundle.predict_batches(images.numpy(), batch_size=500)
    devices = [{"layers": d["layers"], "params": d["params"], "weight_bytes": d["weight_bytes"], "macs": d["macs"],
                "bytes_sent": d["bytes_sent_per_inference"]} for d in bundle.manifest["devices"]]
    return {"test_acc": _acc(torch.from_numpy(logits).argmax(1), labels), "devices": devices,
            "bytes_sent_between_devices": sum(d["bytes_sent"] for d in devices[:-1])}


def teacher_peak_memory(teacher: torch.nn.Module, image_shape: tuple[int, int, int], opset: int) -> dict | None:
    """The teacher's peak inference memory, as a device's is measured: from its ONNX graph (None when the
    graph has sizes that cannot be known)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "teacher.onnx"
        export_onnx(teacher.cpu().eval(), torch.zeros(2, *image_shape), path, ("images", "logits"), opset)
        return estimate_entry(path, "peak_memory").get("peak_memory")


def part_costs(entry: dict, int8_weights: bool, energy: EnergyModel, received: int, sent: int) -> dict:
    """A bundle part's peak memory (of the model file it runs: int8 weights when used) and estimated
    energy per inference for its MACs and the bytes it receives and sends."""
    int8 = int8_weights and any(k in entry for k in ("peak_memory_int8", "peak_memory_int8_error"))  # int8 files written
    memory = entry.get("peak_memory_int8" if int8 else "peak_memory")  # the export's estimate; None: it could not be made
    return {"peak_memory": memory, "energy_uj": round(energy.joules(entry["macs"], received + sent) * 1e6, 3)}


def _largest(memories: list[dict | None]) -> int | None:
    """The largest device's peak memory; None when any device's could not be estimated."""
    return None if None in memories else max(m["total"] for m in memories)


def input_bytes(entry: dict) -> int:
    """Bytes a part receives per inference: its input tensor, in its dtype."""
    return int(np.prod(entry["input"]["shape"])) * np.dtype(entry["input"]["dtype"]).itemsize


def bundle_outputs(bundle: Bundle, images: torch.Tensor) -> tuple[torch.Tensor, list[np.ndarray] | None]:
    """The bundle's logits on ``images`` and, side by side, every device's vectors (a chain has none)."""
    if bundle.chain:
        return torch.from_numpy(bundle.predict_batches(images.numpy(), batch_size=500)), None
    vectors = bundle_vectors(bundle, images)
    return torch.from_numpy(np.asarray(bundle.aggregate(vectors), dtype=np.float32)), vectors


def failure_table(bundle: Bundle, vectors: list[np.ndarray] | None, images: torch.Tensor, labels: torch.Tensor,
                  accuracy: float, max_subsets: int, seed: int) -> list[dict]:
    """Accuracy with each subset of devices missing (their vectors replaced by the fill; in a staged bundle
    their peers also run without their messages); None: no answer."""
    failures = []
    for missing in failure_subsets(bundle.num_devices, max_subsets, seed):
        if not missing:
            acc = accuracy
        elif vectors is None:
            acc = None  # a chain with a device missing gives no answer
        elif bundle.staged:
            acc = _acc(torch.from_numpy(bundle.predict_batches(images.numpy(), 500, missing)).argmax(1), labels)
        else:
            kept = [None if i in missing else v for i, v in enumerate(vectors)]
            acc = _acc(torch.from_numpy(np.asarray(bundle.aggregate(kept))).argmax(1), labels)
        failures.append({"missing": list(missing), "accuracy": acc})
    return failures


def teacher_summary(teacher: torch.nn.Module, arch: str, shape: tuple[int, int, int], opset: int,
                    energy: EnergyModel) -> dict:
    """The teacher's size, compute, memory and energy, as it would run on one device that has the image."""
    macs = count_macs(teacher, shape)
    return {"arch": arch, "params": count_params(teacher), "weight_bytes": weight_bytes(teacher), "macs": macs,
            "feature_map_bytes": teacher.feature_channels * int(np.prod(teacher.map_size(shape))) * 4,
            "peak_memory": teacher_peak_memory(teacher, shape, opset),
            "energy_uj": round(energy.joules(macs, 0) * 1e6, 3)}


def part_rows(manifest: dict, bundle: Bundle, export_dir: Path, int8_weights: bool, energy: EnergyModel,
              image: np.ndarray) -> tuple[list[dict], dict]:
    """Each device's row (size, compute, memory, energy, its model file and ONNX Runtime time) and the
    aggregator's."""
    devices = [{k: d[k] for k in ("name", "arch", "output_width", "params", "weight_bytes", "macs",
                                  "bytes_sent_per_inference")}
               | {"model_file": ", ".join(files), "model_file_bytes": sum((export_dir / f).stat().st_size for f in files)}
               | part_costs(d, int8_weights, energy, input_bytes(d), d["bytes_sent_per_inference"])
               for d in manifest["devices"] for files in [model_files(d, int8_weights)]]
    # batch-1 time of each device's model, one thread: what a small device's single core would see (this CPU)
    latency = Bundle.load(export_dir, threads=1, use_int8=int8_weights).device_latency_ms(image)
    for d, ms in zip(devices, latency):
        d["onnx_latency_ms"] = round(ms, 4)
    aggregator = {k: manifest["aggregator"][k] for k in ("kind", "params", "weight_bytes", "macs")
                  if k in manifest["aggregator"]}
    if not bundle.chain:  # the host receives every device's vector
        received = sum(d["bytes_sent_per_inference"] for d in devices)
        aggregator |= part_costs(manifest["aggregator"], int8_weights, energy, received, 0)
    return devices, aggregator


def evaluate_run(ctx: Context, tracker: Tracker) -> dict:
    cfg = ctx.config
    dm = ctx.datamodule()
    method, model, plan = load_trained(ctx, dm)
    images, labels = dm.test[0].float().div(255.0), dm.test[1]
    torch_logits = batched(model, images)
    export_dir = ctx.run_dir / "export"
    manifest = read_json(export_dir / "manifest.json", "export manifest")
    int8_weights = bool(cfg["export"]["int8_weights"])
    bundle = Bundle.load(export_dir, use_int8=int8_weights)
    bundle_logits, vectors = bundle_outputs(bundle, images)
    bundle_pred = bundle_logits.argmax(1)
    failures = failure_table(bundle, vectors, images, labels, _acc(bundle_pred, labels),
                             cfg["evaluate"]["max_failure_subsets"], cfg["seed"])
    energy = EnergyModel.from_config(cfg["evaluate"]["energy"])
    teacher = teacher_summary(method.teacher, cfg["teacher"]["arch"], dm.image_shape, cfg["export"]["opset"], energy)
    teacher["test_acc"] = _acc(batched(method.teacher, images).argmax(1), labels)
    devices, aggregator = part_rows(manifest, bundle, export_dir, int8_weights, energy, images[0].numpy())
    sent = [d["bytes_sent_per_inference"] for d in devices]
    n = {
        "name": method.name, "label": method.label, "sends": method.sends, "num_devices": bundle.num_devices,
        "topology": manifest["topology"], "transport": manifest["transport"]["name"],
        "weights": "int8" if int8_weights else "fp32",
        "test_acc_bundle": _acc(bundle_pred, labels), "test_acc_pytorch": _acc(torch_logits.argmax(1), labels),
        "bundle_agreement": float((bundle_pred == torch_logits.argmax(1)).float().mean()),
        "bundle_max_logit_diff": float((bundle_logits - torch_logits).abs().max()),
        "devices": devices, "aggregator": aggregator,
        "max_device_params": max(d["params"] for d in devices),
        "max_device_macs": max(d["macs"] for d in devices),
        "max_device_peak_memory": _largest([d["peak_memory"] for d in devices]),
        "energy": energy.describe() | {
            "per_inference_uj": round(sum(d["energy_uj"] for d in devices) + aggregator.get("energy_uj", 0.0), 3),
            "max_device_uj": max(d["energy_uj"] for d in devices)},
        # a chain's last device returns the answer: only what crosses between devices counts
        "total_bytes_sent": sum(sent[:-1]) if bundle.chain else sum(sent),
        "summary": method.summary(plan), **method.describe(plan),
    }
    n["compression_vs_teacher"] = teacher["params"] / n["max_device_params"]
    n["macs_reduction_vs_teacher"] = teacher["macs"] / n["max_device_macs"]
    n["memory_reduction_vs_teacher"] = (teacher["peak_memory"]["total"] / n["max_device_peak_memory"]
                                        if teacher["peak_memory"] and n["max_device_peak_memory"] else None)
    report = {"run": cfg["name"], "dataset": cfg["data"]["dataset"], "test_images": len(labels),
              "teacher": teacher, "method": n, "failures": failures}
    if method.mp_baseline:
        report["model_parallel"] = model_parallel_report(ctx.run_dir / "export_mp", images, labels)
    return write_report(ctx, tracker, report)


def write_report(ctx: Context, tracker: Tracker, report: dict) -> dict:
    """report.json, report.md and failures.png; the stage's record and the tracker's summary."""
    n = report["method"]
    write_json_atomic(ctx.run_dir / "report.json", report)
    write_text_atomic(ctx.run_dir / "report.md", render_markdown(report))
    plot_failures(report["failures"], n["num_devices"], ctx.run_dir / "failures.png", n["label"])
    tracker.summary({"teacher/test_acc": report["teacher"]["test_acc"], "method/test_acc": n["test_acc_bundle"]})
    tracker.log_image("evaluate/failures", ctx.run_dir / "failures.png")
    outputs = [ctx.run_dir / "report.json", ctx.run_dir / "report.md"]
    results = {"teacher_test_acc": report["teacher"]["test_acc"], "test_acc": n["test_acc_bundle"]}
    mark_done(ctx, "evaluate", outputs, results)
    return results


def _acc(pred: torch.Tensor, labels: torch.Tensor) -> float:
    return float((pred == labels).float().mean())


def plot_failures(failures: list[dict], num_devices: int, path: Path, label: str) -> None:
    """Accuracy against the number of failed devices: mean over subsets, with min-max range
    (no answer counts as 0)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_count: dict[int, list[float]] = {}
    for f in failures:
        by_count.setdefault(len(f["missing"]), []).append(f["accuracy"] or 0.0)
    counts = sorted(by_count)
    means = [float(np.mean(by_count[c])) for c in counts]
    lows = [m - min(by_count[c]) for c, m in zip(counts, means)]
    highs = [max(by_count[c]) - m for c, m in zip(counts, means)]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.errorbar(counts, means, yerr=[lows, highs], marker="o", capsize=4)
    ax.set_xlabel(f"failed devices (of {num_devices})")
    ax.set_ylabel("test accuracy")
    ax.set_xticks(counts)
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.set_title(f"{label}: accuracy under device failures")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
